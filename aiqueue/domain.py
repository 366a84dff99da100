"""Statuses, allowed transitions and the frozen result objects the manager returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"  # holds a slot; being submitted (or the submit's outcome is unknown)
    RUNNING = "running"  # the provider accepted it; provider_task_id is stored
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (Status.QUEUED, Status.STARTING, Status.RUNNING)
HOLDS_SLOT = (Status.STARTING, Status.RUNNING)
TERMINAL = (Status.COMPLETED, Status.FAILED, Status.CANCELLED)
REFUNDED = (Status.FAILED, Status.CANCELLED)

# Every edge a job may take. Terminal statuses have none: they never change again.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.STARTING, Status.CANCELLED}),
    Status.STARTING: frozenset(
        {Status.QUEUED, Status.RUNNING, Status.COMPLETED, Status.FAILED, Status.CANCELLED}
    ),
    Status.RUNNING: frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED}),
    Status.COMPLETED: frozenset(),
    Status.FAILED: frozenset(),
    Status.CANCELLED: frozenset(),
}


def sources_of(target: Status) -> tuple[Status, ...]:
    """The statuses a job may move to `target` from (used in guarded updates)."""
    return tuple(s for s, targets in TRANSITIONS.items() if target in targets)


class LedgerKind(StrEnum):
    GRANT = "grant"
    CHARGE = "charge"
    REFUND = "refund"


@dataclass(frozen=True)
class Job:
    id: int
    user: str
    tool: str
    status: Status
    cost: int
    inputs: dict[str, str]
    provider_task_id: str | None
    error: str | None
    outputs: list[str]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    slot: int | None = None
    position: int | None = None  # 1-based place in the global FIFO, queued jobs only

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "tool": self.tool,
            "status": str(self.status),
            "position": self.position,
            "slot": self.slot,
            "cost": self.cost,
            "inputs": dict(self.inputs),
            "provider_task_id": self.provider_task_id,
            "error": self.error,
            "outputs": list(self.outputs),
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }


@dataclass(frozen=True)
class JobEvent:
    id: int
    job_id: int
    from_status: Status | None
    to_status: Status
    at: datetime
    detail: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "job_id": self.job_id,
            "from_status": None if self.from_status is None else str(self.from_status),
            "to_status": str(self.to_status),
            "at": _iso(self.at),
            "detail": self.detail,
        }


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    user: str
    job_id: int | None
    kind: LedgerKind
    amount: int
    created_at: datetime
    note: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "job_id": self.job_id,
            "kind": str(self.kind),
            "amount": self.amount,
            "created_at": _iso(self.created_at),
            "note": self.note,
        }


@dataclass(frozen=True)
class Balance:
    user: str
    balance: int

    def to_dict(self) -> dict[str, Any]:
        return {"user": self.user, "balance": self.balance}


@dataclass(frozen=True)
class GrantResult:
    entry: LedgerEntry
    balance: int

    def to_dict(self) -> dict[str, Any]:
        return {"entry": self.entry.to_dict(), "user": self.entry.user, "balance": self.balance}


@dataclass(frozen=True)
class QueueStatus:
    limit: int
    running: list[Job]  # jobs holding a slot (starting or running), by slot
    queued: list[Job]  # FIFO order, positions 1..n (the first `limit` of them when cut)
    queued_total: int
    paused: bool = False
    # What an operator asks next (issue 4); defaults keep older constructors working.
    now: datetime | None = None
    window_seconds: float = 86400.0
    counts: dict[str, int] = field(default_factory=dict)  # active: now; terminal: finished in window
    oldest_queued_at: datetime | None = None
    starts: dict[int, datetime | None] = field(default_factory=dict)  # queued job id -> estimate
    durations: Any = None  # aiqueue.eta.Durations behind the estimates

    def to_dict(self) -> dict[str, Any]:
        now = self.now
        return {
            "limit": self.limit,
            "paused": self.paused,
            "running": [_timed(j.to_dict(), "running_seconds", j.started_at, now) for j in self.running],
            "queued": [self._queued(j) for j in self.queued],
            "queued_total": self.queued_total,
            "generated_at": _iso(now),
            "window": {"seconds": self.window_seconds},
            "counts": dict(self.counts),
            "oldest_queued_at": _iso(self.oldest_queued_at),
            "oldest_queued_age_seconds": _age(self.oldest_queued_at, now),
            "estimates": None if self.durations is None else self.durations.to_dict(),
        }

    def _queued(self, job: Job) -> dict[str, Any]:
        data = _timed(job.to_dict(), "waiting_seconds", job.created_at, self.now)
        start = self.starts.get(job.id)
        data["estimated_start"] = _iso(start)
        data["estimated_wait_seconds"] = _age(self.now, start) if start is not None else None
        return data


@dataclass(frozen=True)
class UserStatus:
    """`status --user U`: the user's active job (with its place and estimated start) and their
    most recent jobs, newest first."""

    user: str
    balance: int
    known: bool  # has an account or any job
    active: Job | None
    estimated_start: datetime | None
    approximate: bool  # the estimate skipped part of a long queue (see aiqueue.eta)
    recent: list[Job]
    paused: bool
    now: datetime

    def to_dict(self) -> dict[str, Any]:
        active = None
        if self.active is not None:
            since = self.active.created_at if self.active.status is Status.QUEUED else self.active.started_at
            key = "waiting_seconds" if self.active.status is Status.QUEUED else "running_seconds"
            active = _timed(self.active.to_dict(), key, since, self.now)
            active["estimated_start"] = _iso(self.estimated_start)
            active["estimated_wait_seconds"] = (
                None if self.estimated_start is None else _age(self.now, self.estimated_start))
            active["estimate_approximate"] = self.approximate
        return {
            "user": self.user,
            "known": self.known,
            "balance": self.balance,
            "paused": self.paused,
            "active": active,
            "recent": [j.to_dict() for j in self.recent],
            "generated_at": _iso(self.now),
        }


@dataclass(frozen=True)
class PauseResult:
    paused: bool
    changed: bool
    process: ProcessResult = field(default_factory=lambda: ProcessResult())

    def to_dict(self) -> dict[str, Any]:
        return {"paused": self.paused, "changed": self.changed,
                "started": [j.to_dict() for j in self.process.started]}


@dataclass(frozen=True)
class JobDetail:
    job: Job
    events: list[JobEvent]
    ledger: list[LedgerEntry]
    estimated_start: datetime | None = None  # queued jobs: when it should start (aiqueue.eta)
    approximate: bool = False

    def to_dict(self) -> dict[str, Any]:
        job = self.job.to_dict()
        if self.job.status is Status.QUEUED:
            job["estimated_start"] = _iso(self.estimated_start)
            job["estimate_approximate"] = self.approximate
        return {
            "job": job,
            "events": [e.to_dict() for e in self.events],
            "ledger": [e.to_dict() for e in self.ledger],
        }


@dataclass(frozen=True)
class ProcessResult:
    """What one fill of the free slots did."""

    started: list[Job] = field(default_factory=list)  # accepted by the provider: running
    requeued: list[Job] = field(default_factory=list)  # provider busy: back in their FIFO place
    failed: list[Job] = field(default_factory=list)  # rejected by the provider: failed, refunded
    unknown: list[Job] = field(default_factory=list)  # outcome unknown: left starting for cleanup
    expired: list[Job] = field(default_factory=list)  # stale jobs ended first (opportunistic)
    halted: str | None = None  # why the fill stopped for every job (bad key, missing tool...)
    finished: list[Job] = field(default_factory=list)  # no webhook configured: RunningHub, asked, had ended them

    def to_dict(self) -> dict[str, Any]:
        return {
            "halted": self.halted,
            "started": [j.to_dict() for j in self.started],
            "requeued": [j.to_dict() for j in self.requeued],
            "failed": [j.to_dict() for j in self.failed],
            "unknown": [j.to_dict() for j in self.unknown],
            "expired": [j.to_dict() for j in self.expired],
            "finished": [j.to_dict() for j in self.finished],
        }


@dataclass(frozen=True)
class EnqueueResult:
    job: Job
    process: ProcessResult

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job.to_dict(), "process": self.process.to_dict()}


@dataclass(frozen=True)
class FinishResult:
    """The outcome of a finish, a webhook or a cancel. `changed` is False for duplicates."""

    job: Job | None
    changed: bool
    refunded: int = 0
    message: str | None = None  # why nothing changed, or what the provider said
    process: ProcessResult = field(default_factory=ProcessResult)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": None if self.job is None else self.job.to_dict(),
            "changed": self.changed,
            "refunded": self.refunded,
            "message": self.message,
            "started": [j.to_dict() for j in self.process.started],
        }


@dataclass(frozen=True)
class CleanupResult:
    expired: list[Job]  # ended by the timeout: failed and refunded
    completed: list[Job]  # the provider had finished them: completed
    failed: list[Job]  # the provider had failed them: failed with its message, refunded
    process: ProcessResult = field(default_factory=ProcessResult)
    stale: list[Job] = field(default_factory=list)  # --dry-run: what a real run would look at
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "stale": [j.to_dict() for j in self.stale],
            "expired": [j.to_dict() for j in self.expired],
            "completed": [j.to_dict() for j in self.completed],
            "failed": [j.to_dict() for j in self.failed],
            "started": [j.to_dict() for j in self.process.started],
        }


@dataclass(frozen=True)
class UnmatchedWebhook:
    id: int
    task_id: str
    received_at: datetime
    body: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "task_id": self.task_id, "received_at": _iso(self.received_at), "body": self.body}


@dataclass(frozen=True)
class AuditProblem:
    kind: str  # missing_refund, refund_on_completed, missing_charge, wrong_amount, balance_mismatch
    job_id: int | None
    user: str
    detail: str
    fixable: bool

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "job_id": self.job_id, "user": self.user, "detail": self.detail}


@dataclass(frozen=True)
class AuditResult:
    problems: list[AuditProblem]  # what is still wrong (after --fix, what could not be fixed)
    fixed: list[AuditProblem]
    would_fix: list[AuditProblem] = field(default_factory=list)  # --fix --dry-run: what --fix would repair
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": [p.to_dict() for p in self.problems],
            "fixed": [p.to_dict() for p in self.fixed],
            "dry_run": self.dry_run,
            "would_fix": [p.to_dict() for p in self.would_fix],
        }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _age(since: datetime | None, now: datetime | None) -> float | None:
    if since is None or now is None:
        return None
    return round(max(0.0, (now - since).total_seconds()), 3)


def _timed(data: dict[str, Any], key: str, since: datetime | None, now: datetime | None) -> dict[str, Any]:
    data[key] = _age(since, now)
    return data

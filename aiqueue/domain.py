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

    def to_dict(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "paused": self.paused,
            "running": [j.to_dict() for j in self.running],
            "queued": [j.to_dict() for j in self.queued],
            "queued_total": self.queued_total,
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job.to_dict(),
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "halted": self.halted,
            "started": [j.to_dict() for j in self.started],
            "requeued": [j.to_dict() for j in self.requeued],
            "failed": [j.to_dict() for j in self.failed],
            "unknown": [j.to_dict() for j in self.unknown],
            "expired": [j.to_dict() for j in self.expired],
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

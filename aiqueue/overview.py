"""The read side of QueueManager: the status overview with estimated starts and counts, one user's
view, and job listings. Rules only, like the manager: no SQL (the store's Tx queries), no terminal.

Every read here is bounded whatever the size of the database: the queue is read up to the rows
shown (the whole queue only when the caller asks for it), and an estimate for a job deep in a long
queue loads at most AHEAD_LOADED jobs ahead of it and skips the rest in closed form (aiqueue.eta),
saying that the figure is approximate.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from aiqueue.clock import Clock
from aiqueue.domain import TERMINAL, Job, QueueStatus, Status, UserStatus
from aiqueue.errors import NotFoundError, UsageError
from aiqueue.eta import DURATION_SAMPLES, Durations, Simulation, estimate_starts

if TYPE_CHECKING:
    from aiqueue.store import Store, Tx

AHEAD_LOADED = 1000  # queued jobs loaded ahead of one user's job for its estimate
MAX_TOOLS = 50  # distinct tools whose own medians are looked up in one status
RECENT_JOBS = 10  # `status --user`: the user's latest jobs shown


def durations_for(tx: Tx, tools: Iterable[str]) -> Durations:
    wanted = list(dict.fromkeys(tools))[:MAX_TOOLS]
    per_tool = {tool: tx.recent_durations(tool, DURATION_SAMPLES) for tool in wanted}
    return Durations.from_samples(per_tool, tx.recent_durations(None, DURATION_SAMPLES))


def queue_status(store: Store, limit_slots: int, clock: Clock, limit: int | None, window: timedelta) -> QueueStatus:
    def tx_fn(tx: Tx) -> QueueStatus:
        now = clock.now()
        queued = tx.queued(limit)
        total = len(queued) if limit is None else tx.count_queued()
        holding = tx.holding_slots()
        paused = tx.is_paused()
        durations = durations_for(tx, [j.tool for j in holding + queued])
        starts = estimate_starts(now, limit_slots, paused, [(j.started_at, j.tool) for j in holding],
                                 [j.tool for j in queued], durations)
        counts = {str(s): 0 for s in Status}
        counts.update({s: n for s, n in tx.finished_counts(now - window).items() if Status(s) in TERMINAL})
        counts[Status.QUEUED.value] = total
        for job in holding:
            counts[job.status.value] += 1
        if queued:
            oldest = queued[0].created_at
        else:
            oldest = tx.oldest_queued_at() if total else None
        return QueueStatus(
            limit=limit_slots, running=holding, queued=queued, queued_total=total, paused=paused,
            now=now, window_seconds=window.total_seconds(), counts=counts, oldest_queued_at=oldest,
            starts={job.id: start for job, start in zip(queued, starts)}, durations=durations,
        )

    return store.read(tx_fn)


def user_status(store: Store, limit_slots: int, clock: Clock, user: str) -> UserStatus:
    def tx_fn(tx: Tx) -> UserStatus:
        now = clock.now()
        recent = tx.jobs_of_user(user, RECENT_JOBS)
        known = bool(recent) or tx.has_account(user)
        if not known:
            raise NotFoundError(f"no user {user!r}: no jobs and no credits", user=user)
        active = tx.active_job_of(user)
        paused = tx.is_paused()
        start, approximate = None, False
        if active is not None and active.status is Status.QUEUED:
            active = _placed(active, tx.position(active.id))
            start, approximate = estimate_start(tx, active, limit_slots, now, paused)
        recent = [_placed(j, active.position) if active is not None and j.id == active.id else j for j in recent]
        return UserStatus(user=user, balance=tx.balance(user), known=known, active=active, estimated_start=start,
                          approximate=approximate, recent=recent, paused=paused, now=now)

    return store.read(tx_fn)


def estimate_start(tx: Tx, job: Job, limit_slots: int, now: datetime, paused: bool) -> tuple[datetime | None, bool]:
    """(estimated start, approximate) of a queued job that carries its position: the jobs holding
    slots and up to AHEAD_LOADED jobs ahead of it are simulated one by one, the rest skipped in
    closed form (then the figure is approximate). A paused queue starts nothing: None."""
    assert job.position is not None
    if paused:
        return None, False
    ahead = tx.queued_tools(min(job.position - 1, AHEAD_LOADED)) if job.position > 1 else []
    holding = tx.holding_slots()
    durations = durations_for(tx, [job.tool] + [j.tool for j in holding] + ahead)
    simulation = Simulation(now, limit_slots, [(j.started_at, j.tool) for j in holding], durations)
    for tool in ahead:
        simulation.next_start(tool)
    skipped = job.position - 1 - len(ahead)
    simulation.skip(skipped)
    return simulation.next_start(job.tool), skipped > 0


def parse_statuses(values: Sequence[str]) -> list[Status]:
    """'failed', 'queued,running' (repeatable) -> statuses; an unknown one is a usage error."""
    statuses: list[Status] = []
    for value in values:
        for part in value.split(","):
            name = part.strip().lower()
            if not name:
                continue
            try:
                statuses.append(Status(name))
            except ValueError:
                known = ", ".join(s.value for s in Status)
                raise UsageError(f"--status: unknown status {part.strip()!r} (one of: {known})", value=part) from None
    return list(dict.fromkeys(statuses))


def since_of(since: timedelta | datetime | None, clock: Clock) -> datetime | None:
    if since is None or isinstance(since, datetime):
        if isinstance(since, datetime) and since.tzinfo is None:
            raise UsageError("--since needs a time zone (e.g. 2026-12-03T10:00:00Z)")
        return since
    return clock.now() - since


def list_jobs(
    store: Store, statuses: Sequence[Status], user: str | None, tool: str | None, since: datetime | None,
    limit: int | None,
) -> list[Job]:
    return store.read(lambda tx: list(tx.list_jobs(statuses, user, tool, since, limit)))


def stream_jobs(
    store: Store, statuses: Sequence[Status], user: str | None, tool: str | None, since: datetime | None,
    limit: int | None,
) -> Iterator[Job]:
    return store.stream(lambda tx: tx.list_jobs(statuses, user, tool, since, limit))


def _placed(job: Job, position: int | None) -> Job:
    from dataclasses import replace

    return replace(job, position=position)

"""One reusable checker of the queue's invariants, read straight from the database with SQL
(independent of the manager's own queries, so it can catch them being wrong)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import create_engine, text


def check_invariants(url: str, limit: int) -> list[str]:
    """Return every violated invariant as a sentence; [] when all hold."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return _check(conn, limit)
    finally:
        engine.dispose()


def _check(conn: Any, limit: int) -> list[str]:
    problems: list[str] = []
    jobs = {r.id: r for r in conn.execute(text("SELECT id, user_id, status, cost, slot FROM aiqueue_jobs"))}
    entries = list(conn.execute(text("SELECT id, user_id, job_id, kind, amount FROM aiqueue_ledger")))
    balances = dict(conn.execute(text("SELECT user_id, balance FROM aiqueue_accounts")).all())

    sums: Counter[str] = Counter()
    for e in entries:
        sums[e.user_id] += e.amount
    for user in set(sums) | set(balances):  # I1, I4
        if balances.get(user, 0) != sums[user]:
            problems.append(f"I1 balance of {user!r} is {balances.get(user, 0)}, ledger sums to {sums[user]}")
        if balances.get(user, 0) < 0:
            problems.append(f"I4 balance of {user!r} is negative")

    charges = Counter(e.job_id for e in entries if e.kind == "charge")
    refunds = Counter(e.job_id for e in entries if e.kind == "refund")
    for job in jobs.values():  # I2, I3
        if charges[job.id] != 1:
            problems.append(f"I2 job {job.id} has {charges[job.id]} charges")
        if refunds[job.id] > 1:
            problems.append(f"I3 job {job.id} has {refunds[job.id]} refunds")
        if refunds[job.id] and job.status not in ("failed", "cancelled"):
            problems.append(f"I3 {job.status} job {job.id} was refunded")
        if job.status in ("failed", "cancelled") and refunds[job.id] != 1:
            problems.append(f"I3 {job.status} job {job.id} has {refunds[job.id]} refunds")
    for e in entries:
        job = jobs.get(e.job_id) if e.job_id is not None else None
        if e.kind == "charge" and job is not None and e.amount != -job.cost:
            problems.append(f"I2 job {job.id} charge is {e.amount}, cost {job.cost}")
        if e.kind == "refund" and job is not None and e.amount != job.cost:
            problems.append(f"I3 job {job.id} refund is {e.amount}, cost {job.cost}")

    holding = [j for j in jobs.values() if j.status in ("starting", "running")]  # I5
    if len(holding) > limit:
        problems.append(f"I5 {len(holding)} jobs hold slots, limit {limit}")
    if any(j.slot is None or not 1 <= j.slot <= limit for j in holding):
        problems.append(f"I5 slot numbers out of range: {sorted(j.slot for j in holding if j.slot)}")
    active = Counter(j.user_id for j in jobs.values() if j.status in ("queued", "starting", "running"))
    for user, n in active.items():  # I6
        if n > 1:
            problems.append(f"I6 user {user!r} has {n} active jobs")

    # I7: each job's history is a chain of allowed steps ending in its current status, and
    # nothing follows a terminal status.
    from aiqueue.domain import TRANSITIONS, Status

    history: dict[int, list[Any]] = {}
    for e in conn.execute(text("SELECT job_id, from_status, to_status FROM aiqueue_job_events ORDER BY id")):
        history.setdefault(e.job_id, []).append(e)
    for job in jobs.values():
        chain = history.get(job.id, [])
        if not chain or chain[0].from_status is not None or chain[0].to_status != "queued":
            problems.append(f"I7 job {job.id} history does not start with enqueued")
            continue
        for before, after in zip(chain, chain[1:]):
            same = after.from_status == after.to_status == "starting"  # a note: submit outcome unknown
            if after.from_status != before.to_status or not (
                same or Status(after.to_status) in TRANSITIONS[Status(after.from_status)]
            ):
                problems.append(f"I7 job {job.id} moved {after.from_status}->{after.to_status} after {before.to_status}")
        if chain[-1].to_status != job.status:
            problems.append(f"I7 job {job.id} is {job.status} but its history ends {chain[-1].to_status}")
    return problems


def max_claimed_slot(url: str) -> int:
    """The highest slot number any claim ever took, from the job events."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            details = conn.execute(
                text("SELECT detail FROM aiqueue_job_events WHERE detail LIKE 'claimed slot %'")
            ).scalars()
            return max((int(d.rsplit(" ", 1)[1]) for d in details), default=0)
    finally:
        engine.dispose()


def replay_max_holders(url: str) -> int:
    """Replay the job events in id order and return the most slots ever held at once."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT from_status, to_status FROM aiqueue_job_events ORDER BY id")
            ).all()
    finally:
        engine.dispose()
    holding = peak = 0
    for source, target in rows:
        held_before = source in ("starting", "running")
        held_after = target in ("starting", "running")
        holding += int(held_after) - int(held_before)
        peak = max(peak, holding)
    return peak


def check_invariants_on(engine: Any, limit: int) -> list[str]:
    """check_invariants over an engine the caller keeps (a test that checks after every step
    need not pay a new connection each time); the same checks."""
    with engine.connect() as conn:
        return _check(conn, limit)

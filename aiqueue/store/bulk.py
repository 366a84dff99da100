"""Fast bulk generation of a realistic database, for tests and the scale benchmark.

`generate` writes `finished` terminal jobs (a `fail_rate` share failed and refunded) and `queued`
waiting jobs, one per user (so `queued` distinct users hold them), with each job's charge (and
refund) in the ledger, one grant per user, cached balances equal to the ledger sums, and (unless
`events=False`) each job's history as the manager would have written it. PostgreSQL gets COPY,
SQLite one transaction of executemany; rows are produced lazily, so memory stays flat whatever
the size. PostgreSQL tables are analysed at the end (a never-analysed table keeps bad plans).

Meant for a database no one else is writing to (it numbers the jobs itself).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiqueue.store import Store

_JOB_COLUMNS = (
    "id", "user_id", "tool", "status", "cost", "inputs", "provider_task_id", "error", "outputs",
    "slot", "created_at", "started_at", "finished_at", "updated_at",
)
_LEDGER_COLUMNS = ("user_id", "job_id", "kind", "amount", "created_at", "note")
_EVENT_COLUMNS = ("job_id", "from_status", "to_status", "at", "detail")
_ACCOUNT_COLUMNS = ("user_id", "balance", "updated_at")
_TABLES = ("aiqueue_jobs", "aiqueue_ledger", "aiqueue_job_events", "aiqueue_accounts")
FAILURE = "node 31 (KSampler) RuntimeError: CUDA out of memory"


@dataclass
class BulkStats:
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    first_job_id: int = 0
    users: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"rows": dict(self.rows), "seconds": round(self.seconds, 3),
                "first_job_id": self.first_job_id, "users": self.users}


def generate(
    store: Store,
    finished: int,
    queued: int,
    *,
    fail_rate: float = 0.1,
    users: int | None = None,
    cost: int = 5,
    tool: str = "upscale_image",
    events: bool = True,
    user_prefix: str = "user-",
    spare_credits: int = 1000,
    seed: int = 0,
    now: datetime | None = None,
) -> BulkStats:
    """Fill the database (its schema must exist). Users are `user_prefix` + a number; the queued
    jobs go to the first `queued` of them, one each. Returns row counts and the time taken."""
    n_users = max(users or 0, queued, 1)
    if queued > n_users:
        raise ValueError("one active job per user: need at least as many users as queued jobs")
    started = time.perf_counter()
    now = now or datetime.now(timezone.utc)
    rng = random.Random(seed)
    failed_flags = bytearray(rng.random() < fail_rate for _ in range(finished))
    names = [f"{user_prefix}{i:07d}" for i in range(n_users)]
    spent = [0] * n_users  # net credits each user spent, so the grant makes the sums agree
    for i in range(finished):
        if not failed_flags[i]:
            spent[i % n_users] += cost
    for i in range(queued):
        spent[i] += cost

    postgres = store.dialect == "postgresql"
    raw = store.engine.raw_connection()
    try:
        conn: Any = raw.driver_connection
        if not postgres:
            conn.execute("BEGIN IMMEDIATE")
        cur = conn.cursor()
        cur.execute("SELECT COALESCE(MAX(id), 0) FROM aiqueue_jobs")
        base = int(cur.fetchone()[0])
        span = timedelta(days=30)

        def when(i: int, total: int) -> datetime:
            return now - span + span * (i / max(total, 1))

        def job_rows() -> Iterator[tuple[Any, ...]]:
            for i in range(finished):
                created = when(i, finished) - timedelta(minutes=5)
                fail = failed_flags[i]
                task = str(1_800_000_000_000_000_000 + base + i + 1)
                yield (base + i + 1, names[i % n_users], tool, "failed" if fail else "completed", cost,
                       '{"image": "api/in.png"}', task, FAILURE if fail else None,
                       "[]" if fail else f'["https://example.invalid/{task}.png"]', None,
                       created, created + timedelta(seconds=1), created + timedelta(seconds=60),
                       created + timedelta(seconds=60))
            for i in range(queued):
                created = now - timedelta(seconds=queued - i)
                yield (base + finished + i + 1, names[i], tool, "queued", cost, '{"image": "api/in.png"}',
                       None, None, "[]", None, created, None, None, created)

        def ledger_rows() -> Iterator[tuple[Any, ...]]:
            first = now - span - timedelta(days=1)
            for u, name in enumerate(names):
                yield (name, None, "grant", spent[u] + spare_credits, first, "bulk top-up")
            for i in range(finished):
                at = when(i, finished) - timedelta(minutes=5)
                job_id = base + i + 1
                yield (names[i % n_users], job_id, "charge", -cost, at, f"{tool} job {job_id}")
                if failed_flags[i]:
                    yield (names[i % n_users], job_id, "refund", cost, at + timedelta(seconds=60),
                           f"failed job {job_id}")
            for i in range(queued):
                job_id = base + finished + i + 1
                yield (names[i], job_id, "charge", -cost, now - timedelta(seconds=queued - i),
                       f"{tool} job {job_id}")

        def event_rows() -> Iterator[tuple[Any, ...]]:
            for i in range(finished):
                at = when(i, finished) - timedelta(minutes=5)
                job_id = base + i + 1
                end = "failed" if failed_flags[i] else "completed"
                yield (job_id, None, "queued", at, "enqueued")
                yield (job_id, "queued", "starting", at + timedelta(seconds=1), "claimed slot 1")
                yield (job_id, "starting", "running", at + timedelta(seconds=1), "provider task")
                yield (job_id, "running", end, at + timedelta(seconds=60),
                       f"webhook: {FAILURE if failed_flags[i] else 'completed'}")
            for i in range(queued):
                yield (base + finished + i + 1, None, "queued", now - timedelta(seconds=queued - i), "enqueued")

        def account_rows() -> Iterator[tuple[Any, ...]]:
            for name in names:
                yield (name, spare_credits, now)

        stats = BulkStats(first_job_id=base + 1, users=n_users)
        plan: list[tuple[str, Sequence[str], Iterable[tuple[Any, ...]]]] = [
            ("aiqueue_accounts", _ACCOUNT_COLUMNS, account_rows()),
            ("aiqueue_jobs", _JOB_COLUMNS, job_rows()),
            ("aiqueue_ledger", _LEDGER_COLUMNS, ledger_rows()),
        ]
        if events:
            plan.append(("aiqueue_job_events", _EVENT_COLUMNS, event_rows()))
        for table, columns, rows in plan:
            stats.rows[table] = _load(cur, postgres, table, columns, rows)
        if postgres:
            cur.execute("SELECT setval(pg_get_serial_sequence('aiqueue_jobs', 'id'),"
                        " (SELECT MAX(id) FROM aiqueue_jobs))")
        conn.commit()
        if postgres:
            conn.autocommit = True
            for table in _TABLES:  # as autovacuum would: statistics and the visibility map
                cur.execute(f"VACUUM ANALYZE {table}")
            conn.autocommit = False
    finally:
        raw.close()
    stats.seconds = time.perf_counter() - started
    return stats


def _load(cur: Any, postgres: bool, table: str, columns: Sequence[str], rows: Iterable[tuple[Any, ...]]) -> int:
    count = 0
    if postgres:
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
                count += 1
        return count

    def counted() -> Iterator[tuple[Any, ...]]:
        nonlocal count
        for row in rows:
            count += 1
            # SQLite keeps naive UTC text, as the store's UTCDateTime writes it.
            yield tuple(v.replace(tzinfo=None).isoformat(" ") if isinstance(v, datetime) else v for v in row)

    marks = ", ".join("?" for _ in columns)
    cur.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", counted())
    return count


def grant_users(store: Store, users: Sequence[str], amount: int, *, now: datetime | None = None) -> None:
    """Give each user an account of `amount` credits with its grant entry, in one transaction."""
    now = now or datetime.now(timezone.utc)
    postgres = store.dialect == "postgresql"
    at: Any = now if postgres else now.replace(tzinfo=None).isoformat(" ")
    raw = store.engine.raw_connection()
    try:
        conn: Any = raw.driver_connection
        if not postgres:
            conn.execute("BEGIN IMMEDIATE")
        cur = conn.cursor()
        _load(cur, postgres, "aiqueue_accounts", _ACCOUNT_COLUMNS, ((u, amount, at) for u in users))
        _load(cur, postgres, "aiqueue_ledger", _LEDGER_COLUMNS,
              ((u, None, "grant", amount, at, "benchmark credits") for u in users))
        conn.commit()
    finally:
        raw.close()


def delete_users(store: Store, prefix: str) -> int:
    """Remove every row of the users whose id starts with `prefix` (the benchmark's own, run in
    place): their jobs with their events, webhooks and ledger entries, and their accounts.
    Returns the number of jobs removed."""
    like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    p = "%s" if store.dialect == "postgresql" else "?"
    jobs = f"SELECT id FROM aiqueue_jobs WHERE user_id LIKE {p} ESCAPE '\\'"
    raw = store.engine.raw_connection()
    try:
        conn: Any = raw.driver_connection
        if store.dialect != "postgresql":
            conn.execute("BEGIN IMMEDIATE")
        cur = conn.cursor()
        cur.execute(f"DELETE FROM aiqueue_job_events WHERE job_id IN ({jobs})", (like,))
        cur.execute(f"DELETE FROM aiqueue_webhooks WHERE job_id IN ({jobs})", (like,))
        cur.execute(f"DELETE FROM aiqueue_ledger WHERE user_id LIKE {p} ESCAPE '\\'", (like,))
        cur.execute(f"DELETE FROM aiqueue_jobs WHERE user_id LIKE {p} ESCAPE '\\'", (like,))
        removed = int(cur.rowcount)
        cur.execute(f"DELETE FROM aiqueue_accounts WHERE user_id LIKE {p} ESCAPE '\\'", (like,))
        conn.commit()
    finally:
        raw.close()
    return removed


def count_jobs(store: Store, *, active: bool = False) -> int:
    """Jobs in the database (only queued/starting/running ones with `active`)."""
    where = " WHERE status IN ('queued', 'starting', 'running')" if active else ""
    with store.engine.connect() as conn:
        return int(conn.exec_driver_sql(f"SELECT COUNT(*) FROM aiqueue_jobs{where}").scalar_one())


def analyze(store: Store) -> None:
    """Refresh the planner's statistics (PostgreSQL; SQLite keeps none unless asked, as in use)."""
    if store.dialect != "postgresql":
        return
    with store.engine.connect() as conn:
        conn.exec_driver_sql("COMMIT")
        for table in _TABLES + ("aiqueue_webhooks", "aiqueue_queue_state"):
            conn.exec_driver_sql(f"ANALYZE {table}")


def last_queued_id(store: Store) -> int:
    """The id of the newest queued job (the deepest queue position); 0 when none is queued."""
    with store.engine.connect() as conn:
        value = conn.exec_driver_sql("SELECT MAX(id) FROM aiqueue_jobs WHERE status = 'queued'").scalar_one()
    return int(value or 0)

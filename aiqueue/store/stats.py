"""Aggregate queries for `aiqueue doctor` and `aiqueue metrics` (the SQL half of aiqueue.monitor).

Each function takes a store.Tx and returns plain numbers: the counting happens in the database
(COUNT/SUM ... GROUP BY over indexed columns), never by loading rows into Python, so a scrape
stays cheap with a million finished jobs. The queries lean on these indexes of tables.py:
ix_aiqueue_jobs_status_id (the queue depth, its head, jobs per status), ux_aiqueue_jobs_slot
(jobs holding a slot: at most queue.max_concurrent rows) and ux_aiqueue_ledger_job_kind
(refunds).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, func, inspect, literal, select

from aiqueue.store.tables import jobs, ledger, metadata

if TYPE_CHECKING:
    from aiqueue.store import Tx

TERMINAL_STATUSES = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class SchemaTables:
    missing: list[str]  # our tables the database does not have
    empty: bool  # none of them exists


@dataclass(frozen=True)
class QueueNumbers:
    queued: int
    head_created_at: datetime | None  # the FIFO head (lowest queued id): the longest wait
    holding: int  # jobs holding a slot (starting or running)
    stuck: int  # of those, how many have held it since before the cutoff
    stuck_oldest_started_at: datetime | None
    paused: bool


def ping(tx: Tx) -> str:
    """A round trip to the server; returns its version text."""
    if tx.dialect == "postgresql":
        return str(tx.conn.exec_driver_sql("SHOW server_version").scalar_one()).split()[0]
    return str(tx.conn.exec_driver_sql("SELECT sqlite_version()").scalar_one())


def schema_tables(tx: Tx) -> SchemaTables:
    """Which of our tables are missing (the versions come from aiqueue.store.migrations)."""
    inspector = inspect(tx.conn)
    expected = [table.name for table in metadata.sorted_tables]
    missing = [name for name in expected if not inspector.has_table(name)]
    return SchemaTables(missing=missing, empty=missing == expected)


def queue_numbers(tx: Tx, stale_cutoff: datetime) -> QueueNumbers:
    """Queue depth, its head's age, jobs holding slots and those held since before stale_cutoff."""
    queued, head = tx.count_queued(), tx.oldest_queued_at()  # the status reads' own queries
    stuck_since = case((jobs.c.started_at < stale_cutoff, literal(1)), else_=literal(0))
    holding = tx.conn.execute(
        select(
            func.count(),
            func.coalesce(func.sum(stuck_since), 0),
            func.min(case((jobs.c.started_at < stale_cutoff, jobs.c.started_at), else_=None)),
        ).where(jobs.c.slot.is_not(None))
    ).one()
    return QueueNumbers(
        queued=queued,
        head_created_at=head,
        holding=int(holding[0]),
        stuck=int(holding[1]),
        stuck_oldest_started_at=_aware(holding[2]),
        paused=tx.is_paused(),
    )


def jobs_by_status_and_tool(tx: Tx) -> list[tuple[str, str, int]]:
    """(status, tool, count) over every job ever created."""
    rows = tx.conn.execute(
        select(jobs.c.status, jobs.c.tool, func.count())
        .group_by(jobs.c.status, jobs.c.tool)
        .order_by(jobs.c.status, jobs.c.tool)
    )
    return [(str(status), str(tool), int(count)) for status, tool, count in rows]


def refund_totals(tx: Tx) -> tuple[int, int]:
    """(number of refunds, credits refunded) over the whole ledger."""
    # `job_id IS NOT NULL` lets both databases use the partial unique index on (job_id, kind).
    count, credits = tx.conn.execute(
        select(func.count(), func.coalesce(func.sum(ledger.c.amount), 0))
        .where(ledger.c.job_id.is_not(None), ledger.c.kind == "refund")
    ).one()
    return int(count), int(credits)


def provider_error_codes(tx: Tx) -> list[tuple[str, int]]:
    """(provider code, failed jobs) for failed jobs whose stored error starts with RunningHub's
    code: "803 APIKEY_...", "submit rejected: 803 ...", "provider code 805". Failures without a
    code (a node's exception text, a timeout) are not provider errors by code and are left out."""
    # The code is computed once per failed row in a subquery; its NULL group (no code) is dropped
    # here, one aggregated row rather than a filter that would compute the code again.
    codes = select(_leading_code(tx.dialect).label("code")).where(jobs.c.status == "failed").subquery()
    rows = tx.conn.execute(select(codes.c.code, func.count()).group_by(codes.c.code))
    found = [(str(code), int(count)) for code, count in rows if code is not None]
    return sorted(found, key=lambda item: (len(item[0]), item[0]))


# The prefixes under which the manager stores a provider's code (manager._record and _expire,
# provider.codes.describe_code): the code is followed by a space or ends the text.
_CODE_PREFIXES = ("", "submit rejected: ", "provider code ")


def _leading_code(dialect: str) -> Any:
    """The 3- or 4-digit code at the start of jobs.error (after a known prefix), else NULL."""
    error = jobs.c.error
    if dialect == "postgresql":
        # split_part and a regex on a short token: a third of the cost of one regex over the text.
        whens = [(error.like(prefix + "%"), func.substr(error, len(prefix) + 1)) for prefix in _CODE_PREFIXES[1:]]
        token = func.split_part(case(*whens, else_=error), " ", 1)
        return case((token.op("~")("^[0-9]{3,4}$"), token), else_=None)
    # SQLite has no regular expressions without a user function: GLOB patterns per prefix and
    # length pick the same codes, still inside the database.
    spaced = error.concat(" ")
    whens = []
    for prefix in _CODE_PREFIXES:
        for digits in (3, 4):
            whens.append((spaced.op("GLOB")(prefix + "[0-9]" * digits + " *"),
                          func.substr(error, len(prefix) + 1, digits)))
    return case(*whens, else_=None)


def _aware(value: Any) -> datetime | None:
    """MIN() over a UTCDateTime may come back as SQLite's naive text: make it aware UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)

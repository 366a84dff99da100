"""SQLModel tables. The schema itself holds the invariants it can:

- one active job per user: a partial unique index over every active status;
- a job holds a numbered slot exactly while it is starting or running (CHECK), and no two jobs
  hold the same slot (partial unique index), so the global limit is structural once claims are
  serialised (see store.Tx.claim_next);
- one charge and at most one refund per job: a unique index on (job_id, kind);
- no balance below zero, charges negative, grants and refunds positive: CHECK constraints.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    event,
)
from sqlalchemy.schema import DDL
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from aiqueue.store.migrations import HEAD

SCHEMA_VERSION = HEAD  # db init stamps a new database at the newest migration step

# 64-bit ids on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is the (64-bit) rowid alias.
ID = BigInteger().with_variant(Integer, "sqlite")

ACTIVE_SQL = "status IN ('queued', 'starting', 'running')"
STATUS_SQL = "status IN ('queued', 'starting', 'running', 'completed', 'failed', 'cancelled')"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on both backends (SQLite drops the zone; we put it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use the injected UTC clock")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw SQLite text
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _col(type_: Any, *args: Any, **kwargs: Any) -> Any:
    return Field(sa_column=Column(type_, *args, **kwargs))


class JobRow(SQLModel, table=True):
    __tablename__ = "aiqueue_jobs"
    __table_args__ = (
        CheckConstraint(STATUS_SQL, name="ck_aiqueue_jobs_status"),
        CheckConstraint("cost > 0", name="ck_aiqueue_jobs_cost"),
        CheckConstraint(
            "(slot IS NOT NULL) = (status IN ('starting', 'running'))",
            name="ck_aiqueue_jobs_slot_held",
        ),
        CheckConstraint("slot IS NULL OR slot >= 1", name="ck_aiqueue_jobs_slot_positive"),
        # FIFO pick, positions and per-status counts.
        Index("ix_aiqueue_jobs_status_id", "status", "id"),
        Index("ix_aiqueue_jobs_user_id", "user_id", "id"),
        # status/jobs reads (issue 4): recent runs per tool (ETA) and `jobs --tool`; `jobs
        # --since`; per-status counts of the jobs finished within a window (covering).
        Index("ix_aiqueue_jobs_tool_status_id", "tool", "status", "id"),
        Index("ix_aiqueue_jobs_created", "created_at"),
    )

    id: int | None = Field(default=None, sa_column=Column(ID, primary_key=True, autoincrement=True))
    user_id: str = _col(String(200), nullable=False)
    tool: str = _col(String(100), nullable=False)
    status: str = _col(String(16), nullable=False)
    cost: int = _col(BigInteger, nullable=False)
    inputs: str = _col(Text, nullable=False, default="{}")
    provider_task_id: str | None = _col(String(64), nullable=True, unique=True)
    error: str | None = _col(Text, nullable=True)
    outputs: str = _col(Text, nullable=False, default="[]")
    slot: int | None = _col(Integer, nullable=True)
    created_at: datetime = _col(UTCDateTime, nullable=False)
    started_at: datetime | None = _col(UTCDateTime, nullable=True)
    finished_at: datetime | None = _col(UTCDateTime, nullable=True)
    updated_at: datetime = _col(UTCDateTime, nullable=False)


class JobEventRow(SQLModel, table=True):
    __tablename__ = "aiqueue_job_events"
    __table_args__ = (Index("ix_aiqueue_job_events_job", "job_id", "id"),)

    id: int | None = Field(default=None, sa_column=Column(ID, primary_key=True, autoincrement=True))
    job_id: int = _col(ID, ForeignKey("aiqueue_jobs.id"), nullable=False)
    from_status: str | None = _col(String(16), nullable=True)
    to_status: str = _col(String(16), nullable=False)
    at: datetime = _col(UTCDateTime, nullable=False)
    detail: str | None = _col(Text, nullable=True)


class AccountRow(SQLModel, table=True):
    """The cached balance; the refund audit checks it against the ledger's sum."""

    __tablename__ = "aiqueue_accounts"
    __table_args__ = (CheckConstraint("balance >= 0", name="ck_aiqueue_accounts_balance"),)

    user_id: str = Field(sa_column=Column(String(200), primary_key=True))
    balance: int = _col(BigInteger, nullable=False)
    updated_at: datetime = _col(UTCDateTime, nullable=False)


class LedgerRow(SQLModel, table=True):
    """Append-only: rows are inserted, never updated or deleted."""

    __tablename__ = "aiqueue_ledger"
    __table_args__ = (
        CheckConstraint("kind IN ('grant', 'charge', 'refund')", name="ck_aiqueue_ledger_kind"),
        CheckConstraint(
            "(kind = 'charge' AND amount < 0) OR (kind IN ('grant', 'refund') AND amount > 0)",
            name="ck_aiqueue_ledger_amount_sign",
        ),
        CheckConstraint(
            "(kind = 'grant') = (job_id IS NULL)", name="ck_aiqueue_ledger_job_for_charges"
        ),
        Index("ix_aiqueue_ledger_user", "user_id", "id"),
    )

    id: int | None = Field(default=None, sa_column=Column(ID, primary_key=True, autoincrement=True))
    user_id: str = _col(String(200), nullable=False)
    job_id: int | None = _col(ID, ForeignKey("aiqueue_jobs.id"), nullable=True)
    kind: str = _col(String(8), nullable=False)
    amount: int = _col(BigInteger, nullable=False)
    created_at: datetime = _col(UTCDateTime, nullable=False)
    note: str | None = _col(Text, nullable=True)


class WebhookRow(SQLModel, table=True):
    """The webhook inbox: every well-formed body is stored first (deduplicated by its hash), so
    one that arrives before its task id is known is applied as soon as the job is."""

    __tablename__ = "aiqueue_webhooks"  # its partial index: PARTIAL_INDEXES below

    id: int | None = Field(default=None, sa_column=Column(ID, primary_key=True, autoincrement=True))
    task_id: str = _col(String(64), nullable=False)
    body_sha256: str = _col(String(64), nullable=False, unique=True)
    body: str = _col(Text, nullable=False)
    received_at: datetime = _col(UTCDateTime, nullable=False)
    applied_at: datetime | None = _col(UTCDateTime, nullable=True)
    job_id: int | None = _col(ID, ForeignKey("aiqueue_jobs.id"), nullable=True)
    result: str | None = _col(Text, nullable=True)


class QueueStateRow(SQLModel, table=True):
    """One row. On PostgreSQL, claims lock it so that count-then-claim is serialised."""

    __tablename__ = "aiqueue_queue_state"
    __table_args__ = (CheckConstraint("id = 1", name="ck_aiqueue_queue_state_single"),)

    id: int = Field(default=1, sa_column=Column(Integer, primary_key=True, autoincrement=False))
    paused: bool = _col(Boolean, nullable=False, default=False)
    schema_version: int = _col(Integer, nullable=False, default=SCHEMA_VERSION)


jobs = JobRow.__table__  # type: ignore[attr-defined]
events = JobEventRow.__table__  # type: ignore[attr-defined]
accounts = AccountRow.__table__  # type: ignore[attr-defined]
ledger = LedgerRow.__table__  # type: ignore[attr-defined]
queue_state = QueueStateRow.__table__  # type: ignore[attr-defined]
webhooks = WebhookRow.__table__  # type: ignore[attr-defined]
metadata = SQLModel.metadata

# Partial indexes, written once as SQL that SQLite and PostgreSQL both accept, created right after
# their table. Declared as Index(..., sqlite_where=..., postgresql_where=...) they would make
# SQLAlchemy import its PostgreSQL dialect on every SQLite command (~15-20 ms of each start).
PARTIAL_INDEXES: tuple[tuple[str, str, str, bool, str], ...] = (
    # (table, index, columns, unique, predicate)
    # one active job per user, over every active status
    ("aiqueue_jobs", "ux_aiqueue_jobs_active_user", "user_id", True, ACTIVE_SQL),
    # no two jobs hold the same slot: the global limit, structurally
    ("aiqueue_jobs", "ux_aiqueue_jobs_slot", "slot", True, "slot IS NOT NULL"),
    # per-status counts of the jobs finished within a window (covering)
    ("aiqueue_jobs", "ix_aiqueue_jobs_finished_status", "finished_at, status", False, "finished_at IS NOT NULL"),
    # one charge and at most one refund per job
    ("aiqueue_ledger", "ux_aiqueue_ledger_job_kind", "job_id, kind", True, "job_id IS NOT NULL"),
    # webhooks kept until their task's job is known
    ("aiqueue_webhooks", "ix_aiqueue_webhooks_unapplied", "task_id", False, "applied_at IS NULL"),
)
for _table, _name, _columns, _unique, _where in PARTIAL_INDEXES:
    _sql = f"CREATE {'UNIQUE ' if _unique else ''}INDEX {_name} ON {_table} ({_columns}) WHERE {_where}"
    event.listen(metadata.tables[_table], "after_create", DDL(_sql))

"""Versioned schema migrations: numbered steps of SQL (per dialect) and/or Python, applied in order.

The version lives in the one row of `aiqueue_queue_state.schema_version` (present since the first
schema, so every database created by an earlier aiqueue already says "1"). Version 1 is the
schema as issue 2 landed it; `db init` creates the head schema from the SQLModel tables in one
step and stamps it at HEAD, and `db upgrade` brings an older database there step by step. A test
(tests/test_migrations.py) builds the version-1 schema from step 1, upgrades it, and compares
every table, column, index (with its WHERE), CHECK and unique constraint with a fresh `db init`.

API (used by `aiqueue db ...` and by `doctor`):
    schema_state(store) -> SchemaState(current, head, pending)   # a NamedTuple; reads only
        current: the stored version; 0 for an empty database, or for aiqueue tables with no
                 version row (created before versioning: step 1 adopts them, see below)
        head:    HEAD, the newest version this code knows
        pending: the Steps still to apply, oldest first (empty when current >= head;
                 current > head means the database is newer than this aiqueue)
    describe(store) -> dict   # `db current --json`: current, head, pending, state, ...
    upgrade(store) -> list[Step]   # the steps applied now (empty when already at head)
    check_version(conn)   # exit 8 unless the stored version is HEAD; Store runs it in its first
                          # write transaction (one single-row query), so no command writes
                          # through a schema behind or ahead of the code; reads go on

Each step runs in its own transaction (SQLite and PostgreSQL both have transactional DDL), which
also stamps the new version, so a failed step leaves the database at the previous version.
Concurrent upgrades are serialised: SQLite's BEGIN IMMEDIATE takes the write lock, PostgreSQL
takes a transaction-scoped advisory lock (per schema); inside the lock the version is read
again, so a step already applied by another process is skipped. `db init` takes the same lock.

HOW TO ADD A STEP (e.g. a new index):
1. Change the table in tables.py (that is what a fresh `db init` creates).
2. Append `Step(N, "what and why", sqlite=(...,), postgresql=(...,))` to STEPS below, N = the
   last version + 1, with the SQL that turns version N-1 into that same shape. Write the SQL
   literally (never generated from tables.py: a step must not change when tables.py does later),
   and make it safe to meet half-applied by hand (CREATE INDEX IF NOT EXISTS ...). For data
   changes give `python=fn`, fn(conn, dialect) running on the step's SQLAlchemy connection.
   PostgreSQL builds a plain index under a write lock on the table: fine at this tool's sizes.
3. Run tests/test_migrations.py on both backends: it fails until the upgraded schema equals the
   fresh one. Never edit a step that has been released; add another.
Nothing else to bump: HEAD and tables.SCHEMA_VERSION follow STEPS. Existing databases (a dev's
file, production) then refuse writes with exit 8 until `aiqueue db upgrade` has run on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from aiqueue.store import Store

STATE_TABLE = "aiqueue_queue_state"


@dataclass(frozen=True)
class Step:
    version: int
    name: str
    sqlite: tuple[str, ...] = ()
    postgresql: tuple[str, ...] = ()
    python: Callable[[Connection, str], None] | None = None

    def statements(self, dialect: str) -> tuple[str, ...]:
        return self.postgresql if dialect == "postgresql" else self.sqlite

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "name": self.name}


# --- step 1: the schema as issue 2 landed it (aiqueue/store/tables.py at 5b78b9f) ---------------
# {id}: the id column type; {ref}: a column referring to an id; {ts}: an aware timestamp.
_V1 = """
CREATE TABLE IF NOT EXISTS aiqueue_accounts (
    user_id VARCHAR(200) NOT NULL,
    balance BIGINT NOT NULL,
    updated_at {ts} NOT NULL,
    PRIMARY KEY (user_id),
    CONSTRAINT ck_aiqueue_accounts_balance CHECK (balance >= 0)
);
CREATE TABLE IF NOT EXISTS aiqueue_jobs (
    id {id} NOT NULL,
    user_id VARCHAR(200) NOT NULL,
    tool VARCHAR(100) NOT NULL,
    status VARCHAR(16) NOT NULL,
    cost BIGINT NOT NULL,
    inputs TEXT NOT NULL,
    provider_task_id VARCHAR(64),
    error TEXT,
    outputs TEXT NOT NULL,
    slot INTEGER,
    created_at {ts} NOT NULL,
    started_at {ts},
    finished_at {ts},
    updated_at {ts} NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT ck_aiqueue_jobs_status CHECK (status IN ('queued', 'starting', 'running', 'completed', 'failed', 'cancelled')),
    CONSTRAINT ck_aiqueue_jobs_cost CHECK (cost > 0),
    CONSTRAINT ck_aiqueue_jobs_slot_held CHECK ((slot IS NOT NULL) = (status IN ('starting', 'running'))),
    CONSTRAINT ck_aiqueue_jobs_slot_positive CHECK (slot IS NULL OR slot >= 1),
    UNIQUE (provider_task_id)
);
CREATE INDEX IF NOT EXISTS ix_aiqueue_jobs_status_id ON aiqueue_jobs (status, id);
CREATE INDEX IF NOT EXISTS ix_aiqueue_jobs_user_id ON aiqueue_jobs (user_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS ux_aiqueue_jobs_active_user ON aiqueue_jobs (user_id) WHERE status IN ('queued', 'starting', 'running');
CREATE UNIQUE INDEX IF NOT EXISTS ux_aiqueue_jobs_slot ON aiqueue_jobs (slot) WHERE slot IS NOT NULL;
CREATE TABLE IF NOT EXISTS aiqueue_queue_state (
    id INTEGER NOT NULL,
    paused BOOLEAN NOT NULL,
    schema_version INTEGER NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT ck_aiqueue_queue_state_single CHECK (id = 1)
);
CREATE TABLE IF NOT EXISTS aiqueue_job_events (
    id {id} NOT NULL,
    job_id {ref} NOT NULL,
    from_status VARCHAR(16),
    to_status VARCHAR(16) NOT NULL,
    at {ts} NOT NULL,
    detail TEXT,
    PRIMARY KEY (id),
    FOREIGN KEY(job_id) REFERENCES aiqueue_jobs (id)
);
CREATE INDEX IF NOT EXISTS ix_aiqueue_job_events_job ON aiqueue_job_events (job_id, id);
CREATE TABLE IF NOT EXISTS aiqueue_ledger (
    id {id} NOT NULL,
    user_id VARCHAR(200) NOT NULL,
    job_id {ref},
    kind VARCHAR(8) NOT NULL,
    amount BIGINT NOT NULL,
    created_at {ts} NOT NULL,
    note TEXT,
    PRIMARY KEY (id),
    CONSTRAINT ck_aiqueue_ledger_kind CHECK (kind IN ('grant', 'charge', 'refund')),
    CONSTRAINT ck_aiqueue_ledger_amount_sign CHECK ((kind = 'charge' AND amount < 0) OR (kind IN ('grant', 'refund') AND amount > 0)),
    CONSTRAINT ck_aiqueue_ledger_job_for_charges CHECK ((kind = 'grant') = (job_id IS NULL)),
    FOREIGN KEY(job_id) REFERENCES aiqueue_jobs (id)
);
CREATE INDEX IF NOT EXISTS ix_aiqueue_ledger_user ON aiqueue_ledger (user_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS ux_aiqueue_ledger_job_kind ON aiqueue_ledger (job_id, kind) WHERE job_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS aiqueue_webhooks (
    id {id} NOT NULL,
    task_id VARCHAR(64) NOT NULL,
    body_sha256 VARCHAR(64) NOT NULL,
    body TEXT NOT NULL,
    received_at {ts} NOT NULL,
    applied_at {ts},
    job_id {ref},
    result TEXT,
    PRIMARY KEY (id),
    UNIQUE (body_sha256),
    FOREIGN KEY(job_id) REFERENCES aiqueue_jobs (id)
);
CREATE INDEX IF NOT EXISTS ix_aiqueue_webhooks_unapplied ON aiqueue_webhooks (task_id) WHERE applied_at IS NULL;
"""


def _v1(id_: str, ref: str, ts: str) -> tuple[str, ...]:
    text = _V1.format(id=id_, ref=ref, ts=ts)
    return tuple(part.strip() for part in text.split(";") if part.strip())


# --- step 2: status/jobs reads (issue 4) stay index-backed at a million jobs ---------------------
_IX_STATUS_READS = (
    "CREATE INDEX IF NOT EXISTS ix_aiqueue_jobs_tool_status_id ON aiqueue_jobs (tool, status, id)",
    "CREATE INDEX IF NOT EXISTS ix_aiqueue_jobs_created ON aiqueue_jobs (created_at)",
    ("CREATE INDEX IF NOT EXISTS ix_aiqueue_jobs_finished_status ON aiqueue_jobs (finished_at, status)"
     " WHERE finished_at IS NOT NULL"),
)


STEPS: tuple[Step, ...] = (
    Step(
        1,
        "first schema: jobs, events, accounts, ledger, webhook inbox, queue state",
        sqlite=_v1("INTEGER", "INTEGER", "DATETIME"),
        postgresql=_v1("BIGSERIAL", "BIGINT", "TIMESTAMP WITH TIME ZONE"),
    ),
    Step(
        2,
        "indexes for status and jobs: runs per tool, jobs by creation time, finished counts",
        sqlite=_IX_STATUS_READS,
        postgresql=_IX_STATUS_READS,
    ),
    # Append new steps here (see HOW TO ADD A STEP above).
)

HEAD = STEPS[-1].version


class SchemaState(NamedTuple):
    current: int
    head: int
    pending: tuple[Step, ...]


# --- reading the version ----------------------------------------------------------------------


def _aiqueue_tables(conn: Connection, dialect: str) -> set[str]:
    from sqlalchemy import text

    if dialect == "postgresql":
        query = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
    else:
        query = "SELECT name FROM sqlite_master WHERE type = 'table'"
    return {name for (name,) in conn.execute(text(query)) if name.startswith("aiqueue_")}


def _read(conn: Connection, dialect: str) -> tuple[int, bool]:
    """(stored version or 0, whether any aiqueue table exists)."""
    from sqlalchemy import text

    tables = _aiqueue_tables(conn, dialect)
    if STATE_TABLE not in tables:
        return 0, bool(tables)
    version = conn.execute(text(f"SELECT schema_version FROM {STATE_TABLE} WHERE id = 1")).scalar()
    return int(version or 0), True


def _lock(conn: Connection, dialect: str) -> None:
    """Serialise schema changes. SQLite: the transaction began IMMEDIATE, it holds the write lock.
    PostgreSQL: an advisory lock for this schema, released at commit (two int4 keys, a key space
    apart from the store's one-bigint per-task locks)."""
    if dialect == "postgresql":
        conn.exec_driver_sql(
            "SELECT pg_advisory_xact_lock(hashtext('aiqueue.schema'), hashtext(current_schema()))"
        )


def _pending(current: int) -> tuple[Step, ...]:
    return tuple(step for step in STEPS if step.version > current)


def schema_state(store: Store) -> SchemaState:
    """(current, head, pending) of the store's database; reads only."""
    current, _tables = _locked_read(store)
    return SchemaState(current, HEAD, _pending(current))


def _locked_read(store: Store) -> tuple[int, bool]:
    from aiqueue.store import engine as _engine

    store._check_file()
    return _engine.run(store.engine, lambda conn: _read(conn, store.dialect), write=False)


def describe(store: Store) -> dict[str, Any]:
    """`db current --json`: the state spelled out for people and scripts."""
    current, tables = _locked_read(store)
    if current > HEAD:
        state = "ahead"
    elif current == HEAD:
        state = "current"
    elif current == 0:
        state = "unversioned" if tables else "empty"
    else:
        state = "behind"
    return {
        "current": current,
        "head": HEAD,
        "state": state,
        "pending": [step.to_dict() for step in _pending(current)],
    }


# --- changing the schema ----------------------------------------------------------------------


def upgrade(store: Store) -> list[Step]:
    """Apply the pending steps in order, each in its own locked transaction. Idempotent."""
    from aiqueue.errors import DatabaseError
    from aiqueue.store import engine as _engine

    store._check_file()  # a missing SQLite file is `db init`'s to create
    applied: list[Step] = []
    for step in STEPS:
        if _engine.run(store.engine, lambda conn, step=step: _apply(conn, store.dialect, step)):
            applied.append(step)
    current, _tables = _locked_read(store)
    if current > HEAD:
        raise DatabaseError(
            f"the database schema is at version {current}, newer than this aiqueue knows ({HEAD}):"
            " upgrade aiqueue", current=current, head=HEAD)
    return applied


def _apply(conn: Connection, dialect: str, step: Step) -> bool:
    from sqlalchemy import text

    _lock(conn, dialect)
    current, _tables = _read(conn, dialect)
    if current >= step.version:
        return False  # applied before, or by a concurrent upgrade that held the lock first
    for statement in step.statements(dialect):
        conn.exec_driver_sql(statement)
    if step.python is not None:
        step.python(conn, dialect)
    if step.version == 1:
        conn.execute(text(
            f"INSERT INTO {STATE_TABLE} (id, paused, schema_version) VALUES (1, FALSE, 1)"
            " ON CONFLICT (id) DO NOTHING"))
    conn.execute(text(f"UPDATE {STATE_TABLE} SET schema_version = :v WHERE id = 1"), {"v": step.version})
    return True


def check_version(conn: Connection) -> None:
    """Refuse (exit 8) to work on a schema this code does not match; one indexed single-row
    query. Store runs it in its first write transaction; no table at all is translated by the
    engine into "run `aiqueue db init`"."""
    from sqlalchemy import text

    from aiqueue.errors import DatabaseError

    current = conn.execute(text(f"SELECT schema_version FROM {STATE_TABLE} WHERE id = 1")).scalar()
    if current == HEAD:
        return
    if current is None:
        raise DatabaseError("the aiqueue schema has no version row: run `aiqueue db upgrade`",
                            current=0, head=HEAD)
    if current < HEAD:
        raise DatabaseError(f"the database schema is at version {current}, this aiqueue needs {HEAD}:"
                            " run `aiqueue db upgrade`", current=current, head=HEAD)
    raise DatabaseError(f"the database schema is at version {current}, newer than this aiqueue knows"
                        f" ({HEAD}): upgrade aiqueue", current=current, head=HEAD)


def create_head(conn: Connection, dialect: str) -> bool:
    """`db init`'s one step: on a database without aiqueue tables, create the head schema from
    the SQLModel tables and stamp it at HEAD. False (nothing changed) when any table exists: an
    existing database is brought to head by `upgrade`, never by create_all, which would give a
    new table its head shape before the steps that expect it older."""
    from sqlalchemy import text

    from aiqueue.store.tables import metadata

    _lock(conn, dialect)
    if _aiqueue_tables(conn, dialect):
        return False
    metadata.create_all(conn, checkfirst=False)
    conn.execute(text(
        f"INSERT INTO {STATE_TABLE} (id, paused, schema_version) VALUES (1, FALSE, :v)"), {"v": HEAD})
    return True

"""Engine set-up per dialect, transactions with the right BEGIN, and driver-error translation."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from aiqueue.errors import AiqueueError, DatabaseError, SchemaMissingError

T = TypeVar("T")

# PostgreSQL SQLSTATEs worth running the whole transaction again for.
_RETRY_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected
_MAX_ATTEMPTS = 6

# Every SQLite connection's set-up (the benchmark's raw-SQL side uses the very same).
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",  # money: a commit survives a power cut
    "PRAGMA foreign_keys=ON",
)


def make_engine(url: str, *, busy_timeout: float = 30.0, pre_ping: bool = False) -> Engine:
    """pre_ping (PostgreSQL): check each pooled connection before use, for long-lived processes
    whose pooled connections a failover or pg_terminate_backend may have closed; one-shot commands
    open a fresh pool and skip the round trip. Never a retry: a failed transaction still fails."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": busy_timeout, "check_same_thread": False})
        _setup_sqlite(engine, busy_timeout)
        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_pre_ping=pre_ping, connect_args={"connect_timeout": 10})
    raise DatabaseError(f"unsupported database URL scheme: {url.split(':', 1)[0]}")


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for in-memory and URI forms)."""
    from sqlalchemy.engine import make_url

    if not url.startswith("sqlite"):
        return None
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _pragma(cursor: Any, pragma: str, busy_timeout: float) -> None:
    """Switching a new (still rollback-journal) file to WAL needs it to itself, and SQLite answers
    "database is locked" at once, without its busy handler, while another process is in a
    transaction on it (two `db upgrade` on a fresh file): wait and retry, up to the busy timeout."""
    import sqlite3

    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            cursor.execute(pragma)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(random.uniform(0.01, 0.05))


def _setup_sqlite(engine: Engine, busy_timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's lazy BEGIN would let a
        # read-then-write transaction race or fail with SQLITE_BUSY_SNAPSHOT).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        for pragma in SQLITE_PRAGMAS:
            _pragma(cursor, pragma, busy_timeout)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = "DEFERRED" if conn.get_execution_options().get("aiqueue_read_only") else "IMMEDIATE"
        conn.exec_driver_sql(f"BEGIN {mode}")


@contextmanager
def transaction(engine: Engine, *, write: bool) -> Iterator[Connection]:
    """One transaction; BEGIN IMMEDIATE on SQLite when it may write."""
    try:
        with engine.connect() as conn:
            if not write:
                conn = conn.execution_options(aiqueue_read_only=True)
            with conn.begin():
                yield conn
    except AiqueueError:
        raise
    except DBAPIError as exc:
        raise translate(exc, engine) from exc


def run(engine: Engine, fn: Callable[[Connection], T], *, write: bool = True) -> T:
    """Run fn in one transaction, again from the start on a deadlock or serialization failure."""
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            with engine.connect() as conn:
                if not write:
                    conn = conn.execution_options(aiqueue_read_only=True)
                with conn.begin():
                    return fn(conn)
        except AiqueueError:
            raise
        except DBAPIError as exc:
            if _sqlstate(exc) in _RETRY_SQLSTATES and attempt < _MAX_ATTEMPTS:
                time.sleep(random.uniform(0.005, 0.02) * attempt)
                continue
            raise translate(exc, engine) from exc
    raise AssertionError("unreachable")


def translate(exc: DBAPIError, engine: Engine) -> AiqueueError:
    from aiqueue.settings import mask_url  # the one masking rule: user:pw@ and ?password=

    where = mask_url(engine.url.render_as_string(hide_password=True))
    text = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
    if isinstance(exc, (OperationalError, ProgrammingError)) and (
        "no such table" in text or _sqlstate(exc) == "42P01"
    ):
        return SchemaMissingError(f"database {where} has no aiqueue schema: run `aiqueue db init`")
    if "unable to open database file" in text:
        return DatabaseError(f"cannot open database {where}: {text} (is its directory writable?)")
    if "database is locked" in text:
        return DatabaseError(f"database {where} stayed locked past the busy timeout: {text}")
    if exc.connection_invalidated or "connect" in text.lower():
        return DatabaseError(f"cannot use database {where}: {text}")
    return DatabaseError(f"database error on {where}: {text}")


def _sqlstate(exc: DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


def constraint_name(exc: DBAPIError) -> str:
    """The violated constraint or index, as PostgreSQL names it or SQLite describes it."""
    diag = getattr(exc.orig, "diag", None)
    if diag is not None and getattr(diag, "constraint_name", None):
        return str(diag.constraint_name)
    return str(exc.orig)

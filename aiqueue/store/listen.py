"""Waiting for the queue to change: LISTEN/NOTIFY on PostgreSQL, a plain sleep on SQLite.

Every state change (a job inserted, every status transition, pause and resume) sends
`pg_notify('aiqueue', '<schema>:<what>')` inside its own transaction (store.Tx), so a listener
hears it exactly when the change commits and never for one that rolled back. The listener holds a
dedicated psycopg connection in autocommit mode: waiting for notifications on a connection that
also runs queries would stall those queries (PERF-NOTES). NOTIFY is per database, not per schema,
so the payload names the schema and a listener ignores the other schemas' changes.

A lost connection (a failover, a restart, pg_terminate_backend) makes wait() raise DatabaseError;
reconnect() opens a new connection and LISTENs again (a watcher retries it with a backoff and then
reads the queue afresh, as changes made while it was away were never heard).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Protocol

from aiqueue.errors import DatabaseError

CHANNEL = "aiqueue"
_BURST = 0.05  # seconds to gather a burst of changes into one wake-up


class Listener(Protocol):
    reconnects: bool  # whether a watcher retries reconnect() after a DatabaseError

    def wait(self, timeout: float) -> bool:
        """Block until the queue changes (True) or `timeout` seconds pass (False)."""
        ...

    def reconnect(self) -> None:
        """After wait() raised DatabaseError: listen again on a new connection (or raise)."""
        ...

    def close(self) -> None: ...


class PollListener:
    """SQLite has no notifications: the caller polls every `timeout` seconds."""

    reconnects = False  # a file, no connection to lose: an error ends the watch (exit 8)

    def wait(self, timeout: float) -> bool:
        time.sleep(max(0.0, timeout))
        return False

    def reconnect(self) -> None:
        pass

    def close(self) -> None:
        pass


class PgListener:
    reconnects = True  # a watcher calls reconnect() after a lost connection

    def __init__(self, url: Any) -> None:
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.conn = self._listen()

    def _listen(self) -> Any:
        import psycopg

        conn = None
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10)
            row = conn.execute("SELECT current_schema()").fetchone()
            self.schema = str(row[0]) if row else "public"
            conn.execute(f"LISTEN {CHANNEL}")
            return conn
        except psycopg.Error as exc:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            raise DatabaseError(f"cannot listen for changes: {_first_line(exc)}") from None

    def reconnect(self) -> None:
        self.close()
        self.conn = self._listen()

    def wait(self, timeout: float) -> bool:
        import psycopg

        deadline = time.monotonic() + max(0.0, timeout)
        heard = False
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return heard
                got = False
                for notice in self.conn.notifies(timeout=left, stop_after=1):
                    got = True
                    if notice.payload.partition(":")[0] == self.schema:
                        heard = True
                if heard:
                    # Changes come in bursts (a finish frees a slot and starts the next job):
                    # gather them, so one refresh shows them all.
                    deadline = min(deadline, time.monotonic() + _BURST)
                elif not got:
                    return False
        except psycopg.Error as exc:
            raise DatabaseError(f"lost the database connection while watching: {_first_line(exc)}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing after a lost connection
            self.conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""The raw-SQL lifecycle: the physical limit the benchmark compares QueueManager with.

One lifecycle is three short transactions over the very tables, rows and indexes the store
creates (no ORM, no SQLAlchemy): (1) insert the queued job, debit the account, add the charge and
its event; (2) the global-limit gate (lock the one state row on PostgreSQL, BEGIN IMMEDIATE on
SQLite), read the used slots, pick the oldest queued job (FOR NO KEY UPDATE SKIP LOCKED on
PostgreSQL) and mark it running with a slot and a task id, with its two events; (3) keep the
webhook body in the inbox, end the job by task id freeing its slot, add its event, refund a failed
one and mark the webhook applied. Raw psycopg for PostgreSQL, sqlite3 with the same pragmas as
aiqueue/store/engine.py for SQLite.

This module is the benchmark's deliberate exception to "only store/ talks SQL": it exists to
measure what the store costs, so it must not go through the store.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from aiqueue.store.engine import SQLITE_PRAGMAS, sqlite_file

_INSERT_JOB = (
    "INSERT INTO aiqueue_jobs (user_id, tool, status, cost, inputs, outputs, created_at, updated_at)"
    " VALUES ({p}, {p}, 'queued', {p}, {p}, '[]', {p}, {p}) RETURNING id"
)
_DEBIT = (
    "UPDATE aiqueue_accounts SET balance = balance - {p}, updated_at = {p}"
    " WHERE user_id = {p} AND balance >= {p}"
)
_LEDGER = (
    "INSERT INTO aiqueue_ledger (user_id, job_id, kind, amount, created_at, note)"
    " VALUES ({p}, {p}, {p}, {p}, {p}, {p})"
)
_EVENT = (
    "INSERT INTO aiqueue_job_events (job_id, from_status, to_status, at, detail)"
    " VALUES ({p}, {p}, {p}, {p}, {p})"
)
_GATE_PG = "SELECT paused FROM aiqueue_queue_state WHERE id = 1 FOR UPDATE"
_GATE_SQLITE = "SELECT paused FROM aiqueue_queue_state WHERE id = 1"
_SLOTS = "SELECT slot FROM aiqueue_jobs WHERE slot IS NOT NULL"
_PICK = "SELECT id FROM aiqueue_jobs WHERE status = 'queued' ORDER BY id LIMIT 1"
_PICK_PG = _PICK + " FOR NO KEY UPDATE SKIP LOCKED"
_START = (
    "UPDATE aiqueue_jobs SET status = 'running', slot = {p}, started_at = {p}, updated_at = {p},"
    " provider_task_id = {p}, error = NULL WHERE id = {p} AND status = 'queued'"
)
_INBOX = (
    "INSERT INTO aiqueue_webhooks (task_id, body_sha256, body, received_at)"
    " VALUES ({p}, {p}, {p}, {p}) RETURNING id"
)
_END = (
    "UPDATE aiqueue_jobs SET status = {p}, slot = NULL, finished_at = {p}, updated_at = {p},"
    " error = {p}, outputs = {p} WHERE provider_task_id = {p} AND status = 'running'"
    " RETURNING id, user_id, cost"
)
_CREDIT = "UPDATE aiqueue_accounts SET balance = balance + {p}, updated_at = {p} WHERE user_id = {p}"
_APPLIED = (
    "UPDATE aiqueue_webhooks SET applied_at = {p}, job_id = {p}, result = {p}"
    " WHERE id = {p} AND applied_at IS NULL"
)


class RawLifecycle:
    """enqueue / claim / finish as hand-written SQL over one DBAPI connection."""

    def __init__(self, url: str, limit: int) -> None:
        self.limit = limit
        self.postgres = url.startswith("postgresql")
        p = "%s" if self.postgres else "?"
        self.sql = {
            name: text.format(p=p)
            for name, text in (
                ("insert_job", _INSERT_JOB), ("debit", _DEBIT), ("ledger", _LEDGER), ("event", _EVENT),
                ("start", _START), ("inbox", _INBOX), ("end", _END), ("credit", _CREDIT),
                ("applied", _APPLIED),
            )
        }
        self.sql["gate"] = _GATE_PG if self.postgres else _GATE_SQLITE
        self.sql["pick"] = _PICK_PG if self.postgres else _PICK
        self.conn: Any = _connect(url)
        self._serial = 0

    def close(self) -> None:
        self.conn.close()

    def _now(self) -> Any:
        now = datetime.now(timezone.utc)
        # SQLite keeps naive UTC text, exactly as the store's UTCDateTime writes it.
        return now if self.postgres else now.replace(tzinfo=None).isoformat(" ")

    def _begin(self) -> Any:
        cur = self.conn.cursor()
        if not self.postgres:
            cur.execute("BEGIN IMMEDIATE")
        return cur

    def enqueue(self, user: str, tool: str, cost: int, inputs: dict[str, str]) -> int:
        now, sql = self._now(), self.sql
        cur = self._begin()
        try:
            cur.execute(sql["insert_job"], (user, tool, cost, json.dumps(inputs), now, now))
            job_id = cur.fetchone()[0]
            cur.execute(sql["debit"], (cost, now, user, cost))
            if cur.rowcount != 1:
                raise RuntimeError(f"bench user {user} has no credits")
            cur.execute(sql["ledger"], (user, job_id, "charge", -cost, now, f"{tool} job {job_id}"))
            cur.execute(sql["event"], (job_id, None, "queued", now, "enqueued"))
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise
        return int(job_id)

    def claim(self, task_prefix: str) -> str | None:
        """Start the oldest queued job under the global limit; its task id, or None."""
        now, sql = self._now(), self.sql
        cur = self._begin()
        try:
            cur.execute(sql["gate"])
            paused = cur.fetchone()[0]
            cur.execute(_SLOTS)
            used = {row[0] for row in cur.fetchall()}
            task_id = None
            if not paused and len(used) < self.limit:
                cur.execute(sql["pick"])
                row = cur.fetchone()
                if row is not None:
                    slot = next(s for s in range(1, len(used) + 2) if s not in used)
                    self._serial += 1
                    task_id = f"{task_prefix}{self._serial:09d}"
                    cur.execute(sql["start"], (slot, now, now, task_id, row[0]))
                    if cur.rowcount == 1:
                        cur.execute(sql["event"], (row[0], "queued", "starting", now, f"claimed slot {slot}"))
                        cur.execute(sql["event"], (row[0], "starting", "running", now, f"provider task {task_id}"))
                    else:
                        task_id = None
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise
        return task_id

    def finish(self, task_id: str, body: bytes, success: bool) -> bool:
        now, sql = self._now(), self.sql
        status = "completed" if success else "failed"
        error = None if success else "node 31 (KSampler) RuntimeError: CUDA out of memory"
        outputs = json.dumps([f"https://example.invalid/{task_id}.png"] if success else [])
        cur = self._begin()
        try:
            cur.execute(sql["inbox"], (task_id, hashlib.sha256(body).hexdigest(), body.decode(), now))
            inbox_id = cur.fetchone()[0]
            cur.execute(sql["end"], (status, now, now, error, outputs, task_id))
            row = cur.fetchone()
            if row is not None:
                job_id, user, cost = row
                cur.execute(sql["event"], (job_id, "running", status, now, f"webhook: {error or 'completed'}"))
                if not success:
                    cur.execute(sql["ledger"], (user, job_id, "refund", cost, now, f"failed job {job_id}"))
                    cur.execute(sql["credit"], (cost, now, user))
                cur.execute(sql["applied"], (now, job_id, f"job {job_id} {status}", inbox_id))
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise
        return row is not None


def _connect(url: str) -> Any:
    if url.startswith("postgresql"):
        import psycopg

        return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1), connect_timeout=10)
    import sqlite3

    path = sqlite_file(url)
    if path is None:
        raise ValueError("the benchmark needs a SQLite file")
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    for pragma in SQLITE_PRAGMAS:
        conn.execute(pragma)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn  # commit()/rollback() end the explicit BEGIN IMMEDIATE (sqlite3 checks autocommit)

"""The only place that talks SQL: a Store (engine, schema, transactions) and Tx (the queries)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import and_, func, insert, text, literal, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from aiqueue.domain import HOLDS_SLOT, Job, JobEvent, LedgerEntry, LedgerKind, Status
from aiqueue.errors import ActiveJobError, ConflictError, DatabaseError, SchemaMissingError
from aiqueue.store import engine as _engine
from aiqueue.store.reads import ReadQueries
from aiqueue.store.tables import (
    ACTIVE_SQL,
    accounts,
    events,
    jobs,
    ledger,
    metadata,
    queue_state,
    webhooks,
)

T = TypeVar("T")


class Store:
    def __init__(self, url: str, *, busy_timeout: float = 30.0, pre_ping: bool = False) -> None:
        self.url = url
        self.engine = _engine.make_engine(url, busy_timeout=busy_timeout, pre_ping=pre_ping)
        self.dialect = self.engine.dialect.name
        self._file = _engine.sqlite_file(url)
        self._version_checked = False  # by the first write: see migrations.check_version

    def _check_file(self) -> None:
        # SQLite would create a missing file (and a refused command must change nothing):
        # only `db init` creates it.
        if self._file is not None:
            if not self._file.exists():
                raise SchemaMissingError(f"database file {self._file} does not exist: run `aiqueue db init`")
            self._file = None  # checked once

    def run(self, fn: Callable[[Tx], T], *, write: bool = True) -> T:
        """Run fn(tx) in one transaction (retried whole on a PostgreSQL deadlock)."""
        self._check_file()
        if write and not self._version_checked:
            return _engine.run(self.engine, lambda conn: self._first_write(conn, fn), write=True)
        return _engine.run(self.engine, lambda conn: fn(Tx(conn, self.dialect)), write=write)

    def _first_write(self, conn: Connection, fn: Callable[[Tx], T]) -> T:
        # One small query in the first write transaction of this Store: never write through a
        # schema older or newer than this code (it may lack an index the rules rely on).
        from aiqueue.store.migrations import check_version

        check_version(conn)
        self._version_checked = True
        return fn(Tx(conn, self.dialect))

    def read(self, fn: Callable[[Tx], T]) -> T:
        return self.run(fn, write=False)

    def stream(self, fn: Callable[[Tx], Iterable[T]]) -> Iterator[T]:
        """Yield rows from one read transaction without holding them all in memory."""
        self._check_file()
        with _engine.transaction(self.engine, write=False) as conn:
            yield from fn(Tx(conn, self.dialect))

    def init_schema(self) -> bool:
        """Create the head schema on a database without one; True when created now. Idempotent:
        an existing schema is left as it is (`db upgrade` moves it on; see store/migrations.py)."""
        from aiqueue.store.migrations import create_head

        self._version_checked = True  # an existing schema is reported by `db init`, not refused

        def create(tx: Tx) -> bool:
            return create_head(tx.conn, self.dialect)

        if self._file is not None:
            try:
                self._file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseError(f"cannot create {self._file.parent}: {exc.strerror}") from None
            try:  # the ledger is private: 0600 before SQLite writes a byte (-wal/-shm copy it)
                os.close(os.open(self._file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass  # an existing database keeps the mode its owner gave it
            except OSError as exc:
                raise DatabaseError(f"cannot create {self._file}: {exc.strerror}") from None
            self._file = None
        created = self.run(create)
        if self.dialect == "postgresql":
            # A never-analysed table can keep a sequential-scan plan in prepared statements.
            with self.engine.connect() as conn:
                conn.exec_driver_sql("COMMIT")
                for table in (jobs, events, accounts, ledger, queue_state, webhooks):
                    conn.exec_driver_sql(f"ANALYZE {table.name}")
        return created

    def drop_schema(self) -> None:
        with _engine.transaction(self.engine, write=True) as conn:
            metadata.drop_all(conn)

    def listener(self) -> Any:
        """A store.listen.Listener: wakes on every committed change on PostgreSQL; on SQLite
        it only sleeps (the caller polls)."""
        from aiqueue.store import listen

        self._check_file()
        return listen.PgListener(self.engine.url) if self.dialect == "postgresql" else listen.PollListener()

    def dispose(self) -> None:
        self.engine.dispose()


class Tx(ReadQueries):
    """Queries over one open transaction. Every state change is a guarded update, and tells
    listeners (`status --watch`) through NOTIFY in the same transaction on PostgreSQL."""

    def __init__(self, conn: Connection, dialect: str) -> None:
        self.conn = conn
        self.dialect = dialect

    # --- jobs -----------------------------------------------------------------------------

    def insert_job(
        self, user: str, tool: str, cost: int, inputs: dict[str, str], now: datetime
    ) -> Job:
        values = {
            "user_id": user,
            "tool": tool,
            "status": Status.QUEUED.value,
            "cost": cost,
            "inputs": json.dumps(inputs, ensure_ascii=False),
            "outputs": "[]",
            "created_at": now,
            "updated_at": now,
        }
        # ON CONFLICT DO NOTHING on the active-user index, not a savepoint: two round trips fewer.
        insert_job = _insert_or_nothing(self.dialect, jobs, ["user_id"], text(ACTIVE_SQL))
        row = self.conn.execute(insert_job.values(values).returning(*jobs.c)).one_or_none()
        if row is None:
            active = self.active_job_of(user)
            what = f" (job {active.id}, {active.status})" if active else ""
            raise ActiveJobError(
                f"user {user!r} already has an active job{what}",
                user=user,
                job_id=None if active is None else active.id,
            )
        self._notify(f"job {row.id} queued")
        return _job(row)

    def get_job(self, job_id: int, *, for_update: bool = False) -> Job | None:
        query = select(jobs).where(jobs.c.id == job_id)
        if for_update and self.dialect == "postgresql":
            query = query.with_for_update()
        row = self.conn.execute(query).one_or_none()
        if row is None:
            return None
        job = _job(row)
        if job.status is Status.QUEUED:
            job = _with_position(job, self.position(job.id))
        return job

    def get_job_by_task(self, task_id: str) -> Job | None:
        row = self.conn.execute(select(jobs).where(jobs.c.provider_task_id == task_id)).one_or_none()
        return None if row is None else _job(row)

    def active_job_of(self, user: str) -> Job | None:
        row = self.conn.execute(
            select(jobs).where(jobs.c.user_id == user, jobs.c.status.in_(["queued", "starting", "running"]))
        ).one_or_none()
        return None if row is None else _job(row)

    def position(self, job_id: int) -> int:
        return int(
            self.conn.execute(
                select(func.count()).select_from(jobs).where(jobs.c.status == "queued", jobs.c.id <= job_id)
            ).scalar_one()
        )

    def transition(
        self,
        job_id: int,
        sources: Sequence[Status],
        target: Status,
        now: datetime,
        **values: Any,
    ) -> Job | None:
        """Move the job to `target` only if it is in one of `sources`. None when it was not."""
        if "outputs" in values:
            values["outputs"] = json.dumps(values["outputs"])
        if target not in HOLDS_SLOT:
            values.setdefault("slot", None)
        row = self.conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status.in_([s.value for s in sources]))
            .values(status=target.value, updated_at=now, **values)
            .returning(*jobs.c)
        ).one_or_none()
        if row is None:
            return None
        self._notify(f"job {job_id} {target.value}")
        return _job(row)

    def _notify(self, what: str) -> None:
        if self.dialect == "postgresql":
            self.conn.execute(select(func.pg_notify("aiqueue", func.current_schema() + ":" + what)))

    def set_job_fields(self, job_id: int, status: Status, now: datetime, **values: Any) -> bool:
        """Change fields other than the status, still guarded by the expected status."""
        result = self.conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, jobs.c.status == status.value)
            .values(updated_at=now, **values)
        )
        return result.rowcount == 1

    # --- slots and the FIFO ---------------------------------------------------------------

    def lock_gate(self) -> bool:
        """Serialise claims (PostgreSQL: lock the one state row; SQLite's BEGIN IMMEDIATE already
        did). Returns whether the queue is paused."""
        query = select(queue_state.c.paused).where(queue_state.c.id == 1)
        if self.dialect == "postgresql":
            query = query.with_for_update()
        paused = self.conn.execute(query).scalar_one_or_none()
        if paused is None:
            raise ConflictError("queue state row is missing: run `aiqueue db init`")
        return bool(paused)

    def set_paused(self, paused: bool) -> bool:
        """Pause or resume; True when that changed anything."""
        result = self.conn.execute(
            update(queue_state).where(queue_state.c.id == 1, queue_state.c.paused != paused).values(paused=paused)
        )
        if result.rowcount == 1:
            self._notify("paused" if paused else "resumed")
        return result.rowcount == 1

    def is_paused(self) -> bool:
        return bool(self.conn.execute(select(queue_state.c.paused).where(queue_state.c.id == 1)).scalar_one_or_none())

    def used_slots(self) -> list[int]:
        return list(self.conn.execute(select(jobs.c.slot).where(jobs.c.slot.is_not(None))).scalars())

    def oldest_queued(self) -> Job | None:
        # A one-value range ordered by (status, id), not `status = 'queued' ORDER BY id`: with
        # statistics, PostgreSQL walks the primary key past every finished job to the queue's
        # head (228 ms at a million jobs); this order only the (status, id) index gives.
        query = (select(jobs).where(jobs.c.status.between("queued", "queued"))
                 .order_by(jobs.c.status, jobs.c.id).limit(1))
        if self.dialect == "postgresql":
            # NO KEY UPDATE: do not skip a row only because a foreign-key check share-locks it.
            query = query.with_for_update(skip_locked=True, key_share=True)
        row = self.conn.execute(query).one_or_none()
        return None if row is None else _job(row)

    def holding_slots(self) -> list[Job]:
        rows = self.conn.execute(select(jobs).where(jobs.c.slot.is_not(None)).order_by(jobs.c.slot))
        return [_job(r) for r in rows]

    def queued(self, limit: int | None = None) -> list[Job]:
        # A one-value range, not an equality: see store.reads._pinned (PostgreSQL would walk the
        # primary key past every finished job to reach the queue).
        query = select(jobs).where(jobs.c.status.between("queued", "queued")).order_by(jobs.c.status, jobs.c.id)
        if limit is not None:
            query = query.limit(limit)
        return [_with_position(_job(r), i) for i, r in enumerate(self.conn.execute(query), start=1)]

    def count_queued(self) -> int:
        return int(
            self.conn.execute(select(func.count()).select_from(jobs).where(jobs.c.status == "queued")).scalar_one()
        )

    def stale(self, cutoff: datetime) -> list[Job]:
        # Sorted here, not in SQL: at most max_concurrent rows, and an ORDER BY id makes SQLite
        # scan the whole table in rowid order instead of using the partial slot index.
        rows = self.conn.execute(select(jobs).where(jobs.c.slot.is_not(None), jobs.c.started_at < cutoff))
        return sorted((_job(r) for r in rows), key=lambda job: job.id)

    # --- events ---------------------------------------------------------------------------

    def add_event(
        self, job_id: int, source: Status | None, target: Status, now: datetime, detail: str | None
    ) -> None:
        self.conn.execute(
            insert(events).values(
                job_id=job_id,
                from_status=None if source is None else source.value,
                to_status=target.value,
                at=now,
                detail=detail,
            )
        )

    def events_of(self, job_id: int) -> list[JobEvent]:
        rows = self.conn.execute(select(events).where(events.c.job_id == job_id).order_by(events.c.id))
        return [
            JobEvent(
                id=r.id,
                job_id=r.job_id,
                from_status=None if r.from_status is None else Status(r.from_status),
                to_status=Status(r.to_status),
                at=r.at,
                detail=r.detail,
            )
            for r in rows
        ]

    # --- credits --------------------------------------------------------------------------

    def balance(self, user: str) -> int:
        value = self.conn.execute(
            select(accounts.c.balance).where(accounts.c.user_id == user)
        ).scalar_one_or_none()
        return int(value or 0)

    def debit(self, user: str, amount: int, now: datetime) -> bool:
        """Take `amount` only if the balance covers it (a conditional update: no overdraft race)."""
        result = self.conn.execute(
            update(accounts)
            .where(accounts.c.user_id == user, accounts.c.balance >= amount)
            .values(balance=accounts.c.balance - amount, updated_at=now)
        )
        return result.rowcount == 1

    def credit(self, user: str, amount: int, now: datetime) -> int:
        result = self.conn.execute(
            update(accounts)
            .where(accounts.c.user_id == user)
            .values(balance=accounts.c.balance + amount, updated_at=now)
            .returning(accounts.c.balance)
        ).scalar_one_or_none()
        if result is not None:
            return int(result)
        self.conn.execute(insert(accounts).values(user_id=user, balance=amount, updated_at=now))
        return amount

    def set_balance(self, user: str, balance: int, now: datetime) -> None:
        result = self.conn.execute(
            update(accounts).where(accounts.c.user_id == user).values(balance=balance, updated_at=now)
        )
        if result.rowcount == 0:
            self.conn.execute(insert(accounts).values(user_id=user, balance=balance, updated_at=now))

    def reset_balance_to_ledger(self, user: str, now: datetime) -> bool:
        """Set the cached balance to the ledger's sum (locking the account row first, so that a
        concurrent charge either lands before the sum is read or waits for us)."""
        lock = select(accounts.c.balance).where(accounts.c.user_id == user)
        if self.dialect == "postgresql":
            lock = lock.with_for_update()
        current = self.conn.execute(lock).scalar_one_or_none()
        total = int(
            self.conn.execute(
                select(func.coalesce(func.sum(ledger.c.amount), 0)).where(ledger.c.user_id == user)
            ).scalar_one()
        )
        if total < 0 or current == total:
            return False
        self.set_balance(user, total, now)
        return True

    def add_ledger(
        self,
        user: str,
        job_id: int | None,
        kind: LedgerKind,
        amount: int,
        now: datetime,
        note: str | None = None,
    ) -> LedgerEntry | None:
        """Append an entry; None when the job already has an entry of that kind (the unique
        index decides, so a second charge or refund is impossible)."""
        row = self.conn.execute(
            _insert_or_nothing(self.dialect, ledger, ["job_id", "kind"], text("job_id IS NOT NULL"))
            .values(user_id=user, job_id=job_id, kind=kind.value, amount=amount, created_at=now, note=note)
            .returning(*ledger.c)
        ).one_or_none()
        return None if row is None else _entry(row)

    def ledger_entries(
        self, user: str | None = None, job_id: int | None = None, limit: int | None = None
    ) -> list[LedgerEntry]:
        query = select(ledger).order_by(ledger.c.id)
        if user is not None:
            query = query.where(ledger.c.user_id == user)
        if job_id is not None:
            query = query.where(ledger.c.job_id == job_id)
        if limit is not None:  # the newest `limit` entries, still oldest first
            newest = query.order_by(None).order_by(ledger.c.id.desc()).limit(limit)
            return [_entry(r) for r in reversed(list(self.conn.execute(newest)))]
        return [_entry(r) for r in self.conn.execute(query)]

    # --- the webhook inbox -----------------------------------------------------------------

    def lock_task(self, task_id: str) -> None:
        """Serialise the transactions that link a provider task to a job: the one that stores
        the task id and the one that keeps its webhook. Under READ COMMITTED neither would see
        the other's uncommitted row, and the webhook would stay unmatched for ever. SQLite's
        BEGIN IMMEDIATE already serialises them."""
        if self.dialect == "postgresql":
            self.conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(task_id, 0))))

    def store_webhook(self, task_id: str, digest: str, body: str, now: datetime) -> tuple[int, bool]:
        """Keep a webhook body (once per distinct body). Returns (inbox id, already applied)."""
        new_id = self.conn.execute(
            _insert_or_nothing(self.dialect, webhooks, ["body_sha256"])
            .values(task_id=task_id, body_sha256=digest, body=body, received_at=now)
            .returning(webhooks.c.id)
        ).scalar_one_or_none()
        if new_id is not None:
            return int(new_id), False
        row = self.conn.execute(
            select(webhooks.c.id, webhooks.c.applied_at).where(webhooks.c.body_sha256 == digest)
        ).one()
        return int(row.id), row.applied_at is not None

    def mark_webhook(self, inbox_id: int, job_id: int | None, result: str, now: datetime) -> None:
        self.conn.execute(
            update(webhooks)
            .where(webhooks.c.id == inbox_id, webhooks.c.applied_at.is_(None))
            .values(applied_at=now, job_id=job_id, result=result)
        )

    def unapplied_webhooks(self, task_id: str | None = None) -> list[Row[Any]]:
        query = select(webhooks).where(webhooks.c.applied_at.is_(None)).order_by(webhooks.c.id)
        if task_id is not None:
            query = query.where(webhooks.c.task_id == task_id)
        return list(self.conn.execute(query))

    # --- the audit (each query streams; joins run in the database) -----------------------

    def jobs_missing_refund(self) -> Iterator[Row[Any]]:
        refund = ledger.alias("refund")
        query = (
            select(jobs.c.id, jobs.c.user_id, jobs.c.status, jobs.c.cost)
            .select_from(
                jobs.outerjoin(refund, and_(refund.c.job_id == jobs.c.id, refund.c.kind == "refund"))
            )
            .where(jobs.c.status.in_(["failed", "cancelled"]), refund.c.id.is_(None))
            .order_by(jobs.c.id)
        )
        yield from self._stream(query)

    def refunds_on_unrefundable(self) -> Iterator[Row[Any]]:
        query = (
            select(jobs.c.id, jobs.c.user_id, jobs.c.status, ledger.c.amount)
            .select_from(jobs.join(ledger, and_(ledger.c.job_id == jobs.c.id, ledger.c.kind == "refund")))
            .where(jobs.c.status.not_in(["failed", "cancelled"]))
            .order_by(jobs.c.id)
        )
        yield from self._stream(query)

    def jobs_missing_charge(self) -> Iterator[Row[Any]]:
        charge = ledger.alias("charge")
        query = (
            select(jobs.c.id, jobs.c.user_id, jobs.c.status, jobs.c.cost)
            .select_from(
                jobs.outerjoin(charge, and_(charge.c.job_id == jobs.c.id, charge.c.kind == "charge"))
            )
            .where(charge.c.id.is_(None))
            .order_by(jobs.c.id)
        )
        yield from self._stream(query)

    def wrong_amounts(self) -> Iterator[Row[Any]]:
        """Charges that are not -cost, refunds that are not +cost, entries under another user."""
        query = (
            select(jobs.c.id, jobs.c.user_id, jobs.c.cost, ledger.c.kind, ledger.c.amount, ledger.c.user_id.label("entry_user"))
            .select_from(jobs.join(ledger, ledger.c.job_id == jobs.c.id))
            .where(
                (ledger.c.user_id != jobs.c.user_id)
                | and_(ledger.c.kind == "charge", ledger.c.amount != -jobs.c.cost)
                | and_(ledger.c.kind == "refund", ledger.c.amount != jobs.c.cost)
            )
            .order_by(jobs.c.id)
        )
        yield from self._stream(query)

    def balance_mismatches(self) -> Iterator[Row[Any]]:
        sums = (
            select(ledger.c.user_id, func.sum(ledger.c.amount).label("total"))
            .group_by(ledger.c.user_id)
            .subquery()
        )
        left = (
            select(accounts.c.user_id, accounts.c.balance, func.coalesce(sums.c.total, 0).label("total"))
            .select_from(accounts.outerjoin(sums, sums.c.user_id == accounts.c.user_id))
            .where(accounts.c.balance != func.coalesce(sums.c.total, 0))
        )
        orphans = (
            select(sums.c.user_id, literal(0).label("balance"), sums.c.total)
            .select_from(sums.outerjoin(accounts, accounts.c.user_id == sums.c.user_id))
            .where(accounts.c.user_id.is_(None), sums.c.total != 0)
        )
        yield from self._stream(left.union_all(orphans))

    def _stream(self, query: Any) -> Iterator[Row[Any]]:
        result = self.conn.execution_options(yield_per=1000).execute(query)
        yield from result


def _insert_or_nothing(dialect: str, table: Any, columns: list[str], where: Any = None) -> Any:
    """INSERT ... ON CONFLICT (columns) [WHERE partial-index predicate] DO NOTHING: a duplicate
    on that one index returns no row; any other violation still raises."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert(table).on_conflict_do_nothing(index_elements=columns, index_where=where)


def _is(exc: IntegrityError, index: str, sqlite_columns: str) -> bool:
    name = _engine.constraint_name(exc)
    return name == index or sqlite_columns in name


def _job(row: Row[Any]) -> Job:
    return Job(
        id=row.id,
        user=row.user_id,
        tool=row.tool,
        status=Status(row.status),
        cost=int(row.cost),
        inputs=json.loads(row.inputs),
        provider_task_id=row.provider_task_id,
        error=row.error,
        outputs=json.loads(row.outputs),
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        slot=row.slot,
    )


def _with_position(job: Job, position: int) -> Job:
    return replace(job, position=position)


def _entry(row: Row[Any]) -> LedgerEntry:
    return LedgerEntry(
        id=row.id,
        user=row.user_id,
        job_id=row.job_id,
        kind=LedgerKind(row.kind),
        amount=int(row.amount),
        created_at=row.created_at,
        note=row.note,
    )

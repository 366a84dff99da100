"""Read-side queries for status, `status --user` and `jobs` (a mixin of store.Tx).

Each one is bounded and index-backed, so it costs the same with a million finished jobs:
- recent run durations: (tool, status, id) or (status, id), newest first, LIMIT n;
- counts of the jobs finished within a window: the covering (finished_at, status) index;
- the oldest queued job: (status, id), LIMIT 1;
- a user's jobs: (user_id, id), newest first, LIMIT n;
- `jobs` listings: one branch per status, each newest first with LIMIT n over its own index,
  merged (no branch ever sorts a whole status); `--since` first finds the first id created since
  then over (created_at) and bounds every walk with it; positions of queued rows come a chunk
  at a time (a count, then a walk over the chunk's span), not from a count per row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, literal_column, select, union_all
from sqlalchemy.engine import Connection

from aiqueue.domain import Job, Status
from aiqueue.store.tables import accounts, jobs

if TYPE_CHECKING:
    from sqlalchemy.sql import Select


POSITION_CHUNK = 500  # listed jobs numbered per query


class ReadQueries:
    conn: Connection
    dialect: str

    def recent_durations(self, tool: str | None, count: int) -> list[float]:
        """started -> finished seconds of the last `count` completed jobs (of `tool`, or of all)."""
        query = select(jobs.c.started_at, jobs.c.finished_at)
        if tool is not None:
            # SQLite seeks (tool, status) and reads it in id order only on equalities; given the
            # range it sorts every completed job instead (1.1 s at a million jobs).
            first = jobs.c.tool == tool if self.dialect == "sqlite" else self._pinned(jobs.c.tool, tool)
            query = query.where(first, jobs.c.status == Status.COMPLETED.value)
            query = query.order_by(jobs.c.tool.desc(), jobs.c.status.desc(), jobs.c.id.desc())
        else:
            query = query.where(self._pinned(jobs.c.status, Status.COMPLETED.value))
            query = query.order_by(jobs.c.status.desc(), jobs.c.id.desc())
        rows = self.conn.execute(query.limit(count))
        return [
            (r.finished_at - r.started_at).total_seconds()
            for r in rows
            if r.started_at is not None and r.finished_at is not None and r.finished_at >= r.started_at
        ]

    def finished_counts(self, since: datetime) -> dict[str, int]:
        rows = self.conn.execute(
            select(jobs.c.status, func.count())
            .where(jobs.c.finished_at >= since)
            # SQLite (no statistics) would rather walk the whole (status, id) index for the GROUP
            # BY than range-scan the covering (finished_at, status) one: 450 ms instead of 20 on a
            # million jobs. A unary + keeps the grouping off that index.
            .group_by(literal_column("+aiqueue_jobs.status") if self.dialect == "sqlite" else jobs.c.status)
        )
        return {str(status): int(n) for status, n in rows}

    def oldest_queued_at(self) -> datetime | None:
        return self.conn.execute(  # type: ignore[no-any-return]
            select(jobs.c.created_at).where(self._pinned(jobs.c.status, Status.QUEUED.value))
            .order_by(jobs.c.status, jobs.c.id).limit(1)
        ).scalar_one_or_none()

    def queued_tools(self, limit: int) -> list[str]:
        """The tools of the first `limit` queued jobs, in FIFO order (only what an estimate needs)."""
        return list(self.conn.execute(
            select(jobs.c.tool).where(self._pinned(jobs.c.status, Status.QUEUED.value))
            .order_by(jobs.c.status, jobs.c.id).limit(limit)
        ).scalars())

    def has_account(self, user: str) -> bool:
        return self.conn.execute(select(accounts.c.user_id).where(accounts.c.user_id == user)).first() is not None

    def jobs_of_user(self, user: str, limit: int) -> list[Job]:
        from aiqueue.store import _job

        rows = self.conn.execute(
            select(jobs).where(self._pinned(jobs.c.user_id, user)).order_by(jobs.c.user_id.desc(), jobs.c.id.desc())
            .limit(limit)
        )
        return [_job(r) for r in rows]

    def list_jobs(
        self,
        statuses: Sequence[Status] = (),
        user: str | None = None,
        tool: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> Iterator[Job]:
        """Jobs newest first, filtered; streamed (no limit) or at most `limit`. Queued ones
        carry their FIFO position."""
        from aiqueue.store import _job

        first_id = None
        if since is not None:
            # The first id created since then bounds every walk below (exactly: a row created
            # since then has an id >= it), so none walks back past the window over (created_at).
            # min(id + 0): over the created_at range, not a walk of the whole primary key (SQLite
            # would otherwise scan ids upward until one is recent enough).
            first_id = self.conn.execute(select(func.min(jobs.c.id + 0)).where(jobs.c.created_at >= since)).scalar()
            if first_id is None:
                return

        def branch(status: Status | None) -> Select[Any]:
            # Walk the index that leads with the most selective filter, newest first: (user_id,
            # id), else (tool, status, id), else (status, id), else the primary key.
            query = select(jobs)
            if user is not None:
                query = query.where(self._pinned(jobs.c.user_id, user)).order_by(jobs.c.user_id.desc())
                if status is not None:
                    query = query.where(jobs.c.status == status.value)
                if tool is not None:
                    query = query.where(jobs.c.tool == tool)
            elif tool is not None and status is not None:
                query = query.where(self._pinned(jobs.c.tool, tool), jobs.c.status == status.value)
                query = query.order_by(jobs.c.tool.desc(), jobs.c.status.desc())
            elif status is not None:
                query = query.where(self._pinned(jobs.c.status, status.value)).order_by(jobs.c.status.desc())
            elif tool is not None:
                query = query.where(jobs.c.tool == tool)
            if since is not None:
                query = query.where(jobs.c.id >= first_id, jobs.c.created_at >= since)
            query = query.order_by(jobs.c.id.desc())
            return query if limit is None else query.limit(limit)

        wanted = list(dict.fromkeys(statuses))
        if user is None and limit is not None and (tool is not None or len(wanted) > 1):
            # One index walk per status, each stopping after `limit` rows; the newest of those few
            # rows are picked here (an ORDER BY over the union would make SQLite sort each arm).
            parts = [select(branch(s).subquery()) for s in (wanted or list(Status))]
            rows = sorted(self.conn.execute(union_all(*parts)), key=lambda r: r.id, reverse=True)[:limit]
            yield from self.with_positions(_job(r) for r in rows)
            return
        query = branch(wanted[0] if len(wanted) == 1 else None)
        if len(wanted) > 1:
            query = query.where(jobs.c.status.in_([s.value for s in wanted]))
        result = self.conn.execution_options(yield_per=1000).execute(query)
        yield from self.with_positions(_job(r) for r in result)

    def with_positions(self, newest_first: Iterable[Job]) -> Iterator[Job]:
        """Give queued jobs (arriving newest first) their FIFO positions, a chunk at a time: one
        count reaches the chunk's newest queued job, one walk of (status, id) over the chunk's
        id span numbers the rest (a million-row stream does not run a query per row)."""
        from dataclasses import replace
        from itertools import islice

        rows = iter(newest_first)
        placed: tuple[int, int] | None = None  # (id, position) of the oldest queued job so far
        while chunk := list(islice(rows, POSITION_CHUNK)):
            queued = [job.id for job in chunk if job.status is Status.QUEUED]
            positions: dict[int, int] = {}
            if queued:
                high, low = queued[0], queued[-1]
                if placed is None:
                    top = self._queued_between(None, high)
                else:
                    top = placed[1] - self._queued_between(high, placed[0])
                span = self.conn.execute(
                    select(jobs.c.id)
                    .where(self._pinned(jobs.c.status, Status.QUEUED.value), jobs.c.id.between(low, high))
                    .order_by(jobs.c.status.desc(), jobs.c.id.desc())
                ).scalars()
                positions = {job_id: top - offset for offset, job_id in enumerate(span)}
                placed = (low, positions.get(low, top))
            for job in chunk:
                yield replace(job, position=positions.get(job.id)) if job.status is Status.QUEUED else job

    def _pinned(self, column: Any, value: Any) -> Any:
        """`column = value`, written on PostgreSQL as a one-value range. With an equality,
        PostgreSQL takes the column as a constant and may answer `ORDER BY id LIMIT n` by walking
        the primary key and filtering, which skips every other row first (200 ms past a million
        finished jobs to reach the queued ones); a range keeps the order on (column, ..., id),
        which only that index gives. SQLite has no statistics to be misled by, and an equality
        lets it use every column of a composite index."""
        return column.between(value, value) if self.dialect == "postgresql" else column == value

    def _queued_between(self, low: int | None, high: int) -> int:
        """Queued jobs with low < id <= high."""
        query = select(func.count()).select_from(jobs).where(jobs.c.status == Status.QUEUED.value, jobs.c.id <= high)
        if low is not None:
            query = query.where(jobs.c.id > low)
        return int(self.conn.execute(query).scalar_one())


"""`aiqueue bench`: whole job lifecycles through QueueManager against the raw-SQL limit of the
same database, in one run.

Each side runs N lifecycles (enqueue with its charge -> claim a slot and submit -> finish by
webhook, a `fail_rate` share failing and refunded) in K spawned worker processes, every job for a
different user (one active job per user), and is timed from the moment all its workers are ready.
The QueueManager side submits to a fake RunningHub on 127.0.0.1 (one per worker, in-process);
the raw side is the database alone (aiqueue/bench/raw.py), so the ratio is what the whole product
path costs against the physical limit of the store.

The global limit: a lifecycle never waits for the provider (the fake answers at once), so a
limit below K would measure the workers queueing behind each other, not the engine. The default
limit is max(3, K); both sides apply the same gate (locked state row / BEGIN IMMEDIATE), count
the slots in use and refuse a claim at the limit.

By default each side gets a fresh database of its own (a new PostgreSQL schema in the configured
database, or a temporary SQLite file next to the configured one), removed afterwards. In place,
it refuses a database that holds jobs unless forced, and deletes its own users' rows at the end.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiqueue.errors import ConflictError, UsageError

Progress = Callable[[str, int, int], None]  # (side, jobs done, jobs in all)
SIDES = ("raw_sql", "manager")


@dataclass(frozen=True)
class OpStats:
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> OpStats:
        ordered = sorted(seconds)

        def pct(q: float) -> float:
            if not ordered:
                return 0.0
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

        return cls(count=len(ordered), p50_ms=pct(0.50), p95_ms=pct(0.95), p99_ms=pct(0.99))

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "p99_ms": self.p99_ms}


@dataclass(frozen=True)
class SideResult:
    side: str
    finished: int
    failed: int
    seconds: float
    jobs_per_second: float
    operations: dict[str, OpStats]
    left_active: int  # jobs not finished at the end (0 unless something is wrong)
    provider_ms_per_job: float = 0.0  # time inside the provider's submit, per job (manager side)

    def to_dict(self) -> dict[str, Any]:
        return {
            "finished": self.finished, "failed": self.failed, "seconds": round(self.seconds, 3),
            "jobs_per_second": round(self.jobs_per_second, 1), "left_active": self.left_active,
            "provider_ms_per_job": round(self.provider_ms_per_job, 3),
            "operations": {op: s.to_dict() for op, s in self.operations.items()},
        }


@dataclass(frozen=True)
class BenchResult:
    backend: str
    jobs: int
    workers: int
    limit: int
    fail_rate: float
    where: str  # "fresh" or "in place"
    manager: SideResult
    raw_sql: SideResult
    cleaned_up: bool

    @property
    def ratio(self) -> float:
        return self.manager.jobs_per_second / self.raw_sql.jobs_per_second if self.raw_sql.jobs_per_second else 0.0

    @property
    def ratio_without_provider(self) -> float:
        """The ratio with the manager's wall time less its share inside the provider's submit
        (the raw side never calls a provider): what the engine alone costs against raw SQL."""
        m = self.manager
        seconds = m.seconds - m.provider_ms_per_job * m.finished / 1000 / self.workers
        if seconds <= 0 or not self.raw_sql.jobs_per_second:
            return 0.0
        return m.finished / seconds / self.raw_sql.jobs_per_second

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "jobs": self.jobs, "workers": self.workers, "limit": self.limit,
            "fail_rate": self.fail_rate, "where": self.where, "ratio": round(self.ratio, 3),
            "ratio_without_provider": round(self.ratio_without_provider, 3),
            "manager": self.manager.to_dict(), "raw_sql": self.raw_sql.to_dict(),
            "cleaned_up": self.cleaned_up,
        }


def run_bench(
    url: str,
    *,
    jobs: int = 2000,
    workers: int = 1,
    fail_rate: float = 0.1,
    limit: int | None = None,
    in_place: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    seed: int | None = None,
) -> BenchResult:
    """Run both sides against the database at `url` and return their figures."""
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1 (got {jobs})")
    if not 1 <= workers <= 64:
        raise UsageError(f"--workers must be between 1 and 64 (got {workers})")
    if not 0.0 <= fail_rate <= 1.0:
        raise UsageError(f"--fail-rate must be between 0 and 1 (got {fail_rate})")
    limit = max(3, workers) if limit is None else limit
    if not 1 <= limit <= 1000:
        raise UsageError(f"--limit must be between 1 and 1000 (got {limit})")
    token = secrets.randbelow(10**6)
    seed = token if seed is None else seed
    backend = "postgresql" if url.startswith("postgresql") else "sqlite"
    results: dict[str, SideResult] = {}
    cleaned = True
    if in_place:
        _check_in_place(url, force)
    for side in SIDES:
        prefix = f"bench-{token:06d}-{side[0]}-"
        with _sandbox(url, side, in_place) as (side_url, cleanup_ok):
            results[side] = _run_side(side, side_url, jobs, workers, limit, fail_rate, seed, token,
                                      prefix, progress)
            if in_place:
                _delete_bench_rows(side_url, prefix)
        cleaned = cleaned and cleanup_ok()
    return BenchResult(backend=backend, jobs=jobs, workers=workers, limit=limit, fail_rate=fail_rate,
                       where="in place" if in_place else "fresh", manager=results["manager"],
                       raw_sql=results["raw_sql"], cleaned_up=cleaned)


def _check_in_place(url: str, force: bool) -> None:
    from aiqueue.store import Store
    from aiqueue.store.bulk import count_jobs

    store = Store(url)
    try:
        paused = store.read(lambda tx: tx.is_paused())  # also: schema missing -> exit 8
        total = count_jobs(store)
    finally:
        store.dispose()
    if paused:
        raise ConflictError("the queue is paused: the benchmark would wait for ever (aiqueue resume)")
    if total and not force:
        raise ConflictError(
            f"the database holds {total} jobs: a benchmark in place would claim and finish real jobs; "
            "run without --in-place (a fresh schema/file), or add --force"
        )


@contextlib.contextmanager
def _sandbox(url: str, side: str, in_place: bool) -> Iterator[tuple[str, Callable[[], bool]]]:
    """The database one side runs in, and a check that it was removed afterwards."""
    if in_place:
        yield url, lambda: True
        return
    if url.startswith("postgresql"):
        import psycopg

        raw = url.replace("postgresql+psycopg://", "postgresql://", 1)
        schema = f"aiqueue_bench_{secrets.token_hex(6)}"
        with psycopg.connect(raw, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        # Our own search_path replaces any the configured URL sets.
        base, _, query = url.partition("?")
        kept = [part for part in query.split("&") if part and not part.startswith("options=")]
        kept.append(f"options=-csearch_path%3D{schema}")

        def gone() -> bool:
            with psycopg.connect(raw, autocommit=True, connect_timeout=10) as conn:
                row = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
            return row is None

        try:
            yield f"{base}?{'&'.join(kept)}", gone
        finally:
            with psycopg.connect(raw, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        return
    from aiqueue.store.engine import sqlite_file

    configured = sqlite_file(url)
    # Next to the configured file, so that fsync costs what it costs there (not a tmpfs).
    parent = configured.parent if configured is not None and configured.parent.is_dir() else None
    directory = tempfile.mkdtemp(prefix=f"aiqueue-bench-{side}-", dir=parent)
    try:
        yield f"sqlite:///{os.path.join(directory, 'bench.db')}", lambda: not os.path.exists(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run_side(
    side: str, url: str, jobs: int, workers: int, limit: int, fail_rate: float, seed: int, token: int,
    prefix: str, progress: Progress | None,
) -> SideResult:
    import multiprocessing

    from aiqueue.bench.workers import COST, OPERATIONS, run_worker, user_name
    from aiqueue.store import Store
    from aiqueue.store.bulk import analyze, count_jobs, grant_users

    shares = [jobs // workers + (1 if i < jobs % workers else 0) for i in range(workers)]
    store = Store(url)
    try:
        store.init_schema()
        users = [user_name(prefix, w, i) for w, n in enumerate(shares) for i in range(n)]
        grant_users(store, users, COST * 10)
        analyze(store)
    finally:
        store.dispose()

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers + 1)
    done = ctx.Value("q", 0)
    queue = ctx.Queue()
    procs = []
    for w, n in enumerate(shares):
        plan = {"url": url, "worker": w, "jobs": n, "limit": limit, "fail_rate": fail_rate,
                "seed": seed * 1000 + w, "token": token, "user_prefix": prefix}
        proc = ctx.Process(target=run_worker, args=(side, plan, barrier, done, queue), daemon=True)
        proc.start()
        procs.append(proc)
    reports: list[dict[str, Any]] = []
    try:
        barrier.wait(timeout=180)
        while len(reports) < workers:
            try:
                reports.append(queue.get(timeout=0.1))
            except Exception:
                if not any(p.is_alive() for p in procs) and queue.empty():
                    break
            if reports and "error" in reports[-1]:
                break
            if progress is not None:
                progress(side, int(done.value), jobs)
    except Exception as exc:  # a broken barrier: a worker died in its set-up
        while not queue.empty():
            reports.append(queue.get())
        if not any("error" in r for r in reports):
            raise RuntimeError(f"{side} benchmark workers did not start: {exc!r}") from exc
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    errors = [r for r in reports if "error" in r]
    if errors or len(reports) < workers:
        detail = errors[0]["error"].strip().splitlines()[-1] if errors else "a worker exited without a report"
        raise RuntimeError(f"{side} benchmark worker failed: {detail}")
    if progress is not None:
        progress(side, int(done.value), jobs)

    latency = {op: [x for r in reports for x in r["latency"][op]] for op in OPERATIONS}
    finished = sum(r["finished"] for r in reports)
    seconds = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    store = Store(url)
    try:
        left = count_jobs(store, active=True)
    finally:
        store.dispose()
    return SideResult(
        side=side, finished=finished, failed=sum(r["failed"] for r in reports), seconds=seconds,
        jobs_per_second=finished / seconds if seconds > 0 else 0.0,
        operations={op: OpStats.of(latency[op]) for op in OPERATIONS}, left_active=left,
        provider_ms_per_job=sum(r.get("provider_seconds", 0.0) for r in reports) * 1000 / max(finished, 1),
    )


def _delete_bench_rows(url: str, prefix: str) -> None:
    from aiqueue.store import Store
    from aiqueue.store.bulk import delete_users

    store = Store(url)
    try:
        delete_users(store, prefix)
    finally:
        store.dispose()


"""`aiqueue bench --scale`: the same commands on a nearly empty database and on a big one.

Both databases are fresh (PostgreSQL schemas in the configured database, or temporary SQLite
files), filled by aiqueue/store/bulk.py, and dropped afterwards. Each operation is the manager
call its command makes, timed `repeat` times (median), so the figures are the database work, not
the interpreter's start-up: status (first 20 of the queue, with the total), status JOB_ID for the
last queued job (the deepest position), enqueue (a new user), process-next (claims and submits
one job; the limit is 1), finish (a webhook, with the queue paused so that no refill is timed),
cleanup (nothing stale). refund-audit then runs over the whole big database in a child process,
which reports its time, rows per second and peak RSS (beside an idle child's, for comparison).
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from dataclasses import dataclass
from typing import Any

from aiqueue.bench import Progress, _sandbox

TOOL = "upscale_image"  # the generator's tool
EMPTY = (200, 20)  # finished, queued jobs in the "nearly empty" database


@dataclass(frozen=True)
class OpScale:
    name: str
    empty_ms: float
    big_ms: float

    @property
    def ratio(self) -> float:
        return self.big_ms / self.empty_ms if self.empty_ms else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "empty_ms": round(self.empty_ms, 3), "big_ms": round(self.big_ms, 3),
                "ratio": round(self.ratio, 2)}


@dataclass(frozen=True)
class AuditScale:
    rows: int
    seconds: float
    rows_per_second: float
    peak_rss_mb: float
    idle_rss_mb: float
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "seconds": round(self.seconds, 3), "rows_per_second": round(self.rows_per_second),
                "peak_rss_mb": round(self.peak_rss_mb, 1), "idle_rss_mb": round(self.idle_rss_mb, 1), "ok": self.ok}


@dataclass(frozen=True)
class ScaleResult:
    backend: str
    big_jobs: int
    generate_seconds: float
    operations: list[OpScale]
    audit: AuditScale

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "big_jobs": self.big_jobs, "generate_seconds": round(self.generate_seconds, 1),
                "operations": [op.to_dict() for op in self.operations], "audit": self.audit.to_dict()}


def run_scale(url: str, *, finished: int = 1_000_000, queued: int = 100_000, repeat: int = 15,
              progress: Progress | None = None) -> ScaleResult:
    """Time the commands on a nearly empty and on a big database (both fresh, both removed)."""
    # Both databases exist before anything is timed, and the two are timed in alternate rounds:
    # this machine drifts by 15-25% within minutes, so only figures taken side by side compare.
    with _sandbox(url, "scale-empty", False) as (empty_url, _), \
            _sandbox(url, "scale-big", False) as (big_url, _):
        _fill(empty_url, *EMPTY)
        generated = _fill(big_url, finished, queued)
        if progress is not None:
            progress("generate", 1, 1)
        timings = _time_ops({"empty": empty_url, "big": big_url}, repeat)
        audit = _audit_in_child(big_url, generated["rows"])
        if progress is not None:
            progress("measure", 1, 1)
    ops = [OpScale(name, timings["empty"][name], timings["big"][name]) for name in OPS]
    return ScaleResult(backend="postgresql" if url.startswith("postgresql") else "sqlite",
                       big_jobs=finished + queued, generate_seconds=generated["seconds"], operations=ops, audit=audit)


def _fill(url: str, finished: int, queued: int) -> dict[str, Any]:
    from aiqueue.store import Store
    from aiqueue.store.bulk import generate

    store = Store(url)
    try:
        store.init_schema()
        stats = generate(store, finished, queued, tool=TOOL)
    finally:
        store.dispose()
    return {"rows": sum(stats.rows[t] for t in ("aiqueue_jobs", "aiqueue_ledger")), "seconds": stats.seconds}


def _manager(url: str, limit: int = 1) -> tuple[Any, Any]:
    from aiqueue.bench.workers import API_KEY
    from aiqueue.manager import QueueManager
    from aiqueue.provider.fake_server import FakeRunningHub
    from aiqueue.provider.runninghub import RunningHubClient
    from aiqueue.settings import InputSpec, Settings, ToolSpec
    from aiqueue.store import Store

    hub = FakeRunningHub(api_key=API_KEY).start()
    tool = ToolSpec(TOOL, "1990000000000000001", 5, {"image": InputSpec("image", "12", "image", None)})
    settings = Settings(database_url=url, max_concurrent=limit, base_url=hub.base_url, api_key=API_KEY,
                        request_timeout=10.0, tools={TOOL: tool})
    manager = QueueManager(Store(url), settings, RunningHubClient(hub.base_url, API_KEY, timeout=10.0))
    return manager, hub


OPS = ("status", "status JOB_ID", "enqueue", "process-next", "finish", "cleanup")


def _time_ops(urls: dict[str, str], repeat: int) -> dict[str, dict[str, float]]:
    from datetime import timedelta

    from aiqueue.store.bulk import last_queued_id

    built = {name: _manager(url) for name, url in urls.items()}
    samples = {name: {op: [] for op in OPS} for name in urls}  # type: dict[str, dict[str, list[float]]]

    def round_of(name: str, i: int) -> None:
        manager, hub = built[name]
        store, deepest = manager.store, last_queued_id(manager.store)

        def timed(op: str, fn: Any) -> Any:
            started = time.perf_counter()
            value = fn()
            samples[name][op].append((time.perf_counter() - started) * 1000)
            return value

        timed("status", lambda: manager.status(limit=20))
        timed("status JOB_ID", lambda: manager.job_detail(deepest))
        user = f"scale-new-{i:04d}"
        manager.grant(user, 100)
        timed("enqueue", lambda: manager.enqueue(user, TOOL, {"image": "api/x.png"}, start=False))
        store.run(lambda tx: tx.set_paused(False))
        started = timed("process-next", manager.process_next).started
        store.run(lambda tx: tx.set_paused(True))  # the finish below must not refill (limit 1)
        for job in started:
            body = hub.finish_task(job.provider_task_id, success=i % 2 == 0, deliver=False)
            timed("finish", lambda body=body: manager.finish_webhook(body))
        timed("cleanup", lambda: manager.cleanup(older_than=timedelta(minutes=10)))
        store.run(lambda tx: tx.set_paused(False))

    try:
        for i in range(repeat + 1):
            for name in urls:
                round_of(name, i)
    finally:
        for manager, hub in built.values():
            manager.store.dispose()
            hub.stop()
    # The first round warms connections, prepared statements and caches: left out.
    return {name: {op: statistics.median(v[1:] or v) for op, v in ops.items()} for name, ops in samples.items()}


def _audit_child(url: str, idle: bool, out: Any) -> None:
    import resource

    from aiqueue.bench.workers import API_KEY
    from aiqueue.manager import QueueManager
    from aiqueue.settings import Settings
    from aiqueue.store import Store

    manager = QueueManager(Store(url), Settings(database_url=url, api_key=API_KEY))
    manager.balance("nobody")  # connect: the idle child stops here
    started = time.perf_counter()
    ok = True if idle else manager.refund_audit().ok
    seconds = time.perf_counter() - started
    out.put((seconds, ok, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    manager.store.dispose()


def _audit_in_child(url: str, rows: int) -> AuditScale:
    ctx = multiprocessing.get_context("spawn")
    figures = []
    for idle in (True, False):
        out = ctx.Queue()
        proc = ctx.Process(target=_audit_child, args=(url, idle, out))
        proc.start()
        figures.append(out.get(timeout=3600))
        proc.join()
    (_, _, idle_rss), (seconds, ok, peak_rss) = figures
    return AuditScale(rows=rows, seconds=seconds, rows_per_second=rows / seconds if seconds else 0.0,
                      peak_rss_mb=peak_rss, idle_rss_mb=idle_rss, ok=ok)

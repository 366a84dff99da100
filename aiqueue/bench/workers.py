"""The benchmark's worker processes (spawned): one runs lifecycles through QueueManager, the other
through the raw-SQL baseline. Both wait at a barrier after their set-up, so the parent times only
the lifecycles, and both report per-operation latencies in seconds.

Each worker runs its share of jobs one after the other: enqueue (charged), then claim + submit,
then finish by webhook, then the fill that follows a finish (the slot just freed is offered to the
oldest queued job, which may be another worker's; whoever claims a job finishes it).
"""

from __future__ import annotations

import random
import time
import traceback
from collections import deque
from typing import Any

API_KEY = "bench-key-0123456789abcdef0123456789"
TOOL = "bench_upscale"
COST = 5
OPERATIONS = ("enqueue", "claim_submit", "finish")


def user_name(prefix: str, worker: int, index: int) -> str:
    return f"{prefix}w{worker}-{index:07d}"


def run_worker(side: str, plan: dict[str, Any], barrier: Any, done: Any, results: Any) -> None:
    """Process entry point: run one worker of `side` ("manager" or "raw") and put its report on
    `results` (or {"error": traceback})."""
    try:
        worker = _ManagerWorker(plan) if side == "manager" else _RawWorker(plan)
        try:
            barrier.wait(timeout=120)
            report = worker.run(done)
        finally:
            worker.close()
        results.put(report)
    except BaseException:
        results.put({"error": traceback.format_exc(), "worker": plan["worker"]})


class _Base:
    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.rng = random.Random(plan["seed"])
        self.latency: dict[str, list[float]] = {op: [] for op in OPERATIONS}
        self.finished = 0
        self.failed = 0

    def users(self) -> list[str]:
        return [user_name(self.plan["user_prefix"], self.plan["worker"], i) for i in range(self.plan["jobs"])]

    def report(self, started: float) -> dict[str, Any]:
        return {"worker": self.plan["worker"], "started": started, "ended": time.monotonic(),
                "latency": self.latency, "finished": self.finished, "failed": self.failed}

    def _count(self, done: Any, success: bool) -> None:
        self.finished += 1
        self.failed += not success
        with done.get_lock():
            done.value += 1


class _ManagerWorker(_Base):
    def __init__(self, plan: dict[str, Any]) -> None:
        super().__init__(plan)
        from aiqueue.manager import QueueManager
        from aiqueue.provider.fake_server import FakeRunningHub
        from aiqueue.provider.runninghub import RunningHubClient
        from aiqueue.settings import InputSpec, Settings, ToolSpec
        from aiqueue.store import Store

        # One fake RunningHub per worker, in this process: the provider side scales with the
        # workers, and a task's webhook body comes from the fake without a network hop.
        self.hub = FakeRunningHub(api_key=API_KEY).start()
        # The fake numbers tasks from the clock in ms x 1000: fakes started in the same instant
        # by sibling workers would hand out the same task ids. Give each worker its own range.
        self.hub._next_id = 1_990_000_000_000_000_000 + (plan["token"] % 10**6) * 10**9 + plan["worker"] * 10**7
        tool = ToolSpec(TOOL, "1990000000000000001", COST,
                        {"image": InputSpec("image", "12", "image", None)})
        settings = Settings(
            database_url=plan["url"], max_concurrent=plan["limit"], base_url=self.hub.base_url,
            webhook_url="http://127.0.0.1:9/hooks/runninghub", api_key=API_KEY, request_timeout=10.0,
            tools={TOOL: tool},
        )
        self.client = RunningHubClient(settings.base_url, API_KEY, timeout=10.0)
        # Time spent inside the provider's submit (HTTP to the fake), reported apart: the raw side
        # has no provider, so this share of the gap is the provider's, not the engine's.
        submit, self.provider_seconds = self.client.submit, 0.0

        def timed_submit(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return submit(*args, **kwargs)
            finally:
                self.provider_seconds += time.perf_counter() - started

        self.client.submit = timed_submit  # type: ignore[method-assign]
        self.manager = QueueManager(Store(plan["url"]), settings, self.client)
        self.manager.status(limit=1)  # connect before the clock starts

    def close(self) -> None:
        self.manager.store.dispose()
        close = getattr(self.client, "close", None)
        if close is not None:
            close()
        self.hub.stop()

    def run(self, done: Any) -> dict[str, Any]:
        m, lat, perf = self.manager, self.latency, time.perf_counter
        mine: deque[Any] = deque()
        fail_rate = self.plan["fail_rate"]
        started = time.monotonic()
        for user in self.users():
            t = perf()
            m.enqueue(user, TOOL, {"image": "api/bench.png"}, start=False)
            lat["enqueue"].append(perf() - t)
            t = perf()
            mine.extend(m.process_next().started)
            lat["claim_submit"].append(perf() - t)
            while mine:
                job = mine.popleft()
                success = self.rng.random() >= fail_rate
                body = self.hub.finish_task(job.provider_task_id, success=success, deliver=False)
                t = perf()
                result = m.finish_webhook(body)
                lat["finish"].append(perf() - t)
                if result.changed:
                    self._count(done, success)
                mine.extend(result.process.started)
        report = self.report(started)
        report["provider_seconds"] = self.provider_seconds
        return report


class _RawWorker(_Base):
    def __init__(self, plan: dict[str, Any]) -> None:
        super().__init__(plan)
        from aiqueue.bench.raw import RawLifecycle

        self.raw = RawLifecycle(plan["url"], plan["limit"])

    def close(self) -> None:
        self.raw.close()

    def run(self, done: Any) -> dict[str, Any]:
        raw, lat, perf = self.raw, self.latency, time.perf_counter
        fail_rate = self.plan["fail_rate"]
        prefix = f"17{self.plan['token'] % 1_000_000:06d}{self.plan['worker'] % 100:02d}"  # + 9 digits
        started = time.monotonic()
        for user in self.users():
            t = perf()
            raw.enqueue(user, TOOL, COST, {"image": "api/bench.png"})
            lat["enqueue"].append(perf() - t)
            t = perf()
            task = raw.claim(prefix)
            lat["claim_submit"].append(perf() - t)
            while task is not None:
                success = self.rng.random() >= fail_rate
                body = _webhook_body(task, success)
                t = perf()
                changed = raw.finish(task, body, success)
                if changed:
                    self._count(done, success)
                task = raw.claim(prefix)  # the fill after a finish, as the manager does
                lat["finish"].append(perf() - t)
        return self.report(started)


def _webhook_body(task_id: str, success: bool) -> bytes:
    """A v1 TASK_END body of the same shape and size as the fake RunningHub's."""
    import json

    if success:
        data: Any = [{"fileUrl": f"https://example.invalid/{task_id}.png", "fileType": "png",
                      "taskCostTime": "1", "nodeId": "9"}]
        envelope = {"code": 0, "msg": "success", "data": data}
    else:
        envelope = {"code": 805, "msg": "APIKEY_TASK_STATUS_ERROR",
                    "data": {"failedReason": {"node_name": "KSampler", "exception_message": "CUDA out of memory",
                                              "node_id": "31", "exception_type": "RuntimeError"}}}
    return json.dumps({"event": "TASK_END", "taskId": task_id,
                       "eventData": json.dumps(envelope, separators=(",", ":"))}).encode()

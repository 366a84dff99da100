"""Soak: many jobs through QueueManager with real concurrency, provider faults and worker crashes.

    python -m tests.soak --backend sqlite|postgres [--jobs 10000] [--users 200] [--workers 4]
                         [--fault-rate 0.1] [--crash-rate 0.001] [--seed N] [--pg-url URL] [--json]

The parent creates its own database (a temporary SQLite file, or a fresh PostgreSQL schema that
it drops at the end), starts a FakeRunningHub on 127.0.0.1, grants credits, then runs K worker
PROCESSES (spawned, each with its own Store and RunningHubClient over the same database). Each
worker loops: enqueue (with start) for an idle user, process_next, finish running jobs with
webhook bodies (success or failure, sometimes duplicated, sometimes held back and delivered later
in another order, sometimes two different endings for one task), cancel, and cleanup with a short
`older_than`. Before submits it scripts faults into the fake over /__fake__/script. It crashes
itself with os._exit, mostly at the manager's named crash points (QueueManager.fault, inert in the
product, replaced in the worker process only), and the parent starts a replacement. A thread in
the parent plays the provider finishing fresh tasks on its own: their webhooks often arrive before
the submitter has stored the task id (the inbox path).

When N jobs exist and none is active, the workers stop; the parent drains whatever is left, then
reports jobs by final status, faults, crashes, check_invariants() violations, refund_audit(),
webhooks lost from the inbox, and p50/p95/p99 latency per operation. Exit status 0 only when
everything held.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from tests.conftest import API_KEY, PG_URL, write_config
from tests.invariants import check_invariants, max_claimed_slot, replay_max_holders

OPERATIONS = ("enqueue", "process_next", "finish_webhook", "cancel", "cleanup", "status")
FAULT_KINDS = ("busy", "reject:803", "http500", "lost", "drop", "late:0.3")
EXPECTED_SLUGS = {"active_job", "insufficient_credits", "wrong_state", "conflict"}
LIMIT = 3
CRASH_EXIT = 77
DEADLINE_EXIT = 3
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- the worker process ---------------------------------------------------------------------


def _manager(url: str, config: str, timeout: float) -> Any:
    from aiqueue.manager import QueueManager
    from aiqueue.provider.runninghub import RunningHubClient
    from aiqueue.settings import load_settings
    from aiqueue.store import Store

    settings = load_settings(config, db_url=url, env={"RUNNINGHUB_API_KEY": API_KEY})
    client = RunningHubClient(settings.base_url, API_KEY, timeout=timeout)
    return QueueManager(Store(settings.database_url), settings, client)


def _admin(hub_url: str, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        hub_url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with _OPENER.open(request, timeout=10) as answer:
        return dict(json.loads(answer.read()))


class _Worker:
    def __init__(self, plan: dict[str, Any], reserved: Any, stop: Any) -> None:
        self.plan = plan
        self.reserved = reserved
        self.stop = stop
        self.rng = random.Random(plan["seed"])
        self.m = _manager(plan["url"], plan["config"], plan["timeout"])
        self.hub = plan["hub_url"]
        self.stale = timedelta(seconds=plan["stale_seconds"])
        self.pending: list[bytes] = []  # webhook bodies held back, delivered later in another order
        self.serial = 0
        self.stats: dict[str, Any] = {
            "worker": plan["index"], "incarnation": plan["incarnation"], "crash": None,
            "latency": {op: [] for op in OPERATIONS}, "outcomes": Counter(), "saw": Counter(),
            "scripted": Counter(), "unexpected": 0, "samples": [],
        }

    # Crash points: a worker dies here with probability crash_rate, exactly as if killed.
    def fault(self, point: str) -> None:
        if self.rng.random() < self.plan["crash_rate"]:
            self.crash(point)

    def crash(self, point: str) -> None:
        if point == "enqueue:after-charge":  # inside the enqueue transaction: it rolls back
            with self.reserved.get_lock():
                self.reserved.value -= 1
        self.stats["crash"] = point
        self.save()
        os._exit(CRASH_EXIT)

    def save(self) -> None:
        path = Path(self.plan["stats_dir"]) / f"w{self.plan['index']}-{self.plan['incarnation']}.json"
        path.with_suffix(".tmp").write_text(json.dumps(self.stats), encoding="utf-8")
        path.with_suffix(".tmp").replace(path)

    def call(self, op: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
        """Run one manager operation, timed. (True, result) or (False, error slug)."""
        from aiqueue.errors import AiqueueError

        started = time.perf_counter()
        try:
            value = fn(*args, **kwargs)
        except AiqueueError as exc:
            slug = exc.slug if exc.slug in EXPECTED_SLUGS else "unexpected"
            self._failed(op, slug, exc)
            return False, slug
        except Exception as exc:  # noqa: BLE001 - a soak reports every failure, it does not stop
            self._failed(op, "unexpected", exc)
            return False, "unexpected"
        finally:
            self.stats["latency"][op].append(round((time.perf_counter() - started) * 1000, 3))
        self.stats["outcomes"][f"{op}:ok"] += 1
        self._note_process(getattr(value, "process", None) if op != "process_next" else value)
        return True, value

    def _failed(self, op: str, slug: str, exc: Exception) -> None:
        self.stats["outcomes"][f"{op}:{slug}"] += 1
        if slug == "unexpected":
            self.stats["unexpected"] += 1
            if len(self.stats["samples"]) < 10:
                self.stats["samples"].append(f"{op}: {type(exc).__name__}: {str(exc)[:300]}")

    def _note_process(self, result: Any) -> None:
        if result is None or not hasattr(result, "started"):
            return
        for name in ("started", "requeued", "failed", "unknown"):
            self.stats["saw"][f"submit_{name}"] += len(getattr(result, name))

    def run(self) -> int:
        from aiqueue.manager import QueueManager

        QueueManager.fault = staticmethod(self.fault)  # type: ignore[assignment]
        try:
            code = self._loop()
        except Exception:  # noqa: BLE001
            self.stats["unexpected"] += 1
            self.stats["samples"].append("worker loop: " + traceback.format_exc()[-1500:])
            code = 1
        self.save()
        return code

    def _loop(self) -> int:
        from aiqueue.domain import Status

        plan = self.plan
        while not self.stop.is_set():
            if time.time() > plan["deadline"]:
                return DEADLINE_EXIT
            if self.rng.random() < plan["crash_rate"] / 4:  # most crashes hit the named points
                self.crash("between-operations")
            ok, status = self.call("status", self.m.status)
            if not ok:
                continue
            holding, queued = status.running, status.queued
            done = self.reserved.value >= plan["jobs"]
            if done and not holding and not queued and not self.pending:
                return 0
            now = self.m.clock.now()
            stuck = [j for j in holding if j.started_at and now - j.started_at > self.stale]
            running = [j for j in holding if j.status is Status.RUNNING and j.provider_task_id]
            free = len(holding) < LIMIT
            roll = self.rng.random()
            if stuck and roll < 0.25:
                self.maybe_inject(bool(queued))
                self.cleanup()
            elif roll < 0.30 and not done:
                self.maybe_inject(free)
                self.enqueue({j.user for j in holding + queued})
            elif roll < 0.62 and running:
                self.maybe_inject(bool(queued))
                self.finish(self.rng.choice(running).provider_task_id)
            elif roll < 0.72:
                self.maybe_inject(free and bool(queued))
                self.call("process_next", self.m.process_next)
            elif roll < 0.76 and (holding or queued):
                job = self.rng.choice(holding + queued)
                self.maybe_inject(bool(queued) and (free or job in holding))
                self.call("cancel", self.m.cancel, job.id, reason="soak cancel")
            elif roll < 0.79:
                self.cleanup()
            elif self.pending:
                self.deliver_pending(len(self.pending) if done else 3)
            else:
                time.sleep(0.002)
            if len(self.pending) > 12:
                self.deliver_pending(6)
        return 0

    def maybe_inject(self, may_submit: bool) -> None:
        """Before an operation that may submit, script one fault with probability fault_rate (it
        hits the next submit of any worker; a later script replaces one not yet used)."""
        if not may_submit or self.rng.random() >= self.plan["fault_rate"]:
            return
        kind = self.rng.choice(self.plan["fault_kinds"])
        _admin(self.hub, "/__fake__/script", {"submits": [kind]})
        self.stats["scripted"][kind] += 1

    def enqueue(self, active: set[str]) -> None:
        idle = [u for u in self.plan["users"] if u not in active]
        if not idle:
            return
        with self.reserved.get_lock():
            if self.reserved.value >= self.plan["jobs"]:
                return
            self.reserved.value += 1
        self.serial += 1
        tag = f"w{self.plan['index']}i{self.plan['incarnation']}n{self.serial}"
        if self.rng.random() < 0.8:
            tool, inputs = "upscale_image", {"image": f"{tag}.png"}
        else:
            tool, inputs = "upscale_video", {"video": f"{tag}.mp4"}
        ok, slug = self.call("enqueue", self.m.enqueue, self.rng.choice(idle), tool, inputs)
        if not ok and slug != "unexpected":  # refused: nothing was created
            with self.reserved.get_lock():
                self.reserved.value -= 1

    def finish(self, task_id: str) -> None:
        success = self.rng.random() < 0.75
        bodies = [self.webhook(task_id, success)]
        if self.rng.random() < 0.15:  # two different endings: the first one in must win
            bodies.append(self.webhook(task_id, not success))
            self.rng.shuffle(bodies)
        if self.rng.random() < 0.2:  # a duplicate delivery
            bodies.insert(self.rng.randrange(len(bodies) + 1), bodies[0])
        if self.rng.random() < 0.25:  # held back: delivered later, in another order
            self.pending.extend(bodies)
            return
        for body in bodies:
            self.call("finish_webhook", self.m.finish_webhook, body)

    def webhook(self, task_id: str, success: bool) -> bytes:
        answer = _admin(self.hub, "/__fake__/finish", {"taskId": task_id, "success": success, "deliver": False})
        return str(answer["webhook"]).encode("utf-8")

    def deliver_pending(self, count: int) -> None:
        self.rng.shuffle(self.pending)
        batch, self.pending = self.pending[:count], self.pending[count:]
        for body in batch:
            self.call("finish_webhook", self.m.finish_webhook, body)

    def cleanup(self) -> None:
        ok, result = self.call("cleanup", self.m.cleanup, older_than=self.stale)
        if ok:
            for name in ("expired", "completed", "failed"):
                self.stats["saw"][f"cleanup_{name}"] += len(getattr(result, name))


def _worker_main(plan: dict[str, Any], reserved: Any, stop: Any) -> None:
    sys.exit(_Worker(plan, reserved, stop).run())


# --- the parent ---------------------------------------------------------------------------


def _counting_hub() -> Any:
    """A FakeRunningHub that counts the submit behaviour each submit actually got."""
    from aiqueue.provider.fake_server import FakeRunningHub

    class CountingHub(FakeRunningHub):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.applied: Counter[str] = Counter()

        def _next_behaviour(self) -> str:
            behaviour = super()._next_behaviour()
            with self._lock:
                self.applied[behaviour] += 1
            return behaviour

    return CountingHub(api_key=API_KEY)


class _ProviderWebhooks(threading.Thread):
    """The provider finishing fresh tasks by itself: the webhook is applied at once, usually
    before (or while) the submitting worker stores the task id."""

    def __init__(self, hub: Any, manager: Any, rate: float, seed: int) -> None:
        super().__init__(name="soak-provider-webhooks", daemon=True)
        self.hub, self.m, self.rate = hub, manager, rate
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        self.latency: list[float] = []
        self.sent = 0
        self.errors: list[str] = []

    def run(self) -> None:
        seen = 0
        while not self.halt.wait(0.02):
            ids = list(self.hub.tasks)  # insertion order; the fake never forgets a task
            fresh, seen = ids[seen:], len(ids)
            for task_id in fresh:
                if self.rng.random() >= self.rate:
                    continue
                body = self.hub.finish_task(task_id, success=self.rng.random() < 0.8, deliver=False)
                started = time.perf_counter()
                try:
                    self.m.finish_webhook(body)
                    self.sent += 1
                except Exception as exc:  # noqa: BLE001
                    self.errors.append(f"provider webhook: {type(exc).__name__}: {str(exc)[:300]}")
                self.latency.append(round((time.perf_counter() - started) * 1000, 3))


def _pg_schema(base_url: str) -> tuple[str, Callable[[], None]]:
    """tests.conftest.make_pg_schema_url, for any server URL (--pg-url)."""
    import psycopg

    schema = f"soak_{uuid.uuid4().hex[:12]}"
    raw = base_url.replace("+psycopg", "")
    with psycopg.connect(raw, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")

    def drop() -> None:
        with psycopg.connect(raw, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    sep = "&" if "?" in base_url else "?"
    return f"{base_url}{sep}options=-csearch_path%3D{schema}", drop


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def _drain(m: Any, hub: Any, stale: timedelta, seconds: float) -> bool:
    """Finish what the workers left: webhooks for running jobs, cleanup, process_next."""
    from aiqueue.domain import Status

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        status = m.status()
        if not status.running and not status.queued:
            return True
        for job in status.running:
            if job.status is Status.RUNNING and job.provider_task_id:
                m.finish_webhook(hub.finish_task(job.provider_task_id, success=True, deliver=False))
        m.cleanup(older_than=stale)
        m.process_next()
        time.sleep(0.1)
    return False


def _database_facts(url: str) -> dict[str, Any]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            by_status = dict(conn.execute(text("SELECT status, count(*) FROM aiqueue_jobs GROUP BY status")).all())
            unmatched = conn.execute(text(
                "SELECT count(*) FROM aiqueue_webhooks w WHERE w.applied_at IS NULL AND NOT EXISTS "
                "(SELECT 1 FROM aiqueue_jobs j WHERE j.provider_task_id = w.task_id)"
            )).scalar_one()
            # Kept but never applied although a job has that task id: a webhook the inbox lost.
            lost = conn.execute(text(
                "SELECT w.id, w.task_id, j.id, j.status FROM aiqueue_webhooks w "
                "JOIN aiqueue_jobs j ON j.provider_task_id = w.task_id WHERE w.applied_at IS NULL"
            )).all()
            inbox = conn.execute(text("SELECT count(*) FROM aiqueue_webhooks")).scalar_one()
    finally:
        engine.dispose()
    return {
        "by_status": {str(k): int(v) for k, v in by_status.items()},
        "unmatched": int(unmatched),
        "inbox": int(inbox),
        "lost": [f"inbox {r[0]} task {r[1]} -> job {r[2]} ({r[3]})" for r in lost],
    }


def run_soak(opts: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="aiqueue-soak-"))
    stats_dir = tmp / "stats"
    stats_dir.mkdir()
    if opts.backend == "sqlite":
        url, drop = f"sqlite:///{tmp / 'soak.db'}", (lambda: None)
    else:
        url, drop = _pg_schema(opts.pg_url)
    hub = _counting_hub().start()
    ctx = mp.get_context("spawn")
    procs: dict[int, tuple[Any, int]] = {}
    managers: list[Any] = []
    try:
        config = str(write_config(tmp / "soak.toml", hub.base_url, max_concurrent=LIMIT))
        setup = _manager(url, config, opts.timeout)
        managers.append(setup)
        setup.init_db()
        rng = random.Random(opts.seed)
        users = [f"soak-user-{i:04d}" for i in range(opts.users)]
        per_user = max(1, math.ceil(opts.jobs / opts.users))
        for i, user in enumerate(users):  # one user in 20 can afford only a few jobs
            setup.grant(user, 30 if i % 20 == 19 else 20 * per_user * 3 + 100)
        stale = timedelta(seconds=opts.stale_seconds)
        reserved, stop = ctx.Value("i", 0), ctx.Event()
        started = time.monotonic()
        deadline = time.time() + opts.max_seconds

        def spawn(index: int, incarnation: int) -> None:
            plan = {
                "index": index, "incarnation": incarnation, "seed": rng.randrange(2**32), "url": url,
                "config": config, "hub_url": hub.base_url, "stats_dir": str(stats_dir), "users": users,
                "jobs": opts.jobs, "fault_rate": opts.fault_rate, "fault_kinds": list(opts.faults),
                "crash_rate": opts.crash_rate, "stale_seconds": opts.stale_seconds,
                "timeout": opts.timeout, "deadline": deadline,
            }
            proc = ctx.Process(target=_worker_main, args=(plan, reserved, stop), name=f"soak-w{index}")
            proc.start()
            procs[index] = (proc, incarnation)

        provider = _ProviderWebhooks(hub, _manager(url, config, opts.timeout), opts.early_rate, opts.seed)
        managers.append(provider.m)
        provider.start()
        for index in range(opts.workers):
            spawn(index, 0)
        crashes, failures = 0, []
        while procs:
            for index, (proc, incarnation) in list(procs.items()):
                if proc.exitcode is None:
                    continue
                proc.join()
                del procs[index]
                if proc.exitcode == CRASH_EXIT and not stop.is_set():
                    crashes += 1
                    spawn(index, incarnation + 1)
                elif proc.exitcode == CRASH_EXIT:
                    crashes += 1
                elif proc.exitcode != 0:
                    failures.append(f"worker {index}.{incarnation} exited {proc.exitcode}"
                                    + (" (deadline)" if proc.exitcode == DEADLINE_EXIT else ""))
            if time.time() > deadline + 30:  # the workers' own deadline passed long ago
                stop.set()
                for proc, _ in procs.values():
                    proc.kill()
            time.sleep(0.05)
        provider.halt.set()
        provider.join(timeout=10)
        drained = _drain(setup, hub, stale, seconds=max(30.0, 4 * opts.stale_seconds))
        elapsed = time.monotonic() - started

        facts = _database_facts(url)
        violations = check_invariants(url, LIMIT)
        audit = setup.refund_audit()
        peak, top_slot = replay_max_holders(url), max_claimed_slot(url)
    finally:
        for proc, _ in procs.values():
            proc.kill()
        hub.stop()
        for m in managers:
            m.store.dispose()
        drop()

    return _report(opts, stats_dir, hub, provider, facts, violations, audit, peak, top_slot,
                   crashes, failures, drained, elapsed, tmp)


def _report(opts: argparse.Namespace, stats_dir: Path, hub: Any, provider: _ProviderWebhooks,
            facts: dict[str, Any], violations: list[str], audit: Any, peak: int, top_slot: int,
            crashes: int, failures: list[str], drained: bool, elapsed: float, tmp: Path) -> dict[str, Any]:
    latency: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    outcomes: Counter[str] = Counter()
    saw: Counter[str] = Counter()
    scripted: Counter[str] = Counter()
    crash_points: Counter[str] = Counter()
    unexpected, samples = len(provider.errors), list(provider.errors[:10])
    for path in sorted(stats_dir.glob("*.json")):
        stats = json.loads(path.read_text(encoding="utf-8"))
        for op, values in stats["latency"].items():
            latency[op].extend(values)
        outcomes.update(stats["outcomes"])
        saw.update(stats["saw"])
        scripted.update(stats["scripted"])
        if stats["crash"]:
            crash_points[stats["crash"]] += 1
        unexpected += stats["unexpected"]
        samples.extend(stats["samples"][: max(0, 10 - len(samples))])
    latency["finish_webhook"].extend(provider.latency)
    shutil.rmtree(tmp, ignore_errors=True)

    applied = dict(hub.applied)
    injected = {kind: applied.get(kind, 0) for kind in opts.faults}
    by_status = facts["by_status"]
    terminal = sum(by_status.get(s, 0) for s in ("completed", "failed", "cancelled"))
    total = sum(by_status.values())
    table = {}
    for op, values in latency.items():
        values.sort()
        table[op] = {"count": len(values), "p50": _percentile(values, 50), "p95": _percentile(values, 95),
                     "p99": _percentile(values, 99), "max": values[-1] if values else 0.0}
    ok = (not violations and audit.ok and not facts["lost"] and drained and terminal == total >= opts.jobs
          and not unexpected and not failures)
    return {
        "backend": opts.backend, "workers": opts.workers, "users": opts.users, "limit": LIMIT,
        "seed": opts.seed, "fault_rate": opts.fault_rate, "crash_rate": opts.crash_rate,
        "stale_seconds": opts.stale_seconds, "jobs_target": opts.jobs, "jobs_total": total,
        "jobs_terminal": terminal, "jobs_by_status": by_status, "drained": drained,
        "faults_injected": injected, "faults_injected_total": sum(injected.values()),
        "faults_scripted": dict(scripted), "submits": sum(applied.values()),
        "manager_saw": dict(saw), "provider_webhooks_sent": provider.sent,
        "worker_crashes": crashes, "crash_points": dict(crash_points), "worker_failures": failures,
        "refusals": {k: v for k, v in sorted(outcomes.items()) if not k.endswith((":ok", ":unexpected"))},
        "unexpected_errors": unexpected, "unexpected_samples": samples,
        "invariant_violations": len(violations), "violations": violations[:50],
        "refund_audit_ok": audit.ok, "audit_problems": [p.detail for p in audit.problems][:20],
        "peak_slots_held": peak, "max_slot_claimed": top_slot,
        "inbox_webhooks": facts["inbox"], "unmatched_webhooks": facts["unmatched"],
        "lost_webhooks": len(facts["lost"]), "lost_webhook_samples": facts["lost"][:10],
        "latency_ms": table, "elapsed_s": round(elapsed, 1),
        "jobs_per_s": round(terminal / elapsed, 2) if elapsed else 0.0, "ok": ok,
    }


def render(r: dict[str, Any]) -> str:
    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "none"

    s = r["jobs_by_status"]
    lines = [
        f"aiqueue soak: backend={r['backend']} workers={r['workers']} users={r['users']} limit={r['limit']} "
        f"seed={r['seed']} fault-rate={r['fault_rate']} crash-rate={r['crash_rate']} stale={r['stale_seconds']}s",
        f"jobs done: {r['jobs_terminal']} of {r['jobs_total']} terminal (target {r['jobs_target']}): "
        f"completed {s.get('completed', 0)}, failed {s.get('failed', 0)}, cancelled {s.get('cancelled', 0)}; "
        f"still active {r['jobs_total'] - r['jobs_terminal']}; drained {r['drained']}",
        f"faults injected: {r['faults_injected_total']} of {r['submits']} submits ({counts(r['faults_injected'])}); "
        f"scripted {sum(r['faults_scripted'].values())}",
        f"manager saw: {counts(r['manager_saw'])}",
        f"provider webhooks (early, from the provider itself): {r['provider_webhooks_sent']}",
        f"worker crashes: {r['worker_crashes']} ({counts(r['crash_points'])})",
        f"worker failures: {len(r['worker_failures'])} {r['worker_failures'] or ''}".rstrip(),
        f"refusals (expected answers): {counts(r['refusals'])}",
        f"unexpected errors: {r['unexpected_errors']}",
        *[f"  {x}" for x in r["unexpected_samples"]],
        f"invariant violations: {r['invariant_violations']}",
        *[f"  {v}" for v in r["violations"][:20]],
        f"refund_audit ok: {r['refund_audit_ok']}",
        *[f"  {p}" for p in r["audit_problems"]],
        f"peak slots held (replayed): {r['peak_slots_held']}; highest slot claimed: {r['max_slot_claimed']} "
        f"(limit {r['limit']})",
        f"webhook inbox: {r['inbox_webhooks']} kept, {r['unmatched_webhooks']} unmatched (no job has the task), "
        f"{r['lost_webhooks']} lost (never applied although the job is known)",
        *[f"  {x}" for x in r["lost_webhook_samples"]],
        f"{'latency ms':<16}{'count':>8}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>10}",
    ]
    for op, t in r["latency_ms"].items():
        lines.append(f"  {op:<14}{t['count']:>8}{t['p50']:>9.1f}{t['p95']:>9.1f}{t['p99']:>9.1f}{t['max']:>10.1f}")
    lines.append(f"throughput: {r['jobs_terminal']} jobs in {r['elapsed_s']} s = {r['jobs_per_s']} jobs/s")
    lines.append(f"RESULT: {'OK' if r['ok'] else 'FAILED'}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("sqlite", "postgres"), required=True)
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--fault-rate", type=float, default=0.1, help="chance to script one fault before an operation that may submit")
    p.add_argument("--faults", type=lambda v: tuple(v.split(",")), default=FAULT_KINDS,
                   help=f"comma-separated submit behaviours (default {','.join(FAULT_KINDS)})")
    p.add_argument("--crash-rate", type=float, default=0.001, help="chance per crash point to os._exit")
    p.add_argument("--early-rate", type=float, default=0.05,
                   help="share of fresh tasks the provider finishes at once by itself")
    p.add_argument("--stale-seconds", type=float, default=2.0, help="cleanup(older_than=...) in seconds")
    p.add_argument("--timeout", type=float, default=2.0, help="RunningHub client timeout in seconds")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="give up (and fail) after this long")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pg-url", default=PG_URL)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--report-json", type=Path, help="also write the JSON report to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    from aiqueue.provider.fake_server import check_behaviour

    for kind in opts.faults:
        check_behaviour(kind)
    report = run_soak(opts)
    if opts.report_json:
        opts.report_json.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(json.dumps(report, indent=2) if opts.json else render(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Races with real OS processes against one real database (SQLite file or PostgreSQL): eight
workers released by a barrier run process-next, webhook finishes (some twice), cancels and
cleanups at once while a monitor samples the slot count. The limit must hold at every instant
and the ledger must stay exact."""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, write_config
from tests.invariants import check_invariants, max_claimed_slot, replay_max_holders

WORKERS = 8
JOBS = 40
LIMIT = 3


def _manager(url: str, config_path: str) -> Any:
    from aiqueue.manager import QueueManager
    from aiqueue.provider.runninghub import RunningHubClient
    from aiqueue.settings import load_settings
    from aiqueue.store import Store

    settings = load_settings(config_path, db_url=url, env={"RUNNINGHUB_API_KEY": API_KEY})
    return QueueManager(Store(settings.database_url), settings,
                        RunningHubClient(settings.base_url, API_KEY, timeout=5))


def _finish_body(hub_url: str, task_id: str, success: bool) -> bytes:
    request = urllib.request.Request(
        f"{hub_url}/__fake__/finish",
        data=json.dumps({"taskId": task_id, "success": success, "deliver": False}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.loads(answer.read())["webhook"].encode()


def _worker(url: str, config_path: str, hub_url: str, barrier: Any, seed: int, deadline: float) -> None:
    from aiqueue.errors import ConflictError, ProviderError

    manager = _manager(url, config_path)
    rng = random.Random(seed)
    barrier.wait()
    manager.process_next()  # everyone at the same instant
    while time.time() < deadline:
        status = manager.status()
        if not status.running and not status.queued:
            return
        roll = rng.random()
        if roll < 0.35:
            manager.process_next()
        elif roll < 0.85 and status.running:
            job = rng.choice(status.running)
            if job.provider_task_id:
                body = _finish_body(hub_url, job.provider_task_id, rng.random() < 0.7)
                manager.finish_webhook(body)
                if rng.random() < 0.3:
                    manager.finish_webhook(body)  # a duplicate delivery
        elif roll < 0.95:
            pool = status.queued + status.running
            if pool:
                try:
                    manager.cancel(rng.choice(pool).id, reason="race test")
                except (ConflictError, ProviderError):
                    pass  # it reached a terminal status first, or its submit's outcome is unknown
        else:
            manager.cleanup()
    raise SystemExit(3)  # ran out of time with jobs still active


def _monitor(url: str, stop: Any, peak: Any) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        while not stop.is_set():
            held = conn.execute(
                text("SELECT count(*) FROM aiqueue_jobs WHERE status IN ('starting', 'running')")
            ).scalar_one()
            conn.commit()
            peak.value = max(peak.value, held)
            time.sleep(0.001)
    engine.dispose()


@pytest.mark.slow
def test_many_processes_never_exceed_the_limit(db_url: str, fake_hub: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path / "race.toml", fake_hub.base_url, max_concurrent=LIMIT)
    setup = _manager(db_url, str(config))
    setup.init_db()
    users = [f"user-{i}" for i in range(JOBS)]
    for i, user in enumerate(users):
        setup.grant(user, 50)
        if i % 3:
            setup.enqueue(user, "upscale_image", {"image": f"in-{i}.png"}, start=False)
        else:
            setup.enqueue(user, "upscale_video", {"video": f"in-{i}.mp4"}, start=False)

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    stop = ctx.Event()
    peak = ctx.Value("i", 0)
    monitor = ctx.Process(target=_monitor, args=(db_url, stop, peak))
    monitor.start()
    deadline = time.time() + 120
    workers = [
        ctx.Process(target=_worker, args=(db_url, str(config), fake_hub.base_url, barrier, seed, deadline))
        for seed in range(WORKERS)
    ]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join(timeout=180)
    stop.set()
    monitor.join(timeout=10)

    assert [p.exitcode for p in workers] == [0] * WORKERS
    assert check_invariants(db_url, LIMIT) == []
    assert 1 <= peak.value <= LIMIT
    assert max_claimed_slot(db_url) <= LIMIT
    assert replay_max_holders(db_url) <= LIMIT
    final = setup.status()
    assert final.running == [] and final.queued == []
    assert setup.refund_audit().ok
    # Every job was charged once; refunds exactly match the failed and cancelled ones.
    total_left = sum(setup.balance(u).balance for u in users)
    ledger = setup.ledger()
    assert total_left == sum(e.amount for e in ledger)
    submits = [r for r in fake_hub.requests if r["path"] == "/task/openapi/ai-app/run"]
    assert len(submits) == len({r["body"]["nodeInfoList"][0]["fieldValue"] for r in submits})  # none twice

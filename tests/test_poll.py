"""Without a webhook URL, `process-next` asks RunningHub about each running job (the example
config promised a poller; a new-user trial found none). On SQLite and PostgreSQL: an ended task
ends its job by the same path as a webhook (failed: the real message, refunded once), a pending
or unreachable one stays running, and with a webhook configured nothing is asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aiqueue.clock import FrozenClock
from aiqueue.manager import QueueManager
from aiqueue.provider.runninghub import RunningHubClient
from aiqueue.settings import load_settings
from aiqueue.store import Store
from tests.conftest import API_KEY, TOOLS_TOML
from tests.invariants import check_invariants


@pytest.fixture
def polling(tmp_path: Path, fake_hub: Any, db_url: str, clock: FrozenClock) -> Any:
    config = tmp_path / "poll.toml"
    config.write_text(f'[provider]\nbase_url = "{fake_hub.base_url}"\ntimeout = 2\n{TOOLS_TOML}', encoding="utf-8")
    settings = load_settings(config, db_url=db_url, env={"RUNNINGHUB_API_KEY": API_KEY})
    assert settings.submit_webhook_url(1) is None
    store = Store(settings.database_url)
    manager = QueueManager(store, settings, RunningHubClient(settings.base_url, API_KEY, timeout=2), clock)
    manager.init_db()
    yield manager
    store.dispose()


def outputs_asked(hub: Any) -> int:
    return sum(1 for r in hub.requests if r["path"].endswith("/outputs"))


def test_process_next_ends_what_runninghub_ended(polling: QueueManager, fake_hub: Any, db_url: str) -> None:
    for user in ("ann", "ben", "cat", "dan"):
        polling.grant(user, 50)
    jobs = [polling.enqueue(u, "upscale_image", {"image": f"{u}.png"}).job for u in ("ann", "ben", "cat", "dan")]
    assert [j.status for j in jobs] == ["running", "running", "running", "queued"]
    fake_hub.finish_task(jobs[0].provider_task_id, success=True, outputs=["https://cdn.example/ann.png"],
                         deliver=False)
    fake_hub.finish_task(jobs[1].provider_task_id, success=False, error="CUDA out of memory", deliver=False)

    result = polling.process_next()
    ended = {j.id: j for j in result.finished}
    assert set(ended) == {jobs[0].id, jobs[1].id}
    assert ended[jobs[0].id].status == "completed" and ended[jobs[0].id].outputs == ["https://cdn.example/ann.png"]
    assert ended[jobs[1].id].status == "failed" and "CUDA out of memory" in (ended[jobs[1].id].error or "")
    assert [j.id for j in result.started] == [jobs[3].id]  # the freed slot went to the queue's head
    assert polling.job_detail(jobs[2].id).job.status == "running"  # still pending there
    assert [e.kind for e in polling.ledger(job_id=jobs[1].id)] == ["charge", "refund"]
    assert [e.kind for e in polling.ledger(job_id=jobs[0].id)] == ["charge"]

    again = polling.process_next()  # nothing ended twice
    assert again.finished == [] and [e.kind for e in polling.ledger(job_id=jobs[1].id)] == ["charge", "refund"]
    assert check_invariants(db_url, 3) == []


def test_doubt_leaves_jobs_running(polling: QueueManager, fake_hub: Any, make_manager: Any, db_url: str) -> None:
    polling.grant("eve", 50)
    job = polling.enqueue("eve", "upscale_image", {"image": "e.png"}).job
    fake_hub.stop()  # RunningHub unreachable: no answer is not an ending
    assert polling.process_next().finished == []
    assert polling.job_detail(job.id).job.status == "running"
    assert check_invariants(db_url, 3) == []


def test_with_a_webhook_nothing_is_asked(manager: QueueManager, fake_hub: Any) -> None:
    manager.grant("fred", 50)
    job = manager.enqueue("fred", "upscale_image", {"image": "f.png"}).job
    fake_hub.finish_task(job.provider_task_id, success=True, deliver=False)
    before = outputs_asked(fake_hub)
    assert manager.process_next().finished == []
    assert outputs_asked(fake_hub) == before
    assert manager.job_detail(job.id).job.status == "running"  # its webhook will end it

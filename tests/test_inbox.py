"""Early webhooks: a body that arrives before its task id is stored is kept in the inbox and
applied as soon as the submit is recorded; unmatched ones are listed for operators."""

from __future__ import annotations

import threading
import time
from typing import Any

from aiqueue.domain import Status
from tests.invariants import check_invariants

IMG = {"image": "api/in.png"}


def _wait_for_task(fake_hub: Any, timeout: float = 5.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fake_hub.tasks:
            return next(iter(fake_hub.tasks))
        time.sleep(0.01)
    raise AssertionError("the fake never created the task")


def test_webhook_before_the_task_id_is_stored_is_applied(make_manager: Any, fake_hub: Any) -> None:
    submitter, receiver = make_manager(), make_manager()
    submitter.grant("a", 50)
    job = submitter.enqueue("a", "upscale_image", IMG, start=False).job
    fake_hub.script_submits(["late:1.0"])  # the task exists at once; the answer comes in 1 s
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(fill=submitter.process_next()))
    thread.start()
    task_id = _wait_for_task(fake_hub)
    body = fake_hub.finish_task(task_id, success=False, error="bad input image", deliver=False)
    early = receiver.finish_webhook(body)
    assert early.job is None and not early.changed
    assert "unmatched" in early.message
    assert [w.task_id for w in receiver.unmatched_webhooks()] == [task_id]
    assert receiver.finish_webhook(body).job is None  # the same body twice: still one inbox row
    assert len(receiver.unmatched_webhooks()) == 1
    thread.join()
    final = receiver.job_detail(job.id).job
    assert final.status is Status.FAILED and "bad input image" in final.error
    assert final.provider_task_id == task_id
    assert receiver.unmatched_webhooks() == []
    assert [e.kind for e in receiver.ledger(job_id=job.id)] == ["charge", "refund"]
    assert receiver.finish_webhook(body).changed is False  # late duplicate: nothing twice
    assert check_invariants(receiver.store.url, 3) == []


def test_unmatched_webhooks_are_listed_and_change_nothing(manager: Any, fake_hub: Any) -> None:
    import json

    body = json.dumps({"event": "TASK_END", "taskId": "1990000000000009999",
                       "eventData": json.dumps({"code": 0, "msg": "success",
                                                "data": [{"fileUrl": "https://cdn.example.com/x.png"}]})}).encode()
    result = manager.finish_webhook(body)
    assert result.job is None and not result.changed
    [unmatched] = manager.unmatched_webhooks()
    assert unmatched.task_id == "1990000000000009999" and unmatched.received_at.tzinfo is not None
    assert manager.ledger() == [] and manager.status().running == []


def test_a_lost_answer_is_unknown_and_never_resubmitted(manager: Any, fake_hub: Any, clock: Any) -> None:
    from datetime import timedelta

    manager.grant("a", 50)
    fake_hub.script_submits(["lost"])  # the provider created the task, the answer never came
    job = manager.enqueue("a", "upscale_image", IMG).job
    assert job.status is Status.STARTING and "unknown" in job.error
    for _ in range(3):
        manager.process_next()
    assert len(fake_hub.tasks) == 1  # never submitted again
    clock.advance(timedelta(minutes=11))
    manager.cleanup()
    final = manager.job_detail(job.id).job
    assert final.status is Status.FAILED and "timed out" in final.error and "unknown" in final.error
    assert manager.balance("a").balance == 50


def test_status_unmatched_cli(tmp_path: Any) -> None:
    import json
    import subprocess
    import sys

    db = f"sqlite:///{tmp_path / 'q.db'}"
    run = lambda *a, data=None: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "aiqueue", "--db", db, *a], input=data, capture_output=True, timeout=60)
    assert run("db", "init").returncode == 0
    body = json.dumps({"event": "TASK_END", "taskId": "1990000000000001234",
                       "eventData": {"status": "SUCCESS", "results": [{"url": "https://cdn.example.com/r.png"}]}})
    applied = run("finish", "--webhook", "-", "--json", data=body.encode())
    assert applied.returncode == 0 and json.loads(applied.stdout)["changed"] is False
    listed = run("status", "--unmatched", "--json")
    assert listed.returncode == 0
    [hook] = json.loads(listed.stdout)["webhooks"]
    assert hook["task_id"] == "1990000000000001234"
    table = run("status", "--unmatched")
    assert b"1990000000000001234" in table.stdout


def test_webhook_racing_the_task_id_record_is_never_lost(make_manager: Any, fake_hub: Any) -> None:
    """process-next records the task id while the webhook for it arrives (threads released
    together, the webhook 0-30 ms late). Under READ COMMITTED neither transaction would see the
    other's row without the per-task lock; the webhook must always end up applied."""
    import random

    from aiqueue.provider.fake_server import FakeTask, _webhook_body

    recorder, receiver = make_manager(), make_manager()
    rng = random.Random(7)
    for i in range(20):
        user = f"u{i}"
        recorder.grant(user, 50)
        job = recorder.enqueue(user, "upscale_image", {"image": f"{i}.png"}, start=False).job
        task_id = str(fake_hub._next_id)  # the fake hands out ids in sequence
        body = _webhook_body(FakeTask(task_id=task_id, api="ai-app", webapp_id="1", workflow_id=None,
                                      node_info_list=[], webhook_url=None, status="SUCCESS",
                                      outputs=[f"https://cdn.example.com/{task_id}.png"]))
        go = threading.Barrier(2)
        delay = rng.uniform(0, 0.03)

        def deliver(body: bytes = body, delay: float = delay, go: Any = go) -> None:
            go.wait()
            time.sleep(delay)
            receiver.finish_webhook(body)

        thread = threading.Thread(target=deliver)
        thread.start()
        go.wait()
        recorder.process_next()
        thread.join()
        final = recorder.job_detail(job.id).job
        assert (final.provider_task_id, final.status) == (task_id, Status.COMPLETED), f"round {i}"
    assert recorder.unmatched_webhooks() == []
    assert check_invariants(recorder.store.url, 3) == []

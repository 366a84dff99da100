"""Scenario 7 (issue 3): provider faults at the manager and CLI level, on SQLite and PostgreSQL.

The fake RunningHub on 127.0.0.1 hangs, drops the connection, answers 5xx or an HTML page, loses
the answer of a task it created, answers late, or is stopped entirely; a transport in front of it
adds unexpected fields to every answer. Rules checked:
- nothing was sent (server down) or the provider is busy: the job goes back to the queue in its
  FIFO place, still charged, nothing refunded;
- the outcome is unknown: the job stays `starting` holding its slot, the real reason stored in
  the job and its history, never submitted again by process-next/enqueue/cleanup; cleanup later
  fails and refunds it with a message that keeps the real reason;
- cancel and cleanup with the provider down still end the job, naming why the provider was not
  asked; every step keeps the invariants.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiqueue.clock import FrozenClock
from aiqueue.domain import Status
from aiqueue.errors import ProviderError
from aiqueue.provider.runninghub import RUN_PATH, RunningHubClient
from tests.cli_helpers import Run, run_cli
from tests.conftest import API_KEY, write_config
from tests.invariants import check_invariants

TIMEOUT = 0.5
STALE = timedelta(minutes=10, seconds=1)


def inputs(user: str) -> dict[str, str]:
    return {"image": f"{user}.png"}  # tells the submits of different jobs apart at the fake


def submits_of(fake_hub: Any, user: str) -> int:
    return sum(
        1 for r in fake_hub.requests
        if r["path"] == RUN_PATH and any(n.get("fieldValue") == f"{user}.png" for n in r["body"]["nodeInfoList"])
    )


def assert_clean(manager: Any) -> None:
    assert check_invariants(manager.store.url, manager.settings.max_concurrent) == []
    assert manager.refund_audit().ok


def kinds(manager: Any, job_id: int) -> list[str]:
    return [str(e.kind) for e in manager.ledger(job_id=job_id)]


@pytest.fixture
def quick(make_manager: Any, fake_hub: Any) -> Any:
    """A manager whose RunningHub client gives up after TIMEOUT seconds."""
    return make_manager(provider=RunningHubClient(fake_hub.base_url, API_KEY, timeout=TIMEOUT))


# --- unknown outcomes: kept starting, the reason stored, never resubmitted -------------------------

UNKNOWN = {
    "hang": f"no answer within {TIMEOUT:g}s after the request was sent",
    "late:2": f"no answer within {TIMEOUT:g}s after the request was sent",
    "drop": "connection lost after the request was sent",
    "lost": "connection lost after the request was sent",
    "http500": "HTTP 500 Internal Server Error",
    "html": "answer was not JSON: <!DOCTYPE html><html><head><title>502 Bad Gateway",
}


@pytest.mark.parametrize("behaviour", list(UNKNOWN))
def test_unknown_submit_outcome_keeps_the_slot_with_the_real_reason(
    quick: Any, fake_hub: Any, clock: FrozenClock, behaviour: str
) -> None:
    reason = UNKNOWN[behaviour]
    for user in ("a", "b", "c"):
        quick.grant(user, 100)
    fake_hub.script_submits([behaviour])
    job = quick.enqueue("a", "upscale_image", inputs("a")).job
    assert job.status is Status.STARTING and job.slot == 1
    assert job.error == f"submit outcome unknown: {reason}" or (
        job.error.startswith("submit outcome unknown: ") and reason in job.error), job.error
    detail = quick.job_detail(job.id)
    assert detail.events[-1].from_status is detail.events[-1].to_status is Status.STARTING
    assert reason in (detail.events[-1].detail or "")
    assert kinds(quick, job.id) == ["charge"] and quick.balance("a").balance == 95
    assert_clean(quick)

    # Nothing submits it again: not process-next, not other enqueues filling the free slots.
    quick.process_next()
    b = quick.enqueue("b", "upscale_image", inputs("b")).job
    quick.process_next()
    assert b.status is Status.RUNNING
    assert submits_of(fake_hub, "a") == 1
    still = quick.job_detail(job.id).job
    assert still.status is Status.STARTING and still.slot == 1 and reason in still.error

    clock.advance(STALE)
    cleaned = quick.cleanup()
    assert job.id in [j.id for j in cleaned.expired]
    ended = quick.job_detail(job.id)
    assert ended.job.status is Status.FAILED and ended.job.slot is None
    assert "timed out after 10m01s starting" in ended.job.error and reason in ended.job.error
    assert reason in (ended.events[-1].detail or "") and ended.events[-1].detail.startswith("cleanup: ")
    assert kinds(quick, job.id) == ["charge", "refund"] and quick.balance("a").balance == 100
    assert submits_of(fake_hub, "a") == 1  # cleanup does not resubmit either
    assert_clean(quick)


def test_delay_within_the_timeout_is_a_normal_start(quick: Any, fake_hub: Any) -> None:
    quick.grant("a", 100)
    fake_hub.script_submits(["delay:0.2"])
    job = quick.enqueue("a", "upscale_image", inputs("a")).job
    assert job.status is Status.RUNNING and job.provider_task_id in fake_hub.tasks and job.error is None
    assert_clean(quick)


# --- not sent or busy: back in the queue in place, nothing refunded ------------------------------


@pytest.mark.parametrize("fault", ["stopped", "busy", "busy415"])
def test_not_sent_or_busy_requeues_in_place_without_refund(quick: Any, fake_hub: Any, fault: str) -> None:
    for user in ("a", "b", "c"):
        quick.grant(user, 100)
    if fault == "stopped":
        fake_hub.stop()
    else:
        fake_hub.set_default_submit(fault)
    first = quick.enqueue("a", "upscale_image", inputs("a")).job
    second = quick.enqueue("b", "upscale_image", inputs("b")).job
    third = quick.process_next()
    assert [j.id for j in third.requeued] == [first.id]  # the head is tried again, first
    for job, position in ((first, 1), (second, 2)):
        current = quick.job_detail(job.id)
        assert current.job.status is Status.QUEUED and current.job.position == position
        assert current.job.slot is None and current.job.started_at is None
        assert kinds(quick, job.id) == ["charge"]
    history = quick.job_detail(first.id).events
    busy_notes = [e.detail for e in history if e.from_status is Status.STARTING and e.to_status is Status.QUEUED]
    assert busy_notes and all(note.startswith("provider busy: ") for note in busy_notes)
    expected = {"stopped": "connection failed", "busy": "421 TASK_QUEUE_MAXED", "busy415": "415 TASK_INSTANCE_MAXED"}
    assert all(expected[fault] in note for note in busy_notes), busy_notes
    if fault == "stopped":
        assert "refused" in busy_notes[0].lower()
    assert [quick.balance(u).balance for u in "ab"] == [95, 95]
    assert_clean(quick)

    # The provider is back: FIFO order is kept.
    if fault == "stopped":
        fake_hub.start()
    else:
        fake_hub.set_default_submit("accept")
    started = quick.process_next().started
    assert [j.id for j in started] == [first.id, second.id]
    assert submits_of(fake_hub, "a") == (0 if fault == "stopped" else 3) + 1
    assert_clean(quick)


def test_provider_down_during_cancel_and_cleanup(quick: Any, fake_hub: Any, clock: FrozenClock) -> None:
    for user in ("a", "b", "c", "d"):
        quick.grant(user, 100)
    running = [quick.enqueue(u, "upscale_image", inputs(u)).job for u in "abc"]
    queued = quick.enqueue("d", "upscale_image", inputs("d")).job
    assert [j.status for j in running] == [Status.RUNNING] * 3 and queued.status is Status.QUEUED
    fake_hub.stop()

    # Cancel: refused while RunningHub cannot confirm it (the task may run on and be billed):
    # the job keeps its slot, nothing is refunded. Forced, it ends here and the history says so.
    with pytest.raises(ProviderError, match="did not confirm cancelling"):
        quick.cancel(running[0].id, reason="user asked")
    assert quick.job_detail(running[0].id).job.status is Status.RUNNING
    assert quick.balance("a").balance == 95
    cancelled = quick.cancel(running[0].id, reason="user asked", force=True)
    assert cancelled.job.status is Status.CANCELLED and cancelled.refunded == 5
    assert cancelled.message and cancelled.message.startswith("forced: provider cancel failed: connection failed")
    event = quick.job_detail(running[0].id).events[-1]
    assert event.detail.startswith("user asked; forced: provider cancel failed: connection failed")
    # The freed slot went to d, whose submit was not sent: back in the queue, still charged.
    assert [j.id for j in cancelled.process.requeued] == [queued.id]
    assert quick.job_detail(queued.id).job.status is Status.QUEUED
    assert_clean(quick)

    # Cleanup: the provider cannot be asked; the jobs fail, refunded, and the message says why.
    clock.advance(STALE)
    cleaned = quick.cleanup()
    assert sorted(j.id for j in cleaned.expired) == sorted(j.id for j in running[1:])
    for job in cleaned.expired:
        assert job.status is Status.FAILED
        assert "timed out after 10m01s running (limit 10m)" in job.error
        assert "provider: unreachable: connection failed" in job.error
        assert "cancel failed: connection failed" in job.error
    assert [quick.balance(u).balance for u in "abc"] == [100, 100, 100]
    assert quick.job_detail(queued.id).job.status is Status.QUEUED  # could not be sent either
    assert quick.balance("d").balance == 95
    assert_clean(quick)

    fake_hub.start()
    assert [j.id for j in quick.process_next().started] == [queued.id]
    assert_clean(quick)


def test_cleanup_of_a_running_job_when_outputs_answers_garbage(
    make_manager: Any, fake_hub: Any, clock: FrozenClock
) -> None:
    """outputs answers HTML, then 500: unknown at the provider, so the timeout fails it with that."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == RUN_PATH:
            return httpx.Response(200, json={"code": 0, "msg": "success", "data": {"taskId": "1990000000000000777"}})
        if request.url.path.endswith("/outputs"):
            page = "<html><body>Bad Gateway</body></html>"
            return httpx.Response(200, text=page, headers={"content-type": "text/html"})
        return httpx.Response(503, text="Service Unavailable")

    client = RunningHubClient(fake_hub.base_url, API_KEY, http=httpx.Client(transport=httpx.MockTransport(handler)))
    manager = make_manager(provider=client)
    manager.grant("a", 100)
    job = manager.enqueue("a", "upscale_image", inputs("a")).job
    assert job.status is Status.RUNNING and job.provider_task_id == "1990000000000000777"
    clock.advance(STALE)
    [ended] = manager.cleanup().expired
    assert ended.status is Status.FAILED
    assert "provider: unreachable: answer was not JSON: <html><body>Bad Gateway" in ended.error
    assert "cancel failed: HTTP 503 Service Unavailable" in ended.error
    assert calls.count(RUN_PATH) == 1
    assert_clean(manager)


# --- unexpected fields everywhere ------------------------------------------------------------------


class ExtraFields(httpx.BaseTransport):
    """Forwards to the fake RunningHub and adds fields nobody documented to every JSON answer;
    task ids come back as bare 19-digit JSON numbers."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        payload = json.loads(response.read())
        payload["traceId"] = "abc"
        payload["extra"] = {"nested": [1, {"x": None}], "flag": True}
        data = payload.get("data")
        if isinstance(data, dict):
            data["unexpected"] = {"a": [1, 2, 3]}
            if isinstance(data.get("taskId"), str):
                data["taskId"] = int(data["taskId"])
        elif isinstance(data, list):
            for item in data:
                item["surprise"] = "yes"
        return httpx.Response(response.status_code, json=payload)

    def close(self) -> None:
        self.inner.close()


def test_unexpected_fields_change_nothing(make_manager: Any, fake_hub: Any, clock: FrozenClock) -> None:
    http = httpx.Client(transport=ExtraFields())
    manager = make_manager(provider=RunningHubClient(fake_hub.base_url, API_KEY, http=http, timeout=2))
    for user in ("ok", "bad", "gone"):
        manager.grant(user, 100)
    jobs = {u: manager.enqueue(u, "upscale_image", inputs(u)).job for u in ("ok", "bad", "gone")}
    for job in jobs.values():
        assert job.status is Status.RUNNING and job.error is None
        assert job.provider_task_id in fake_hub.tasks  # all 19 digits kept from the JSON number
    fake_hub.finish_task(jobs["ok"].provider_task_id, outputs=["https://cdn.example.com/ok.png"], deliver=False)
    fake_hub.finish_task(jobs["bad"].provider_task_id, success=False, error="CUDA out of memory", deliver=False)
    cancelled = manager.cancel(jobs["gone"].id)
    assert cancelled.message == "provider cancelled the task"
    assert fake_hub.tasks[jobs["gone"].provider_task_id].cancelled
    clock.advance(STALE)
    result = manager.cleanup()
    assert [(j.user, j.outputs) for j in result.completed] == [("ok", ["https://cdn.example.com/ok.png"])]
    assert [j.user for j in result.failed] == ["bad"] and "CUDA out of memory" in result.failed[0].error
    assert [manager.balance(u).balance for u in ("ok", "bad", "gone")] == [95, 100, 100]
    http.close()
    assert_clean(manager)


# --- the same through the CLI ----------------------------------------------------------------------


@pytest.fixture
def cli(db_url: str, fake_hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    config = write_config(tmp_path / "quick.toml", fake_hub.base_url)
    config.write_text(config.read_text().replace("timeout = 2\n", f"timeout = {TIMEOUT}\n"))
    assert f"timeout = {TIMEOUT}" in config.read_text()
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)

    def run(*args: str) -> Run:
        return run_cli("--config", str(config), "--db", db_url, *args)

    assert run("db", "init").code == 0
    return run


def ok(run: Run) -> Any:
    assert run.code == 0 and run.stderr == "", (run.args, run.code, run.stderr)
    return run.json() if "--json" in run.args else run.stdout


def _backdate(db_url: str, job_id: int, minutes: int) -> None:
    from datetime import datetime, timezone

    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    past = datetime.now(timezone.utc) - timedelta(minutes=minutes)
    if engine.dialect.name == "sqlite":
        past = past.replace(tzinfo=None)  # the product keeps naive UTC text on SQLite
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE aiqueue_jobs SET started_at = :at WHERE id = :id"), {"at": past, "id": job_id})
    finally:
        engine.dispose()


def test_cli_hang_then_cleanup_keeps_the_reason(cli: Any, fake_hub: Any, db_url: str) -> None:
    ok(cli("credits", "grant", "alice", "100"))
    fake_hub.script_submits(["hang"])
    job = ok(cli("enqueue", "--user", "alice", "--tool", "upscale_image", "--input", "image=alice.png", "--json"))
    assert job["job"]["status"] == "starting" and [j["id"] for j in job["process"]["unknown"]] == [job["job"]["id"]]
    reason = f"no answer within {TIMEOUT:g}s after the request was sent"
    assert reason in job["job"]["error"]
    assert ok(cli("process-next", "--json"))["started"] == []
    detail = ok(cli("status", str(job["job"]["id"]), "--json"))
    assert detail["job"]["status"] == "starting" and reason in detail["events"][-1]["detail"]
    _backdate(db_url, job["job"]["id"], minutes=11)
    cleaned = ok(cli("cleanup", "--json"))
    [ended] = cleaned["expired"]
    assert ended["status"] == "failed" and "timed out after 11m" in ended["error"] and reason in ended["error"]
    assert ok(cli("credits", "balance", "alice", "--json"))["balance"] == 100
    assert submits_of(fake_hub, "alice") == 1
    assert check_invariants(db_url, 3) == []
    assert ok(cli("refund-audit", "--json"))["ok"] is True


def test_cli_with_the_provider_stopped(cli: Any, fake_hub: Any, db_url: str) -> None:
    for user in ("alice", "bob"):
        ok(cli("credits", "grant", user, "100"))
    running = ok(cli("enqueue", "--user", "alice", "--tool", "upscale_image", "--input", "image=alice.png",
                     "--json"))["job"]
    assert running["status"] == "running"
    fake_hub.stop()
    warned = cli("enqueue", "--user", "bob", "--tool", "upscale_image", "--input", "image=bob.png", "--json")
    assert warned.code == 0 and warned.stderr.startswith("warning: RunningHub did not start a job (connection failed")
    assert "stays queued at position 1" in warned.stderr and warned.stderr.count("\n") == 1
    queued = json.loads(warned.stdout)
    assert queued["job"]["status"] == "queued" and queued["job"]["position"] == 1
    assert [j["id"] for j in queued["process"]["requeued"]] == [queued["job"]["id"]]
    retried = cli("process-next", "--json")
    assert retried.code == 0 and "stays queued at position 1" in retried.stderr
    again = json.loads(retried.stdout)
    assert [j["id"] for j in again["requeued"]] == [queued["job"]["id"]]
    events = ok(cli("status", str(queued["job"]["id"]), "--json"))["events"]
    assert any("provider busy: connection failed" in (e["detail"] or "") for e in events)
    assert ok(cli("credits", "balance", "bob", "--json"))["balance"] == 95

    _backdate(db_url, running["id"], minutes=11)
    swept = cli("cleanup", "--json")  # frees alice's slot; bob's submit cannot be sent either
    assert swept.code == 0 and "job 2 stays queued" in swept.stderr
    [ended] = json.loads(swept.stdout)["expired"]
    assert ended["id"] == running["id"] and "unreachable: connection failed" in ended["error"]
    assert ok(cli("credits", "balance", "alice", "--json"))["balance"] == 100
    cancelled = ok(cli("cancel", str(queued["job"]["id"]), "--json"))
    assert cancelled["job"]["status"] == "cancelled" and cancelled["refunded"] == 5
    assert check_invariants(db_url, 3) == []
    assert ok(cli("refund-audit", "--json"))["ok"] is True

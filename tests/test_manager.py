"""Every rule of the queue, on SQLite and PostgreSQL, through QueueManager and the fake
RunningHub server over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
from datetime import timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from aiqueue.domain import Status
from aiqueue.errors import (
    ActiveJobError,
    ConflictError,
    InputError,
    InsufficientCreditsError,
    InvalidWebhookError,
    UnknownJobError,
    UnknownToolError,
    UsageError,
    WrongStateError,
)
from tests.invariants import check_invariants

IMG = {"image": "api/in.png"}


def funded(manager: Any, *users: str, amount: int = 100) -> None:
    for user in users:
        manager.grant(user, amount)


def assert_clean(manager: Any) -> None:
    assert check_invariants(manager.store.url, manager.settings.max_concurrent) == []
    assert manager.refund_audit().ok


def counts(manager: Any) -> tuple[int, int]:
    with manager.store.engine.connect() as conn:
        jobs = conn.execute(text("SELECT count(*) FROM aiqueue_jobs")).scalar_one()
        entries = conn.execute(text("SELECT count(*) FROM aiqueue_ledger")).scalar_one()
    return jobs, entries


# --- credits ------------------------------------------------------------------------------


def test_grant_balance_and_ledger(manager: Any) -> None:
    assert manager.balance("alice").balance == 0
    assert manager.grant("alice", 30, "welcome").balance == 30
    assert manager.grant("alice", 12).balance == 42
    entries = manager.ledger(user="alice")
    assert [(e.kind, e.amount, e.note) for e in entries] == [("grant", 30, "welcome"), ("grant", 12, None)]
    assert all(e.created_at.tzinfo is not None and e.created_at.utcoffset() == timedelta(0) for e in entries)


@pytest.mark.parametrize("amount", [0, -5, 1.5, True, "10", 10**13])
def test_bad_grant_amounts_change_nothing(manager: Any, amount: Any) -> None:
    with pytest.raises(UsageError):
        manager.grant("alice", amount)
    assert counts(manager) == (0, 0)


# --- enqueue ------------------------------------------------------------------------------


def test_enqueue_charges_once_and_starts_at_once(manager: Any, fake_hub: Any) -> None:
    funded(manager, "alice", amount=12)
    result = manager.enqueue("alice", "upscale_image", IMG)
    job = result.job
    assert job.status is Status.RUNNING and job.slot == 1
    assert isinstance(job.provider_task_id, str) and len(job.provider_task_id) == 19
    assert manager.balance("alice").balance == 7
    assert [(e.kind, e.amount) for e in manager.ledger(job_id=job.id)] == [("charge", -5)]
    sent = [r for r in fake_hub.requests if r["path"] == "/task/openapi/ai-app/run"]
    assert len(sent) == 1
    body = sent[0]["body"]
    assert body["webappId"] == "1990000000000000001"
    assert body["webhookUrl"] == "http://127.0.0.1:9/hooks/runninghub"
    assert body["nodeInfoList"] == [
        {"nodeId": "12", "fieldName": "image", "fieldValue": "api/in.png"},
        {"nodeId": "15", "fieldName": "value", "fieldValue": "2"},
    ]
    assert_clean(manager)


def test_enqueue_no_start_only_queues(manager: Any, fake_hub: Any) -> None:
    funded(manager, "alice")
    job = manager.enqueue("alice", "upscale_image", IMG, start=False).job
    assert job.status is Status.QUEUED and job.position == 1
    assert fake_hub.requests == []


def test_refused_enqueues_charge_and_create_nothing(manager: Any) -> None:
    funded(manager, "alice", amount=4)  # upscale_image costs 5
    before = counts(manager)
    with pytest.raises(InsufficientCreditsError) as err:
        manager.enqueue("alice", "upscale_image", IMG)
    assert err.value.needed == 5 and err.value.available == 4
    with pytest.raises(UnknownToolError):
        manager.enqueue("alice", "no_such_tool", IMG)
    with pytest.raises(InputError, match="needs input 'image'"):
        manager.enqueue("alice", "upscale_image", {})
    with pytest.raises(InputError, match="no input 'colour'"):
        manager.enqueue("alice", "upscale_image", {"image": "x", "colour": "red"})
    with pytest.raises(UsageError):
        manager.enqueue("", "upscale_image", IMG)
    assert counts(manager) == before
    assert manager.balance("alice").balance == 4


def test_one_active_job_per_user(manager: Any, fake_hub: Any) -> None:
    funded(manager, "alice")
    first = manager.enqueue("alice", "upscale_image", IMG).job
    with pytest.raises(ActiveJobError, match=f"job {first.id}"):
        manager.enqueue("alice", "upscale_video", {"video": "v.mp4"})
    assert manager.balance("alice").balance == 95  # the refused one charged nothing
    fake_hub.finish_task(first.provider_task_id, deliver=False)
    manager.finish(first.id, "completed")
    assert manager.enqueue("alice", "upscale_video", {"video": "v.mp4"}).job.status is Status.RUNNING


def test_active_job_index_is_in_the_database(manager: Any) -> None:
    funded(manager, "alice")
    job = manager.enqueue("alice", "upscale_image", IMG, start=False).job
    with pytest.raises(IntegrityError):
        with manager.store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO aiqueue_jobs (user_id, tool, status, cost, inputs, outputs, created_at, updated_at)"
                    " SELECT user_id, tool, 'running', cost, inputs, outputs, created_at, updated_at"
                    " FROM aiqueue_jobs WHERE id = :id"
                ),
                {"id": job.id},
            )


# --- slots and FIFO -----------------------------------------------------------------------


def test_global_limit_and_fifo_across_tools(manager: Any, fake_hub: Any) -> None:
    users = [f"u{i}" for i in range(6)]
    funded(manager, *users)
    jobs = []
    for i, user in enumerate(users):
        if i % 2:
            jobs.append(manager.enqueue(user, "upscale_video", {"video": f"v{i}.mp4"}).job)
        else:
            jobs.append(manager.enqueue(user, "upscale_image", {"image": f"i{i}.png"}).job)
    status = manager.status()
    assert [j.id for j in status.running] == [j.id for j in jobs[:3]]
    assert [j.slot for j in status.running] == [1, 2, 3]
    assert [(j.id, j.position) for j in status.queued] == [(jobs[3].id, 1), (jobs[4].id, 2), (jobs[5].id, 3)]
    assert manager.process_next().started == []  # no free slot: nothing more starts

    # Cancelling the middle of the queue closes the gap: positions stay exact.
    manager.cancel(jobs[4].id)
    assert [(j.id, j.position) for j in manager.status().queued] == [(jobs[3].id, 1), (jobs[5].id, 2)]
    assert manager.job_detail(jobs[5].id).job.position == 2

    # Finishing frees the slot and starts the oldest queued job (through the same fill).
    finished = manager.finish(jobs[1].id, "completed", outputs=["https://cdn.example.com/o.mp4"])
    assert [j.id for j in finished.process.started] == [jobs[3].id]
    assert finished.process.started[0].slot == 2
    assert [j.id for j in manager.status().queued] == [jobs[5].id]
    assert_clean(manager)


def test_capacity_answer_requeues_in_place_without_refund(manager: Any, fake_hub: Any) -> None:
    funded(manager, "a", "b")
    a = manager.enqueue("a", "upscale_image", IMG, start=False).job
    b = manager.enqueue("b", "upscale_image", IMG, start=False).job
    fake_hub.script_submits(["busy"])
    result = manager.process_next()
    assert [j.id for j in result.requeued] == [a.id] and result.started == []  # stops at busy
    status = manager.status()
    assert status.running == []
    assert [(j.id, j.position) for j in status.queued] == [(a.id, 1), (b.id, 2)]
    assert manager.balance("a").balance == 95 and len(manager.ledger(job_id=a.id)) == 1
    detail = manager.job_detail(a.id)
    assert detail.job.started_at is None
    assert "421 TASK_QUEUE_MAXED" in detail.events[-1].detail
    # The next explicit process-next submits it again at once (no hidden backoff).
    again = manager.process_next()
    assert [j.id for j in again.started] == [a.id, b.id]
    assert_clean(manager)


@pytest.mark.parametrize("behaviour", ["busy415", "reject:1520", "reject:1011"])
def test_every_capacity_code_requeues(manager: Any, fake_hub: Any, behaviour: str) -> None:
    funded(manager, "a")
    fake_hub.script_submits([behaviour])
    job = manager.enqueue("a", "upscale_image", IMG).job
    assert job.status is Status.QUEUED and job.position == 1
    assert manager.balance("a").balance == 95


def test_terminal_code_fails_with_real_message_and_refunds(manager: Any, fake_hub: Any) -> None:
    funded(manager, "a", "b")
    fake_hub.script_submits(["reject:803"])
    manager.enqueue("b", "upscale_image", IMG, start=False)
    result = manager.enqueue("a", "upscale_image", IMG)  # b is ahead: b is submitted and rejected
    assert [j.user for j in result.process.failed] == ["b"]
    failed = result.process.failed[0]
    assert failed.status is Status.FAILED
    assert "803" in failed.error and "APIKEY_INVALID_NODE_INFO" in failed.error
    assert manager.balance("b").balance == 100
    assert result.job.status is Status.RUNNING  # the fill went on to a
    assert_clean(manager)


def test_unknown_outcome_is_never_resubmitted(manager: Any, fake_hub: Any, clock: Any) -> None:
    funded(manager, "a")
    fake_hub.script_submits(["http500"])
    job = manager.enqueue("a", "upscale_image", IMG).job
    assert job.status is Status.STARTING and job.slot == 1
    assert "unknown" in job.error and "500" in job.error
    manager.process_next()
    manager.process_next()
    submits = [r for r in fake_hub.requests if r["path"] == "/task/openapi/ai-app/run"]
    assert len(submits) == 1
    assert manager.job_detail(job.id).job.status is Status.STARTING
    clock.advance(timedelta(minutes=11))
    cleaned = manager.cleanup()
    assert [j.id for j in cleaned.expired] == [job.id]
    ended = manager.job_detail(job.id).job
    assert ended.status is Status.FAILED and "timed out" in ended.error and "500" in ended.error
    assert manager.balance("a").balance == 100
    assert_clean(manager)


# --- finishing ----------------------------------------------------------------------------


def test_success_webhook_completes_and_duplicates_change_nothing(manager: Any, fake_hub: Any) -> None:
    funded(manager, "a")
    job = manager.enqueue("a", "upscale_image", IMG).job
    body = fake_hub.finish_task(job.provider_task_id, outputs=["https://cdn.example.com/a.png"], deliver=False)
    first = manager.finish_webhook(body)
    assert first.changed and first.job.status is Status.COMPLETED
    assert first.job.outputs == ["https://cdn.example.com/a.png"]
    assert first.job.slot is None and first.job.finished_at.tzinfo == timezone.utc
    second = manager.finish_webhook(body)
    assert not second.changed and second.job.status is Status.COMPLETED
    late_failure = fake_hub.finish_task(job.provider_task_id, success=False, deliver=False)
    assert not manager.finish_webhook(late_failure).changed
    assert manager.job_detail(job.id).job.status is Status.COMPLETED
    assert manager.balance("a").balance == 95  # completed: never refunded
    assert_clean(manager)


def test_failure_webhook_stores_real_message_and_refunds_once(manager: Any, fake_hub: Any) -> None:
    funded(manager, "a")
    job = manager.enqueue("a", "upscale_image", IMG).job
    body = fake_hub.finish_task(job.provider_task_id, success=False, error="CUDA out of memory", deliver=False)
    result = manager.finish_webhook(body)
    assert result.changed and result.refunded == 5
    assert "CUDA out of memory" in result.job.error and "KSampler" in result.job.error
    for _ in range(3):
        assert manager.finish_webhook(body).refunded == 0
    assert [(e.kind, e.amount) for e in manager.ledger(job_id=job.id)] == [("charge", -5), ("refund", 5)]
    assert manager.balance("a").balance == 100
    assert_clean(manager)


def test_v2_webhook_object_event_data(manager: Any) -> None:
    funded(manager, "a")
    job = manager.enqueue("a", "upscale_image", IMG).job
    body = json.dumps({
        "event": "TASK_END", "taskId": job.provider_task_id,
        "eventData": {"status": "FAILED", "errorCode": "1501", "errorMessage": "content moderation failed",
                      "results": None, "failedReason": {}},
    }).encode()
    result = manager.finish_webhook(body)
    assert result.job.status is Status.FAILED and "content moderation failed" in result.job.error


def test_unknown_and_malformed_webhooks(manager: Any) -> None:
    funded(manager, "a")
    manager.enqueue("a", "upscale_image", IMG)
    before = counts(manager)
    unknown = json.dumps({"event": "TASK_END", "taskId": "1234567890123456789",
                          "eventData": json.dumps({"code": 0, "msg": "success",
                                                  "data": [{"fileUrl": "https://cdn.example.com/x.png"}]})}).encode()
    result = manager.finish_webhook(unknown)
    assert result.job is None and not result.changed
    for bad in (b"", b"not json", b"[]", b'{"event": "TASK_END"}', b"\xff\xfe", b'{"event":"TASK_END","taskId":"1","eventData":"{"}'):
        with pytest.raises(InvalidWebhookError):
            manager.finish_webhook(bad)
    assert counts(manager) == before


def test_manual_finish_rules(manager: Any) -> None:
    funded(manager, "a", "b")
    job = manager.enqueue("a", "upscale_image", IMG).job
    queued = manager.enqueue("b", "upscale_image", IMG, start=False).job
    with pytest.raises(UsageError, match="real error"):
        manager.finish(job.id, "failed")
    with pytest.raises(UnknownJobError):
        manager.finish(999999, "completed")
    done = manager.finish(job.id, "failed", error="node 7: input image is corrupt")
    assert done.refunded == 5 and done.job.error == "node 7: input image is corrupt"
    assert not manager.finish(job.id, "failed", error="again").changed  # a repeat: no change
    with pytest.raises(WrongStateError, match="terminal"):
        manager.finish(job.id, "completed")
    assert done.process.started[0].id == queued.id  # the freed slot went to the next job


def test_finish_of_queued_job_is_refused(manager: Any) -> None:
    funded(manager, "a")
    job = manager.enqueue("a", "upscale_image", IMG, start=False).job
    with pytest.raises(WrongStateError, match="queued"):
        manager.finish(job.id, "completed")
    assert manager.job_detail(job.id).job.status is Status.QUEUED


# --- cancel -------------------------------------------------------------------------------


def test_cancel_queued_and_running(manager: Any, fake_hub: Any) -> None:
    funded(manager, "a", "b")
    running = manager.enqueue("a", "upscale_image", IMG).job
    queued = manager.enqueue("b", "upscale_video", {"video": "v"}, start=False).job
    first = manager.cancel(queued.id, reason="user asked")
    assert first.changed and first.refunded == 20 and first.job.status is Status.CANCELLED
    assert first.job.error == "user asked"
    second = manager.cancel(running.id)
    assert second.refunded == 5
    assert fake_hub.tasks[running.provider_task_id].status == "CANCEL"
    again = manager.cancel(running.id)
    assert not again.changed and again.refunded == 0
    assert manager.balance("a").balance == 100 and manager.balance("b").balance == 100
    assert_clean(manager)


def test_cancel_completed_job_is_refused(manager: Any) -> None:
    funded(manager, "a")
    job = manager.enqueue("a", "upscale_image", IMG).job
    manager.finish(job.id, "completed")
    with pytest.raises(WrongStateError):
        manager.cancel(job.id)
    with pytest.raises(UnknownJobError):
        manager.cancel(424242)
    assert manager.job_detail(job.id).job.status is Status.COMPLETED


# --- cleanup ------------------------------------------------------------------------------


def test_cleanup_asks_the_provider_first(manager: Any, fake_hub: Any, clock: Any) -> None:
    users = ["done", "broken", "slow"]
    funded(manager, *users)
    jobs = {u: manager.enqueue(u, "upscale_image", IMG).job for u in users}
    fake_hub.finish_task(jobs["done"].provider_task_id, outputs=["https://cdn.example.com/d.png"], deliver=False)
    fake_hub.finish_task(jobs["broken"].provider_task_id, success=False, error="bad latent", deliver=False)
    fake_hub.set_running(jobs["slow"].provider_task_id)
    clock.advance(timedelta(minutes=10, seconds=1))
    result = manager.cleanup()
    assert [j.user for j in result.completed] == ["done"]
    assert result.completed[0].outputs == ["https://cdn.example.com/d.png"]
    assert [j.user for j in result.failed] == ["broken"] and "bad latent" in result.failed[0].error
    assert [j.user for j in result.expired] == ["slow"]
    assert "timed out" in result.expired[0].error and "still running" in result.expired[0].error
    assert fake_hub.tasks[jobs["slow"].provider_task_id].status == "CANCEL"
    assert [manager.balance(u).balance for u in users] == [95, 100, 100]
    assert manager.cleanup().expired == []  # a second run changes nothing
    assert_clean(manager)


def test_staleness_counts_from_leaving_the_queue(manager: Any, clock: Any) -> None:
    funded(manager, "a", "b", "c", "d")
    for user in "abc":
        manager.enqueue(user, "upscale_image", IMG)
    waiting = manager.enqueue("d", "upscale_image", IMG).job
    assert waiting.status is Status.QUEUED
    clock.advance(timedelta(minutes=9, seconds=59))
    assert manager.cleanup().expired == []  # 9m59s: kept
    clock.advance(timedelta(seconds=2))  # 10m01s: expired, and d finally starts
    result = manager.cleanup()
    assert len(result.expired) == 3
    started = result.process.started
    assert [j.id for j in started] == [waiting.id]
    clock.advance(timedelta(minutes=9))  # d waited 10m+ in the queue, but ran only 9m
    assert manager.cleanup().expired == []
    assert manager.job_detail(waiting.id).job.status is Status.RUNNING


def test_process_next_ends_stale_jobs_first(manager: Any, clock: Any) -> None:
    funded(manager, "a", "b", "c", "d")
    for user in "abc":
        manager.enqueue(user, "upscale_image", IMG)
    waiting = manager.enqueue("d", "upscale_image", IMG).job
    clock.advance(timedelta(minutes=30))
    result = manager.process_next()
    assert len(result.expired) == 3
    assert [j.id for j in result.started] == [waiting.id]


# --- ledger guarantees in the schema, and the audit ----------------------------------------


def test_second_refund_is_impossible_in_the_schema(manager: Any) -> None:
    funded(manager, "a")
    job = manager.enqueue("a", "upscale_image", IMG).job
    manager.cancel(job.id)
    with pytest.raises(IntegrityError):
        with manager.store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO aiqueue_ledger (user_id, job_id, kind, amount, created_at)"
                    " SELECT user_id, job_id, kind, amount, created_at FROM aiqueue_ledger"
                    " WHERE job_id = :id AND kind = 'refund'"
                ),
                {"id": job.id},
            )


def test_refund_audit_finds_fixes_and_names_tampering(manager: Any) -> None:
    funded(manager, "a", "b", "c")
    cancelled = manager.enqueue("a", "upscale_image", IMG).job
    manager.cancel(cancelled.id)
    completed = manager.enqueue("b", "upscale_image", IMG).job
    manager.finish(completed.id, "completed")
    edited = manager.enqueue("c", "upscale_video", {"video": "v"}).job
    assert manager.refund_audit().ok
    with manager.store.engine.begin() as conn:  # tamper behind the manager's back
        conn.execute(text("DELETE FROM aiqueue_ledger WHERE job_id = :id AND kind = 'refund'"), {"id": cancelled.id})
        conn.execute(text("UPDATE aiqueue_ledger SET amount = -1 WHERE job_id = :id"), {"id": edited.id})
    audit = manager.refund_audit()
    kinds = sorted((p.kind, p.job_id) for p in audit.problems)
    assert ("missing_refund", cancelled.id) in kinds
    assert ("wrong_amount", edited.id) in kinds
    assert {p.user for p in audit.problems if p.kind == "balance_mismatch"} == {"a", "c"}
    fixed = manager.refund_audit(fix=True)
    assert ("missing_refund", cancelled.id) in [(p.kind, p.job_id) for p in fixed.fixed]
    # c's own ledger rows are wrong: a human decides; the fix does not move credits along them.
    assert sorted((p.kind, p.user) for p in fixed.problems) == [("balance_mismatch", "c"), ("wrong_amount", "c")]
    assert manager.balance("a").balance == 100
    assert manager.balance("c").balance == 80
    again = manager.refund_audit(fix=True)
    assert again.fixed == [] and sorted(p.kind for p in again.problems) == ["balance_mismatch", "wrong_amount"]


def test_refund_on_completed_job_is_named(manager: Any) -> None:
    funded(manager, "a")
    job = manager.enqueue("a", "upscale_image", IMG).job
    manager.finish(job.id, "completed")
    with manager.store.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO aiqueue_ledger (user_id, job_id, kind, amount, created_at)"
                 " SELECT user_id, id, 'refund', cost, created_at FROM aiqueue_jobs WHERE id = :id"),
            {"id": job.id},
        )
    assert ("refund_on_completed", job.id) in [(p.kind, p.job_id) for p in manager.refund_audit().problems]


def test_job_detail_has_history_and_ledger(manager: Any) -> None:
    funded(manager, "a")
    job = manager.enqueue("a", "upscale_image", IMG).job
    manager.finish(job.id, "failed", error="boom at node 9")
    detail = manager.job_detail(job.id)
    assert [(e.from_status, e.to_status) for e in detail.events] == [
        (None, "queued"), ("queued", "starting"), ("starting", "running"), ("running", "failed"),
    ]
    assert [e.kind for e in detail.ledger] == ["charge", "refund"]
    assert all(e.at.tzinfo is not None for e in detail.events)
    with pytest.raises(UnknownJobError):
        manager.job_detail(12345)


def test_cancel_while_submitting_cancels_the_accepted_task(make_manager: Any, fake_hub: Any) -> None:
    import threading
    import time

    submitter, operator = make_manager(), make_manager()  # two "processes" on one database
    funded(submitter, "a")
    job = submitter.enqueue("a", "upscale_image", IMG, start=False).job
    fake_hub.script_submits(["delay:1.0"])  # the provider accepts, slowly
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(fill=submitter.process_next()))
    thread.start()
    deadline = time.time() + 5
    while operator.job_detail(job.id).job.status is not Status.STARTING and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(ConflictError, match="being sent right now"):  # a plain cancel waits for the task id
        operator.cancel(job.id, reason="too slow")
    cancelled = operator.cancel(job.id, reason="too slow", force=True)
    thread.join()
    assert cancelled.changed and cancelled.refunded == 5
    assert result["fill"].started == []  # the late acceptance did not resurrect it
    final = operator.job_detail(job.id).job
    assert final.status is Status.CANCELLED and final.provider_task_id is None
    [task] = fake_hub.tasks.values()
    assert task.status == "CANCEL"  # the accepted task was cancelled at the provider
    assert_clean(operator)


@pytest.mark.parametrize("job_id", [0, -1, 2**63, 2**64, True])
def test_out_of_range_job_ids_are_unknown(manager: Any, job_id: Any) -> None:
    for call in (lambda: manager.job_detail(job_id), lambda: manager.cancel(job_id),
                 lambda: manager.finish(job_id, "completed"), lambda: manager.ledger(job_id=job_id)):
        with pytest.raises(UnknownJobError):
            call()


def test_hostile_text_is_refused_and_changes_nothing(manager: Any) -> None:
    funded(manager, "a")
    before = counts(manager)
    for bad in ({"image": "x" * (16 * 1024 + 1)}, {"image": "a\x00b"}, {"image": "\x1b[31mred"}):
        with pytest.raises(InputError):
            manager.enqueue("a", "upscale_image", bad)
    with pytest.raises(UsageError):
        manager.grant("a", 5, note="n" * 2001)
    with pytest.raises(UsageError):
        manager.grant("a\u202e", 5)  # a right-to-left override in a user id
    assert counts(manager) == before
    ok = manager.enqueue("a", "upscale_image", {"image": "ünïcode prompt\twith tab\nand newline"}).job
    assert ok.inputs["image"].startswith("ünïcode")
    with pytest.raises(UsageError):
        manager.cancel(ok.id, reason="bad\x00reason")
    with pytest.raises(UsageError):
        manager.finish(ok.id, "completed", outputs=[""])
    assert manager.job_detail(ok.id).job.status is Status.RUNNING


def test_an_account_level_rejection_halts_the_queue_and_keeps_places(manager: Any, fake_hub: Any) -> None:
    funded(manager, "a", "b", "c")
    jobs = [manager.enqueue(u, "upscale_image", IMG, start=False).job for u in "abc"]
    fake_hub.set_default_submit("reject:802")  # the API key is wrong: every job would fail
    result = manager.process_next()
    assert result.halted and "802" in result.halted and "APIKEY_UNAUTHORIZED" in result.halted
    assert result.failed == [] and [j.id for j in result.requeued] == [jobs[0].id]
    assert [(j.id, j.position) for j in manager.status().queued] == [(j.id, i) for i, j in enumerate(jobs, 1)]
    assert "802" in manager.job_detail(jobs[0].id).job.error  # the reason is on the job
    assert [manager.balance(u).balance for u in "abc"] == [95, 95, 95]  # nothing refunded
    fake_hub.set_default_submit("accept")  # the operator fixed the key
    assert [j.id for j in manager.process_next().started] == [j.id for j in jobs]
    assert manager.job_detail(jobs[0].id).job.error is None
    assert_clean(manager)


def test_a_tool_missing_from_the_config_halts_instead_of_failing(make_manager: Any, tmp_path: Any) -> None:
    from aiqueue.manager import QueueManager
    from aiqueue.settings import load_settings

    manager = make_manager()
    funded(manager, "a")
    job = manager.enqueue("a", "upscale_video", {"video": "v.mp4"}, start=False).job
    empty = tmp_path / "empty.toml"  # e.g. cron running from a directory without the config
    empty.write_text('[queue]\nmax_concurrent = 3\n')
    settings = load_settings(empty, db_url=manager.store.url, env={})
    stranger = QueueManager(manager.store, settings, manager._provider_or_factory, manager.clock)
    result = stranger.process_next()
    assert result.halted and "upscale_video" in result.halted and "not in the config" in result.halted
    after = manager.job_detail(job.id).job
    assert after.status is Status.QUEUED and after.position == 1
    assert manager.balance("a").balance == 80


def test_empty_inputs_and_padded_user_ids_are_refused(manager: Any) -> None:
    funded(manager, "a")
    before = counts(manager)
    with pytest.raises(InputError, match="empty"):
        manager.enqueue("a", "upscale_image", {"image": ""})
    with pytest.raises(InputError, match="empty"):
        manager.enqueue("a", "upscale_image", {"image": "x", "scale": "  "})
    with pytest.raises(UsageError, match="spaces"):
        manager.grant(" a", 5)
    assert counts(manager) == before


def test_ledger_limit_shows_the_newest_entries(manager: Any) -> None:
    for amount in range(1, 6):
        manager.grant("a", amount)
    assert [e.amount for e in manager.ledger(user="a", limit=2)] == [4, 5]
    assert [e.amount for e in manager.ledger(user="a")] == [1, 2, 3, 4, 5]


def test_a_huge_slot_limit_is_a_config_error(tmp_path: Any) -> None:
    from aiqueue.errors import ConfigError
    from aiqueue.settings import load_settings

    path = tmp_path / "c.toml"
    path.write_text("[queue]\nmax_concurrent = 99999999999999999999\n")
    with pytest.raises(ConfigError, match="max_concurrent"):
        load_settings(path, env={})
    with pytest.raises(ConfigError, match="max_concurrent"):
        load_settings(None, env={"AIQUEUE_MAX_CONCURRENT": "5000"})


def test_commands_do_not_create_a_missing_sqlite_file(tmp_path: Any) -> None:
    from aiqueue.errors import SchemaMissingError
    from aiqueue.store import Store

    target = tmp_path / "not" / "here" / "q.db"
    store = Store(f"sqlite:///{target}")
    with pytest.raises(SchemaMissingError, match="db init"):
        store.read(lambda tx: tx.count_queued())
    assert not target.parent.exists()
    assert store.init_schema() is True and target.exists()
    assert store.read(lambda tx: tx.count_queued()) == 0


@pytest.mark.parametrize("job_id", [2**31, 2**63 - 1])
def test_large_but_valid_job_ids_are_simply_unknown(manager: Any, job_id: int) -> None:
    for call in (lambda: manager.job_detail(job_id), lambda: manager.cancel(job_id),
                 lambda: manager.finish(job_id, "completed")):
        with pytest.raises(UnknownJobError):
            call()
    assert manager.ledger(job_id=job_id) == []


def test_cleanup_dry_run_lists_and_changes_nothing(manager: Any, fake_hub: Any, clock: Any) -> None:
    funded(manager, "a", "b")
    job = manager.enqueue("a", "upscale_image", IMG).job
    clock.advance(timedelta(minutes=11))
    before = counts(manager)
    calls = len(fake_hub.requests)
    preview = manager.cleanup(dry_run=True)
    assert preview.dry_run and [j.id for j in preview.stale] == [job.id] and preview.expired == []
    assert counts(manager) == before and len(fake_hub.requests) == calls  # no change, no provider call
    assert manager.job_detail(job.id).job.status is Status.RUNNING
    assert [j.id for j in manager.cleanup().expired] == [job.id]  # the real run does it

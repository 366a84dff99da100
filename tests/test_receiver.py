"""The webhook receiver (`aiqueue webhook serve`) through real HTTP: httpx (and raw sockets where
httpx would not send what we need) against a real server on 127.0.0.1, in a thread of this
process and as the real CLI subprocess, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiqueue.domain import Status
from aiqueue.manager import QueueManager
from aiqueue.provider.runninghub import RunningHubClient
from aiqueue.receiver import WebhookReceiver
from aiqueue.settings import load_settings
from aiqueue.store import Store
from aiqueue.webhooks import MAX_BODY_BYTES
from tests.conftest import API_KEY, TOOLS_TOML
from tests.invariants import check_invariants

TOKEN = secrets.token_urlsafe(32)
UNKNOWN_TASK = "1999999999999999999"


def write_webhook_config(path: Path, base_url: str, public_url: str = "http://127.0.0.1:9", *,
                         max_concurrent: int = 3, token: str | None = None) -> Path:
    path.write_text(
        f"""
[queue]
max_concurrent = {max_concurrent}

[provider]
base_url = "{base_url}"
timeout = 3

[webhook]
public_url = "{public_url}"
{"" if token is None else f'token = "{token}"'}
{TOOLS_TOML}
""",
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


class Rig:
    """A manager over the test database, the fake RunningHub, and a receiver in a thread."""

    def __init__(self, db_url: str, hub: Any, tmp_path: Path, clock: Any, max_concurrent: int = 3) -> None:
        self.hub = hub
        self.lines: list[str] = []
        config = write_webhook_config(tmp_path / "aiqueue.toml", hub.base_url, max_concurrent=max_concurrent)
        settings = load_settings(config, db_url=db_url,
                                 env={"RUNNINGHUB_API_KEY": API_KEY, "AIQUEUE_WEBHOOK_TOKEN": TOKEN})
        self.db_url = settings.database_url
        self.manager = QueueManager(Store(settings.database_url), settings,
                                    RunningHubClient(settings.base_url, API_KEY, timeout=3, secrets=[TOKEN]), clock)
        self.manager.init_db()
        self.receiver = WebhookReceiver(self.manager, TOKEN, log=self.lines.append).start()
        # The public URL is this receiver's address, known once it listens.
        self.manager.settings = replace(settings, webhook_public_url=self.receiver.base_url)
        self.http = httpx.Client(base_url=self.receiver.base_url, timeout=10)

    def url(self, job_id: int | None = None, token: str = TOKEN) -> str:
        return f"/runninghub/webhook/{token}" + ("" if job_id is None else f"?job={job_id}")

    def post(self, body: bytes, job_id: int | None = None, token: str = TOKEN) -> httpx.Response:
        return self.http.post(self.url(job_id, token), content=body, headers={"Content-Type": "application/json"})

    def running_job(self, user: str = "alice") -> Any:
        self.manager.grant(user, 100)
        job = self.manager.enqueue(user, "upscale_image", {"image": f"api/{user}.png"}).job
        assert job.status is Status.RUNNING and job.provider_task_id
        return job

    def body(self, job: Any, success: bool) -> bytes:
        return self.hub.finish_task(job.provider_task_id, success=success, deliver=False)

    def close(self) -> None:
        self.http.close()
        self.receiver.shutdown()
        self.manager.store.dispose()


@pytest.fixture
def rig(db_url: str, fake_hub: Any, tmp_path: Path, clock: Any) -> Iterator[Rig]:
    rig = Rig(db_url, fake_hub, tmp_path, clock)
    try:
        yield rig
    finally:
        rig.close()
    text = "\n".join(rig.lines)
    assert TOKEN not in text  # never logged, whatever the test did


def refunds(manager: QueueManager, job_id: int) -> int:
    return sum(1 for e in manager.ledger(job_id=job_id) if e.kind == "refund")


def wait_for(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# --- the happy paths -----------------------------------------------------------------------------


def test_submit_sends_the_tokened_url_and_the_delivered_webhook_completes_the_job(rig: Rig) -> None:
    job = rig.running_job()
    submit = [r for r in rig.hub.requests if r["path"].endswith("/ai-app/run")][-1]
    assert submit["body"]["webhookUrl"] == f"{rig.receiver.base_url}/runninghub/webhook/{TOKEN}?job={job.id}"

    rig.hub.finish_task(job.provider_task_id, success=True, outputs=["https://cdn.example/out.png"])  # delivered

    assert rig.hub.deliveries[-1]["status"] == 200
    done = rig.manager.job_detail(job.id).job
    assert done.status is Status.COMPLETED and done.outputs == ["https://cdn.example/out.png"]
    assert refunds(rig.manager, job.id) == 0 and rig.manager.balance("alice").balance == 95
    assert len(rig.lines) == 1 and " 200 " in rig.lines[0] and f"job {job.id} completed" in rig.lines[0]
    assert "/runninghub/webhook/***" in rig.lines[0]
    assert check_invariants(rig.db_url, 3) == []


def test_failure_refunds_exactly_once_and_duplicates_change_nothing(rig: Rig) -> None:
    job = rig.running_job()
    body = rig.body(job, success=False)

    first = rig.post(body, job.id)
    assert first.status_code == 200 and first.json() == {"ok": True, "changed": True, "job_id": job.id}
    after_first = rig.manager.job_detail(job.id)
    for _ in range(2):
        again = rig.post(body, job.id)
        assert again.status_code == 200 and again.json()["changed"] is False
    after = rig.manager.job_detail(job.id)
    assert after.job.status is Status.FAILED and "CUDA out of memory" in (after.job.error or "")
    assert after.events == after_first.events and after.ledger == after_first.ledger
    assert refunds(rig.manager, job.id) == 1 and rig.manager.balance("alice").balance == 100
    assert check_invariants(rig.db_url, 3) == []


def test_unknown_task_is_accepted_and_kept_unmatched(rig: Rig) -> None:
    body = json.dumps({"event": "TASK_END", "taskId": UNKNOWN_TASK,
                       "eventData": json.dumps({"code": 0, "msg": "success", "data": [
                           {"fileUrl": "https://cdn.example/x.png", "fileType": "png"}]})}).encode()
    answer = rig.post(body)
    assert answer.status_code == 200 and answer.json() == {"ok": True, "changed": False, "job_id": None}
    assert [w.task_id for w in rig.manager.unmatched_webhooks()] == [UNKNOWN_TASK]
    assert rig.post(body).status_code == 200  # a retry of it too
    assert len(rig.manager.unmatched_webhooks()) == 1


def test_a_freed_slot_starts_the_next_job_after_the_answer(
    db_url: str, fake_hub: Any, tmp_path: Path, clock: Any
) -> None:
    rig = Rig(db_url, fake_hub, tmp_path, clock, max_concurrent=1)
    try:
        first = rig.running_job("alice")
        rig.manager.grant("bob", 100)
        second = rig.manager.enqueue("bob", "upscale_image", {"image": "api/bob.png"}).job
        assert second.status is Status.QUEUED
        assert rig.post(rig.body(first, success=True)).status_code == 200
        wait_for(lambda: rig.manager.job_detail(second.id).job.status is Status.RUNNING)
        assert check_invariants(rig.db_url, 1) == []
    finally:
        rig.close()
    assert any("fill: 1 started" in line for line in rig.lines)


# --- refusals --------------------------------------------------------------------------------------


def test_bad_token_or_path_is_404_and_stores_nothing(rig: Rig) -> None:
    job = rig.running_job()
    body = rig.body(job, success=False)
    wrong = secrets.token_urlsafe(32)
    targets = [rig.url(job.id, wrong), rig.url(job.id, TOKEN[:-1]), rig.url(job.id, TOKEN + "x"),
               rig.url(job.id, ""), f"/hooks/{TOKEN}", f"/runninghub/webhook/{TOKEN}/", "/"]
    answers = [rig.http.post(t, content=body) for t in targets]
    assert {a.status_code for a in answers} == {404}
    assert {a.text for a in answers} == {answers[0].text}  # nothing says which part was wrong
    assert TOKEN not in answers[0].text
    assert rig.manager.job_detail(job.id).job.status is Status.RUNNING
    assert rig.manager.unmatched_webhooks() == [] and refunds(rig.manager, job.id) == 0
    assert len(rig.lines) == len(targets) and all(" 404 " in line for line in rig.lines)
    assert wrong not in "\n".join(rig.lines)


def test_malformed_bodies_are_400_and_not_kept(rig: Rig) -> None:
    job = rig.running_job()
    for body in (b"{not json", b"", b"[]", b'{"event": "TASK_END"}', b"\xff\xfe"):
        answer = rig.post(body, job.id)
        assert answer.status_code == 400, body
        assert "error" in answer.json()
    assert rig.http.post(rig.url("x"), content=rig.body(job, True)).status_code == 400  # type: ignore[arg-type]
    assert rig.manager.unmatched_webhooks() == []
    assert rig.manager.job_detail(job.id).job.status is Status.RUNNING


def test_other_methods_are_405(rig: Rig) -> None:
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW"):
        answer = rig.http.request(method, rig.url())
        assert answer.status_code == 405, method
        assert answer.headers["allow"] == "POST"


def raw_request(rig: Rig, head: bytes, body: bytes = b"", *, read_seconds: float = 5.0,
                hang_up: bool = False) -> tuple[int, bytes]:
    """Send bytes as they are (then half-close with hang_up); return the status and the answer."""
    with socket.create_connection((rig.receiver.host, rig.receiver.port), timeout=read_seconds) as sock:
        sock.sendall(head + body)
        if hang_up:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def test_oversized_bodies_are_413_and_refused_before_reading(rig: Rig) -> None:
    path = rig.url().encode()
    # Only the headers are sent: the answer comes without waiting for the announced body.
    started = time.monotonic()
    status, _ = raw_request(rig, b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                            % (MAX_BODY_BYTES + 1))
    assert status == 413 and time.monotonic() - started < 4
    # A client that sends the whole body before reading gets to read the 413 (the server drains
    # the rest, bounded, instead of closing on unread data, which resets the connection).
    big = b"x" * (3 * MAX_BODY_BYTES)  # more than the socket buffers hold
    head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big)
    assert raw_request(rig, head, big)[0] == 413
    assert rig.post(big).status_code == 413
    # Chunked: refused as soon as the running total passes the cap.
    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"x" * 65536
    assert rig.http.post(rig.url(), content=chunks()).status_code == 413
    assert rig.manager.unmatched_webhooks() == []


def test_missing_invalid_and_chunked_lengths(rig: Rig) -> None:
    job = rig.running_job()
    body = rig.body(job, success=True)
    path = rig.url(job.id).encode()
    start = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n"
    assert raw_request(rig, start + b"\r\n", body)[0] == 411
    assert raw_request(rig, start + b"Content-Length: -5\r\n\r\n", body)[0] == 400
    assert raw_request(rig, start + b"Content-Length: 12abc\r\n\r\n", body)[0] == 400
    assert raw_request(rig, start + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", body)[0] == 400
    assert raw_request(rig, start + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body),
                       body)[0] == 400
    assert raw_request(rig, start + b"Transfer-Encoding: gzip\r\n\r\n", body)[0] == 400
    assert raw_request(rig, start + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")[0] == 400
    # A short body (the client hangs up) is 400, not a hang.
    assert raw_request(rig, start + b"Content-Length: %d\r\n\r\n" % (len(body) + 10), body[:20], hang_up=True)[0] == 400
    assert rig.manager.job_detail(job.id).job.status is Status.RUNNING
    # A well-formed chunked body is applied.
    half = len(body) // 2
    chunked = b"%x\r\n%s\r\n%x;ext=1\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:])
    status, answer = raw_request(rig, start + b"Transfer-Encoding: chunked\r\n\r\n", chunked)
    assert status == 200, answer
    assert rig.manager.job_detail(job.id).job.status is Status.COMPLETED


def test_a_client_too_slow_to_send_its_body_gets_408_and_frees_the_thread(
    db_url: str, fake_hub: Any, tmp_path: Path, clock: Any
) -> None:
    rig = Rig(db_url, fake_hub, tmp_path, clock)
    rig.receiver.read_timeout = 0.5
    try:
        start = b"POST " + rig.url().encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        began = time.monotonic()
        assert raw_request(rig, start, b'{"event"')[0] == 408
        assert time.monotonic() - began < 4
        assert rig.manager.unmatched_webhooks() == []
    finally:
        rig.close()


def test_expect_100_continue_comes_only_after_the_token_and_the_length_pass(rig: Rig) -> None:
    job = rig.running_job()
    body = rig.body(job, success=True)
    with socket.create_connection((rig.receiver.host, rig.receiver.port), timeout=5) as sock:
        sock.sendall(b"POST " + rig.url(job.id).encode() + b" HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert rig.manager.job_detail(job.id).job.status is Status.COMPLETED
    refused = [(rig.url(token="no" * 20), b"%d" % len(body), 404), (rig.url(), b"%d" % (MAX_BODY_BYTES + 1), 413)]
    for path, length, expected in refused:
        status, answer = raw_request(rig, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                     b"Expect: 100-continue\r\nContent-Length: " + length + b"\r\n\r\n")
        assert status == expected and b"100 Continue" not in answer


def test_unreadable_requests_never_echo_the_token(rig: Rig) -> None:
    for request in (b"POST /runninghub/webhook/%s HTTP/9.9\r\n\r\n", b"POST /runninghub/webhook/%s x y\r\n\r\n",
                    b"POST /runninghub/webhook/%s HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n"):
        status, answer = raw_request(rig, request % TOKEN.encode())
        assert status in (400, 431, 505) and TOKEN.encode() not in answer
    assert len(rig.lines) == 3  # one line each, checked for the token by the fixture


def test_connections_beyond_the_cap_get_503_at_once(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    import aiqueue.receiver

    monkeypatch.setattr(aiqueue.receiver, "MAX_CONNECTIONS", 2)
    held = [socket.create_connection((rig.receiver.host, rig.receiver.port), timeout=5) for _ in range(2)]
    try:
        for sock in held:  # each holds a handler thread, waiting for the rest of its headers
            sock.sendall(b"POST " + rig.url().encode() + b" HTTP/1.1\r\n")
        time.sleep(0.3)
        started = time.monotonic()
        status, answer = raw_request(rig, b"POST " + rig.url().encode() + b" HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert status == 503 and b"Retry-After" in answer and time.monotonic() - started < 2
    finally:
        for sock in held:
            sock.close()
    wait_for(lambda: rig.post(b"{}").status_code == 400)  # the slots come back
    assert any("too many connections" in line for line in rig.lines)


def test_shutdown_lets_the_request_in_flight_finish(rig: Rig) -> None:
    job = rig.running_job()
    body = rig.body(job, success=False)
    with socket.create_connection((rig.receiver.host, rig.receiver.port), timeout=10) as sock:
        sock.sendall(b"POST " + rig.url(job.id).encode() + b" HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body[:10])
        time.sleep(0.3)  # the handler is reading the body
        stopper = threading.Thread(target=rig.receiver.shutdown)
        stopper.start()
        time.sleep(0.3)
        assert stopper.is_alive()  # waits for the request in flight
        sock.sendall(body[10:])
        answer = sock.recv(65536)
        stopper.join(timeout=10)
    assert answer.startswith(b"HTTP/1.1 200 ") and not stopper.is_alive()
    assert rig.manager.job_detail(job.id).job.status is Status.FAILED and refunds(rig.manager, job.id) == 1
    with pytest.raises(httpx.ConnectError):
        rig.post(body)


def test_database_errors_are_503_so_the_provider_retries(rig: Rig) -> None:
    job = rig.running_job()
    body = rig.body(job, success=False)
    rig.manager.store.drop_schema()
    answer = rig.post(body, job.id)
    assert answer.status_code == 503 and answer.headers["retry-after"] == "30"
    assert "schema" not in answer.text and rig.db_url not in answer.text  # details stay in the log
    assert "schema_missing" in rig.lines[-1]


# --- concurrency -------------------------------------------------------------------------------


def test_eight_threads_posting_the_same_failure_refund_once(rig: Rig) -> None:
    job = rig.running_job()
    body = rig.body(job, success=False)
    barrier = threading.Barrier(8)
    answers: list[httpx.Response] = []
    errors: list[BaseException] = []

    def post() -> None:
        try:
            with httpx.Client(base_url=rig.receiver.base_url, timeout=30) as client:
                barrier.wait()
                answers.append(client.post(rig.url(job.id), content=body))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [a.status_code for a in answers] == [200] * 8
    assert sorted(a.json()["changed"] for a in answers) == [False] * 7 + [True]
    assert refunds(rig.manager, job.id) == 1 and rig.manager.balance("alice").balance == 100
    assert check_invariants(rig.db_url, 3) == []


# --- the job hint: a task whose id was never stored --------------------------------------------


def test_a_lost_submit_answer_is_matched_by_the_job_in_the_url(rig: Rig) -> None:
    rig.hub.script_submits(["lost"])  # the task is created, the answer never comes
    rig.manager.grant("alice", 100)
    job = rig.manager.enqueue("alice", "upscale_image", {"image": "api/a.png"}).job
    assert job.status is Status.STARTING and job.provider_task_id is None
    (task_id,) = rig.hub.tasks

    rig.hub.finish_task(task_id, success=False)  # RunningHub delivers to the URL with ?job=ID

    assert rig.hub.deliveries[-1]["status"] == 200
    detail = rig.manager.job_detail(job.id)
    assert detail.job.status is Status.FAILED and detail.job.provider_task_id == task_id
    assert [(e.from_status, e.to_status) for e in detail.events][-2:] == [
        (Status.STARTING, Status.RUNNING), (Status.RUNNING, Status.FAILED)]
    assert "from its webhook" in (detail.events[-2].detail or "")
    assert refunds(rig.manager, job.id) == 1 and rig.manager.balance("alice").balance == 100
    assert rig.manager.unmatched_webhooks() == []
    assert check_invariants(rig.db_url, 3) == []


class Crash(Exception):
    pass


def test_finish_webhook_attaches_the_task_of_a_submit_that_crashed_before_storing_it(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager alone (no HTTP): the process died right after RunningHub accepted the task."""

    def fault(point: str) -> None:
        if point == "fill:after-accept":
            raise Crash(point)

    monkeypatch.setattr(QueueManager, "fault", staticmethod(fault))
    rig.manager.grant("alice", 100)
    with pytest.raises(Crash):
        rig.manager.enqueue("alice", "upscale_image", {"image": "api/a.png"})
    monkeypatch.undo()
    (task_id,) = rig.hub.tasks
    job = rig.manager.status().running[0]
    assert job.status is Status.STARTING and job.provider_task_id is None and job.error is None
    body = rig.hub.finish_task(task_id, success=True, deliver=False)

    without_hint = rig.manager.finish_webhook(body)
    assert without_hint.job is None and len(rig.manager.unmatched_webhooks()) == 1
    result = rig.manager.finish_webhook(body, job.id)
    assert result.changed and result.job is not None and result.job.status is Status.COMPLETED
    assert result.job.provider_task_id == task_id and rig.manager.unmatched_webhooks() == []
    again = rig.manager.finish_webhook(body, job.id)
    assert not again.changed and again.job is not None and again.job.id == job.id
    assert refunds(rig.manager, job.id) == 0 and rig.manager.balance("alice").balance == 95
    assert check_invariants(rig.db_url, 3) == []


def test_a_late_answer_after_the_webhook_attached_the_task_changes_nothing(rig: Rig) -> None:
    rig.hub.script_submits(["late:1"])  # the task exists at once, the answer comes a second later
    rig.manager.grant("alice", 100)
    done: list[Any] = []
    enqueue = threading.Thread(
        target=lambda: done.append(rig.manager.enqueue("alice", "upscale_image", {"image": "api/a.png"})))
    enqueue.start()
    wait_for(lambda: len(rig.hub.tasks) == 1)
    (task_id,) = rig.hub.tasks
    rig.hub.finish_task(task_id, success=True)
    assert rig.hub.deliveries[-1]["status"] == 200
    enqueue.join()
    job = done[0].job
    assert job.status is Status.COMPLETED and job.provider_task_id == task_id
    assert done[0].process.started[0].id == job.id
    assert not any(r["path"].endswith("/cancel") for r in rig.hub.requests)  # the task is not cancelled
    assert check_invariants(rig.db_url, 3) == []


def test_the_hint_never_moves_a_task_onto_another_job(rig: Rig) -> None:
    running = rig.running_job("alice")
    rig.manager.grant("bob", 100)
    queued = rig.manager.enqueue("bob", "upscale_image", {"image": "api/b.png"}, start=False).job
    for hint in (running.id, queued.id, 999_999):
        body = json.dumps({"event": "TASK_END", "taskId": f"19{hint:017d}",
                           "eventData": {"status": "FAILED", "errorMessage": "boom"}}).encode()
        assert rig.post(body, hint).status_code == 200
    assert rig.manager.job_detail(running.id).job.status is Status.RUNNING
    assert rig.manager.job_detail(running.id).job.provider_task_id == running.provider_task_id
    assert rig.manager.job_detail(queued.id).job.status is Status.QUEUED
    assert len(rig.manager.unmatched_webhooks()) == 3
    assert check_invariants(rig.db_url, 3) == []


# --- the real command ------------------------------------------------------------------------------


def test_the_real_command_serves_logs_without_the_token_and_stops_on_sigterm(
    db_url: str, fake_hub: Any, tmp_path: Path, clock: Any
) -> None:
    rig = Rig(db_url, fake_hub, tmp_path, clock)  # the database, a running job and a body to post
    try:
        job = rig.running_job()
        body = rig.body(job, success=False)
    finally:
        rig.close()
    env = {**os.environ, "AIQUEUE_WEBHOOK_TOKEN": TOKEN, "RUNNINGHUB_API_KEY": API_KEY}
    command = [sys.executable, "-m", "aiqueue", "--config", str(tmp_path / "aiqueue.toml"), "--db", db_url,
               "webhook", "serve", "--port", "0", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert process.stdout is not None
        started = json.loads(process.stdout.readline())
        assert started["listening"].startswith("http://127.0.0.1:") and started["port"] > 0
        assert started["path"] == "/runninghub/webhook/***"
        with httpx.Client(base_url=started["listening"], timeout=10) as client:
            path = f"/runninghub/webhook/{TOKEN}?job={job.id}"
            assert client.post(path, content=body).status_code == 200
            assert client.post(path, content=body).status_code == 200
            assert client.post(f"/runninghub/webhook/{TOKEN[::-1]}", content=body).status_code == 404
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert out == b""  # the start-up line only (read above)
    log = err.decode()
    assert TOKEN not in log and TOKEN[::-1] not in log
    requests = [line for line in log.splitlines() if " POST " in line]
    assert [line.split()[4] for line in requests] == ["200", "200", "404"]
    assert "webhook receiver stopped" in log

    settings = load_settings(tmp_path / "aiqueue.toml", db_url=db_url, env={"AIQUEUE_WEBHOOK_TOKEN": TOKEN})
    manager = QueueManager(Store(settings.database_url), settings)
    try:
        assert manager.job_detail(job.id).job.status is Status.FAILED
        assert refunds(manager, job.id) == 1
    finally:
        manager.store.dispose()


def test_serve_without_a_token_is_a_config_error(tmp_path: Path, fake_hub: Any) -> None:
    from tests.cli_helpers import run_cli

    config = tmp_path / "plain.toml"
    config.write_text(f'[provider]\nbase_url = "{fake_hub.base_url}"\n' + TOOLS_TOML, encoding="utf-8")
    result = run_cli("--config", str(config), "--db", f"sqlite:///{tmp_path / 'x.db'}", "webhook", "serve", "--json")
    assert result.code == 3 and result.error()["key"] == "webhook.token"


def test_config_show_masks_the_token(tmp_path: Path) -> None:
    from tests.cli_helpers import run_cli

    config = write_webhook_config(tmp_path / "aiqueue.toml", "http://127.0.0.1:9", "https://queue.example.org",
                                  token=TOKEN)
    shown = run_cli("--config", str(config), "config", "show", "--json").json()
    assert shown["webhook"]["token"] == "***" and shown["sources"]["webhook.token"] == "file"
    assert shown["webhook"]["submit_url"] == "https://queue.example.org/runninghub/webhook/***?job=ID"
    table = run_cli("--config", str(config), "config", "show")
    assert table.code == 0 and "webhook.token" in table.stdout
    for run in (table, run_cli("--config", str(config), "config", "show", "--json")):
        assert TOKEN not in run.stdout + run.stderr


def test_webhook_serve_help_has_an_example() -> None:
    from tests.cli_helpers import run_cli

    result = run_cli("webhook", "serve", "--help")
    assert result.code == 0 and "Example: " in result.stdout and "--json" in result.stdout


def test_the_provider_client_masks_the_token_an_answer_echoes(tmp_path: Path) -> None:
    from aiqueue.cli.wiring import LazyRunningHub

    def echo(request: httpx.Request) -> httpx.Response:  # an error answer quoting our request
        sent = json.loads(request.content)
        return httpx.Response(200, json={"code": 803, "msg": f"bad webhookUrl {sent['webhookUrl']}", "data": None})

    url = f"https://queue.example.org/runninghub/webhook/{TOKEN}?job=3"
    with httpx.Client(transport=httpx.MockTransport(echo)) as http:
        client = RunningHubClient("https://rh.example", API_KEY, http=http, secrets=[TOKEN])
        outcome = client.submit("1990000000000000001", [], url)
    assert outcome.kind == "rejected" and "bad webhookUrl" in outcome.message
    assert TOKEN not in outcome.message and "/runninghub/webhook/***?job=3" in outcome.message
    # The CLI's wiring hands the configured token to the client it builds.
    config = write_webhook_config(tmp_path / "c.toml", "https://rh.example", token=TOKEN)
    lazy = LazyRunningHub(load_settings(config, env={"RUNNINGHUB_API_KEY": API_KEY}))
    try:
        assert lazy().redact(f"<{TOKEN}>") == "<***>"
    finally:
        lazy.close()

"""The real client against a real FakeRunningHub on 127.0.0.1, plus raw HTTP and webhook delivery."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from aiqueue.provider.base import CancelOutcome, SubmitOutcome, TaskOutcome
from aiqueue.provider.codes import interpret_query_result
from aiqueue.provider.fake_server import FakeRunningHub, serve_forever_cli
from aiqueue.provider.runninghub import RunningHubClient
from aiqueue.webhooks import parse_webhook

KEY = "fake-key-00112233445566778899aabbccddeeff"
WEBAPP = "1990000000000000001"
NODES = [{"nodeId": "12", "fieldName": "prompt", "fieldValue": "a red bicycle"}]
TASK_ID = re.compile(r"\d{19}")


@pytest.fixture
def fake() -> Iterator[FakeRunningHub]:
    with FakeRunningHub(api_key=KEY) as server:
        yield server


@pytest.fixture
def client(fake: FakeRunningHub) -> Iterator[RunningHubClient]:
    with RunningHubClient(fake.base_url, KEY, timeout=2.0) as rh:
        yield rh


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0) as c:
        yield c


class Receiver:
    """A tiny webhook receiver on 127.0.0.1 that stores the raw bodies it gets."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[bytes] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/runninghub?job=7"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def accepted(client: RunningHubClient, webhook_url: str | None = None) -> str:
    outcome = client.submit(WEBAPP, NODES, webhook_url)
    assert outcome.kind == "accepted", outcome
    assert outcome.task_id is not None
    return outcome.task_id


# -- submit behaviours through the real client ----------------------------------------------


def test_accept_creates_a_task_and_logs_what_the_client_sent(
    fake: FakeRunningHub, client: RunningHubClient
) -> None:
    outcome = client.submit(WEBAPP, NODES, "http://127.0.0.1:9/hook")

    assert outcome.kind == "accepted" and outcome.message == "QUEUED"
    assert outcome.task_id is not None and TASK_ID.fullmatch(outcome.task_id)
    task = fake.tasks[outcome.task_id]
    assert (task.status, task.webapp_id, task.node_info_list, task.webhook_url, task.cancelled) == (
        "QUEUED",
        WEBAPP,
        NODES,
        "http://127.0.0.1:9/hook",
        False,
    )
    (request,) = fake.requests
    assert request["path"] == "/task/openapi/ai-app/run"
    assert request["body"] == {
        "apiKey": "***",
        "webappId": WEBAPP,
        "nodeInfoList": NODES,
        "webhookUrl": "http://127.0.0.1:9/hook",
    }
    assert request["key_in"] == ["body", "bearer"] and request["authorized"] is True
    assert KEY not in json.dumps(fake.requests)


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        ("busy", SubmitOutcome("busy", code=421, message="421 TASK_QUEUE_MAXED")),
        ("busy415", SubmitOutcome("busy", code=415, message="415 TASK_INSTANCE_MAXED")),
        ("reject:803", SubmitOutcome("rejected", code=803, message="803 APIKEY_INVALID_NODE_INFO")),
        (
            "reject:416",
            SubmitOutcome("rejected", code=416, message="416 TASK_CREATE_FAILED_BY_NOT_ENOUGH_WALLET"),
        ),
        ("reject:1003", SubmitOutcome("busy", code=1003, message="1003 rate limit exceeded")),
        ("http500", SubmitOutcome("unknown", message="HTTP 500 Internal Server Error")),
    ],
)
def test_scripted_answers(
    fake: FakeRunningHub, client: RunningHubClient, behaviour: str, expected: SubmitOutcome
) -> None:
    fake.script_submits([behaviour])
    assert client.submit(WEBAPP, NODES, None) == expected
    assert fake.tasks == {}


def test_html_page_is_unknown(fake: FakeRunningHub, client: RunningHubClient) -> None:
    fake.script_submits(["html"])
    outcome = client.submit(WEBAPP, NODES, None)
    assert outcome.kind == "unknown"
    assert outcome.message.startswith("answer was not JSON: <!DOCTYPE html>")


def test_drop_is_unknown(fake: FakeRunningHub, client: RunningHubClient) -> None:
    fake.script_submits(["drop"])
    outcome = client.submit(WEBAPP, NODES, None)
    assert outcome.kind == "unknown"
    assert outcome.message.startswith("connection lost after the request was sent")


def test_hang_with_a_short_client_timeout_is_unknown(fake: FakeRunningHub) -> None:
    fake.script_submits(["hang"])
    client = RunningHubClient(fake.base_url, KEY, timeout=0.3)
    started = time.monotonic()
    outcome = client.submit(WEBAPP, NODES, None)
    assert outcome == SubmitOutcome("unknown", message="no answer within 0.3s after the request was sent")
    assert time.monotonic() - started < 2.0
    assert fake.requests[-1]["path"] == "/task/openapi/ai-app/run"  # it was sent and received


def test_stop_ends_a_hang_promptly() -> None:
    fake = FakeRunningHub().start()
    fake.set_default_submit("hang")
    client = RunningHubClient(fake.base_url, "k", timeout=30.0)
    results: list[SubmitOutcome] = []
    thread = threading.Thread(target=lambda: results.append(client.submit(WEBAPP, NODES, None)))
    thread.start()
    while not fake.requests:
        time.sleep(0.01)
    started = time.monotonic()
    fake.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert time.monotonic() - started < 2.0
    assert results[0].kind == "unknown"


def test_delay_then_accept(fake: FakeRunningHub, client: RunningHubClient) -> None:
    fake.script_submits(["delay:0.3"])
    started = time.monotonic()
    outcome = client.submit(WEBAPP, NODES, None)
    assert outcome.kind == "accepted"
    assert time.monotonic() - started >= 0.3


def test_delay_longer_than_the_client_timeout_is_unknown(fake: FakeRunningHub) -> None:
    fake.script_submits(["delay:1"])
    outcome = RunningHubClient(fake.base_url, KEY, timeout=0.2).submit(WEBAPP, NODES, None)
    assert outcome.kind == "unknown"


def test_script_is_consumed_in_order_then_the_default_applies(
    fake: FakeRunningHub, client: RunningHubClient
) -> None:
    fake.script_submits(["busy", "reject:803"])
    kinds = [client.submit(WEBAPP, NODES, None).kind for _ in range(4)]
    assert kinds == ["busy", "rejected", "accepted", "accepted"]
    fake.set_default_submit("busy")
    assert [client.submit(WEBAPP, NODES, None).kind for _ in range(2)] == ["busy", "busy"]


@pytest.mark.parametrize("behaviour", ["nope", "reject:abc", "reject:0", "delay:-1", "delay:x", "busy:3"])
def test_unknown_behaviours_are_refused(fake: FakeRunningHub, behaviour: str) -> None:
    with pytest.raises(ValueError, match="unknown submit behaviour"):
        fake.script_submits([behaviour])
    with pytest.raises(ValueError):
        fake.set_default_submit(behaviour)


def test_wrong_key_is_802(fake: FakeRunningHub) -> None:
    outcome = RunningHubClient(fake.base_url, "not-the-key").submit(WEBAPP, NODES, None)
    assert outcome == SubmitOutcome("rejected", code=802, message="802 APIKEY_UNAUTHORIZED")
    assert fake.requests[-1]["authorized"] is False
    assert fake.tasks == {}


@pytest.mark.parametrize(
    ("nodes", "code"),
    [([{"nodeId": "12", "fieldName": "prompt"}], 803), (["not-a-node"], 803)],
)
def test_bad_node_info_list_is_803(client: RunningHubClient, nodes: list[Any], code: int) -> None:
    outcome = client.submit(WEBAPP, nodes, None)
    assert (outcome.kind, outcome.code) == ("rejected", code)


# -- outputs, cancel, account status -------------------------------------------------------


def test_outputs_follow_the_task_lifecycle(fake: FakeRunningHub, client: RunningHubClient) -> None:
    task_id = accepted(client)
    assert client.outputs(task_id) == TaskOutcome("pending", message="813 APIKEY_TASK_IS_QUEUED", code=813)
    fake.set_running(task_id)
    assert client.outputs(task_id) == TaskOutcome("pending", message="804 APIKEY_TASK_IS_RUNNING", code=804)
    fake.finish_task(
        task_id, outputs=["https://cdn.example.com/out/1.png", "https://cdn.example.com/out/2.mp4"]
    )
    assert client.outputs(task_id) == TaskOutcome(
        "success", outputs=["https://cdn.example.com/out/1.png", "https://cdn.example.com/out/2.mp4"], code=0
    )


def test_outputs_of_a_failed_task_carry_the_reason(fake: FakeRunningHub, client: RunningHubClient) -> None:
    task_id = accepted(client)
    fake.finish_task(
        task_id,
        success=False,
        error="Allocation on device",
        node_id="7",
        node_name="VAEDecode",
        exception_type="torch.OutOfMemoryError",
    )
    assert client.outputs(task_id) == TaskOutcome(
        "failed", message="node 7 (VAEDecode) torch.OutOfMemoryError: Allocation on device", code=805
    )


def test_outputs_of_an_unknown_task_is_807(client: RunningHubClient) -> None:
    assert client.outputs("1990000000000000999") == TaskOutcome(
        "failed", message="807 APIKEY_TASK_NOT_FOUND", code=807
    )


def test_cancel(fake: FakeRunningHub, client: RunningHubClient) -> None:
    task_id = accepted(client)
    assert client.cancel(task_id) == CancelOutcome(ok=True, message="cancelled")
    assert fake.tasks[task_id].cancelled is True
    assert fake.tasks[task_id].status == "CANCEL"
    assert client.outputs(task_id) == TaskOutcome("failed", message="Cancelled: task was cancelled", code=805)
    assert client.cancel("1990000000000000999") == CancelOutcome(
        ok=False, message="807 APIKEY_TASK_NOT_FOUND"
    )


def test_cancel_when_the_server_is_gone_is_not_ok() -> None:
    fake = FakeRunningHub().start()
    url = fake.base_url
    fake.stop()
    outcome = RunningHubClient(url, "k", timeout=0.5).cancel("1")
    assert outcome.ok is False and outcome.message.startswith("connection failed")


def test_account_status_counts_queued_and_running_tasks_as_strings(
    fake: FakeRunningHub, client: RunningHubClient
) -> None:
    first, second, third = accepted(client), accepted(client), accepted(client)
    fake.set_running(second)
    fake.finish_task(third)
    status = client.account_status()
    assert status == {
        "remainCoins": "1200",
        "currentTaskCounts": "2",
        "remainMoney": None,
        "currency": None,
        "apiType": "NORMAL",
    }
    assert fake.requests[-1]["body"] == {"apikey": "***"}
    assert first in fake.tasks


# -- raw HTTP: documented shapes, third-party callers, v2 ---------------------------------------


def test_third_party_call_with_another_host_header_and_only_a_bearer_key(
    fake: FakeRunningHub, http: httpx.Client
) -> None:
    response = http.post(
        fake.base_url + "/task/openapi/ai-app/run",
        headers={"Host": "www.runninghub.cn", "Authorization": f"Bearer {KEY}"},
        json={"webappId": WEBAPP, "nodeInfoList": NODES},
    )
    assert response.status_code == 200
    assert re.search(r'"taskId": "\d{19}"', response.text)  # a JSON string, never a number
    payload = response.json()
    assert payload["code"] == 0 and payload["msg"] == "success"
    assert payload["data"]["taskStatus"] == "QUEUED" and payload["data"]["netWssUrl"] is None
    assert fake.requests[-1]["host"] == "www.runninghub.cn"
    assert fake.requests[-1]["key_in"] == ["bearer"]


def test_missing_key_is_802_with_http_200(fake: FakeRunningHub, http: httpx.Client) -> None:
    response = http.post(
        fake.base_url + "/task/openapi/ai-app/run", json={"webappId": WEBAPP, "nodeInfoList": NODES}
    )
    assert (response.status_code, response.json()) == (
        200,
        {"code": 802, "msg": "APIKEY_UNAUTHORIZED", "data": None},
    )


def test_workflow_create_and_status_endpoint(fake: FakeRunningHub, http: httpx.Client) -> None:
    created = http.post(
        fake.base_url + "/task/openapi/create", json={"apiKey": KEY, "workflowId": "1990000000000000555"}
    ).json()
    task_id = created["data"]["taskId"]
    assert fake.tasks[task_id].workflow_id == "1990000000000000555"

    def status() -> Any:
        return http.post(
            fake.base_url + "/task/openapi/status", json={"apiKey": KEY, "taskId": task_id}
        ).json()

    assert status() == {"code": 0, "msg": "success", "data": "QUEUED"}
    fake.finish_task(task_id, success=False)
    assert status()["data"] == "FAILED"


def test_unknown_path_is_412(fake: FakeRunningHub, http: httpx.Client) -> None:
    response = http.post(fake.base_url + "/task/openapi/ai-app/runn", json={"apiKey": KEY})
    assert (response.status_code, response.json()) == (
        200,
        {"code": 412, "msg": "TOKEN_INVALID", "data": None},
    )
    assert (
        RunningHubClient(fake.base_url + "/oops", KEY).submit(WEBAPP, NODES, None).message
        == "412 TOKEN_INVALID"
    )


def test_v2_run_and_query(fake: FakeRunningHub, http: httpx.Client) -> None:
    bearer = {"Authorization": f"Bearer {KEY}"}
    run = http.post(
        fake.base_url + f"/openapi/v2/run/ai-app/{WEBAPP}", headers=bearer, json={"nodeInfoList": NODES}
    ).json()
    assert run["errorCode"] == "" and run["status"] == "QUEUED" and run["results"] is None
    task_id = run["taskId"]
    assert TASK_ID.fullmatch(task_id) and fake.tasks[task_id].webapp_id == WEBAPP

    def query() -> Any:
        return http.post(fake.base_url + "/openapi/v2/query", headers=bearer, json={"taskId": task_id}).json()

    assert interpret_query_result(query()).kind == "pending"
    fake.finish_task(task_id, outputs=["https://cdn.example.com/v2.png"])
    result = query()
    assert result["status"] == "SUCCESS" and result["results"] == [
        {"url": "https://cdn.example.com/v2.png", "outputType": "png", "text": None}
    ]
    assert interpret_query_result(result) == TaskOutcome(
        "success", outputs=["https://cdn.example.com/v2.png"]
    )


def test_v2_errors_are_flat(fake: FakeRunningHub, http: httpx.Client) -> None:
    unauthorized = http.post(
        fake.base_url + f"/openapi/v2/run/ai-app/{WEBAPP}",
        headers={"Authorization": "Bearer nope"},
        json={"nodeInfoList": NODES},
    ).json()
    assert (unauthorized["errorCode"], unauthorized["errorMessage"]) == ("802", "APIKEY_UNAUTHORIZED")
    fake.script_submits(["busy"])
    busy = http.post(
        fake.base_url + f"/openapi/v2/run/ai-app/{WEBAPP}",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"nodeInfoList": NODES},
    ).json()
    assert (busy["errorCode"], busy["errorMessage"], busy["taskId"]) == ("421", "TASK_QUEUE_MAXED", "")
    missing = http.post(
        fake.base_url + "/openapi/v2/query", headers={"Authorization": f"Bearer {KEY}"}, json={"taskId": "1"}
    ).json()
    assert interpret_query_result(missing) == TaskOutcome(
        "failed", message="807 APIKEY_TASK_NOT_FOUND", code=807
    )


# -- webhooks -------------------------------------------------------------------------------


def test_success_webhook_is_delivered_and_parses(
    fake: FakeRunningHub, client: RunningHubClient, receiver: Receiver
) -> None:
    task_id = accepted(client, receiver.url)
    body = fake.finish_task(task_id, outputs=["https://cdn.example.com/a.png"])

    assert receiver.bodies == [body]
    outer = json.loads(body)
    assert list(outer) == ["event", "taskId", "eventData"] and isinstance(outer["eventData"], str)
    assert json.loads(outer["eventData"]) == {
        "code": 0,
        "msg": "success",
        "data": [
            {"fileUrl": "https://cdn.example.com/a.png", "fileType": "png", "taskCostTime": 42, "nodeId": "9"}
        ],
    }
    event = parse_webhook(receiver.bodies[0])
    assert (event.task_id, event.outcome.kind, event.outcome.outputs) == (
        task_id,
        "success",
        ["https://cdn.example.com/a.png"],
    )
    assert fake.deliveries == [{"task_id": task_id, "url": receiver.url, "status": 200, "error": None}]


def test_failure_webhook_has_the_documented_failed_reason(
    fake: FakeRunningHub, client: RunningHubClient, receiver: Receiver
) -> None:
    task_id = accepted(client, receiver.url)
    fake.finish_task(task_id, success=False)
    envelope = json.loads(json.loads(receiver.bodies[0])["eventData"])
    reason = envelope["data"]["failedReason"]
    assert (envelope["code"], envelope["msg"]) == (805, "APIKEY_TASK_STATUS_ERROR")
    assert set(reason) == {
        "node_id",
        "node_name",
        "exception_type",
        "exception_message",
        "traceback",
        "current_inputs",
        "current_outputs",
    }
    assert isinstance(json.loads(reason["traceback"]), list)
    assert parse_webhook(receiver.bodies[0]).outcome == TaskOutcome(
        "failed", message="node 31 (KSampler) RuntimeError: CUDA out of memory", code=805
    )


def test_v2_task_gets_a_v2_shaped_webhook(
    fake: FakeRunningHub, http: httpx.Client, receiver: Receiver
) -> None:
    run = http.post(
        fake.base_url + f"/openapi/v2/run/ai-app/{WEBAPP}",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"nodeInfoList": NODES, "webhookUrl": receiver.url},
    ).json()
    fake.finish_task(run["taskId"], success=False, error="stale file handle", node_name="LoadImage")
    assert isinstance(json.loads(receiver.bodies[0])["eventData"], dict)
    assert (
        parse_webhook(receiver.bodies[0]).outcome.message
        == "node 31 (LoadImage) RuntimeError: stale file handle"
    )


def test_delivery_errors_are_recorded_not_raised(fake: FakeRunningHub, client: RunningHubClient) -> None:
    dead = FakeRunningHub().start()
    dead_url = dead.base_url + "/hook"
    dead.stop()
    task_id = accepted(client, dead_url)
    body = fake.finish_task(task_id)
    assert parse_webhook(body).outcome.kind == "success"
    (delivery,) = fake.deliveries
    assert delivery["status"] is None and delivery["error"]


def test_no_delivery_when_asked_not_to_or_without_webhook_url(
    fake: FakeRunningHub, client: RunningHubClient, receiver: Receiver
) -> None:
    fake.finish_task(accepted(client, receiver.url), deliver=False)
    fake.finish_task(accepted(client, None))
    assert receiver.bodies == [] and fake.deliveries == []


def test_finish_of_an_unknown_task_raises_key_error(fake: FakeRunningHub) -> None:
    with pytest.raises(KeyError):
        fake.finish_task("1990000000000000999")
    with pytest.raises(KeyError):
        fake.set_running("1990000000000000999")


# -- admin over HTTP ----------------------------------------------------------------------


def test_admin_endpoints_drive_a_fake_in_another_process(
    fake: FakeRunningHub, client: RunningHubClient, http: httpx.Client, receiver: Receiver
) -> None:
    admin = fake.base_url + "/__fake__/"
    script = http.post(admin + "script", json={"submits": ["busy", "reject:803"], "default": "accept"})
    assert script.json() == {"ok": True, "submits": ["busy", "reject:803"], "default": "accept"}
    assert [client.submit(WEBAPP, NODES, receiver.url).kind for _ in range(3)] == [
        "busy",
        "rejected",
        "accepted",
    ]

    tasks = http.get(admin + "tasks").json()["tasks"]
    (task_id,) = tasks
    assert tasks[task_id]["status"] == "QUEUED" and tasks[task_id]["webhook_url"] == receiver.url

    assert http.post(admin + "running", json={"taskId": task_id}).json() == {"ok": True}
    assert client.outputs(task_id).code == 804

    finished = http.post(admin + "finish", json={"taskId": task_id, "success": False, "error": "boom"}).json()
    assert finished["webhook"].encode() == receiver.bodies[0]
    assert finished["delivery"]["status"] == 200
    assert (
        parse_webhook(finished["webhook"].encode()).outcome.message == "node 31 (KSampler) RuntimeError: boom"
    )

    requests_text = http.get(admin + "requests").text
    assert "/task/openapi/ai-app/run" in requests_text and KEY not in requests_text
    assert len(http.get(admin + "deliveries").json()["deliveries"]) == 1

    assert http.post(admin + "reset").json() == {"ok": True}
    assert http.get(admin + "tasks").json() == {"tasks": {}}
    assert http.get(admin + "requests").json() == {"requests": []}


def test_admin_finish_with_outputs_and_no_delivery(
    fake: FakeRunningHub, client: RunningHubClient, http: httpx.Client
) -> None:
    task_id = accepted(client)
    answer = http.post(
        fake.base_url + "/__fake__/finish",
        json={"taskId": task_id, "outputs": ["https://cdn/z.webp"], "deliver": False},
    ).json()
    assert answer["delivery"] is None
    assert parse_webhook(answer["webhook"].encode()).outcome.outputs == ["https://cdn/z.webp"]


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "error"),
    [
        ("POST", "script", {"submits": ["explode"]}, 400, "unknown submit behaviour 'explode'"),
        ("POST", "script", {"submits": "busy"}, 400, "submits must be a list"),
        ("POST", "finish", {"taskId": "1990000000000000999"}, 404, "unknown task 1990000000000000999"),
        ("POST", "finish", {}, 400, "taskId is required"),
        ("POST", "finish", {"taskId": "1", "outputs": "x"}, 400, "outputs must be a list"),
        ("POST", "running", {"taskId": "42"}, 404, "unknown task 42"),
        ("POST", "explode", {}, 404, "unknown admin endpoint"),
        ("GET", "finish", None, 404, "unknown admin endpoint"),
    ],
)
def test_admin_errors(
    fake: FakeRunningHub, http: httpx.Client, method: str, path: str, payload: Any, status: int, error: str
) -> None:
    response = http.request(method, fake.base_url + "/__fake__/" + path, json=payload)
    assert response.status_code == status
    assert response.json()["error"].startswith(error)


def test_serve_forever_cli_returns_a_started_server_on_loopback() -> None:
    with httpx.Client() as probe:
        server = serve_forever_cli(0)
        try:
            assert server.base_url.startswith("http://127.0.0.1:")
            assert probe.get(server.base_url + "/__fake__/tasks").json() == {"tasks": {}}
            waiter = threading.Thread(target=server.wait)
            waiter.start()
        finally:
            server.stop()
        waiter.join(timeout=2)
        assert not waiter.is_alive()


def test_non_json_body_is_301_and_logged_without_the_key(fake: FakeRunningHub, http: httpx.Client) -> None:
    response = http.post(
        fake.base_url + "/task/openapi/ai-app/run",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        content=f"apiKey={KEY}&webappId=1".encode(),
    )
    assert response.json() == {"code": 301, "msg": "PARAMS_INVALID", "data": None}
    assert fake.requests[-1]["body"] == {"raw": "apiKey=***&webappId=1"}

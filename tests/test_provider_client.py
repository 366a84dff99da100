"""RunningHubClient against httpx.MockTransport: every class of answer becomes the right outcome."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from aiqueue.errors import ConfigError, ProviderError
from aiqueue.provider.base import CancelOutcome, SubmitOutcome, TaskOutcome
from aiqueue.provider.runninghub import RunningHubClient

KEY = "rh-key-5f0c1e2d3b4a59687766554433221100"
BASE = "https://www.runninghub.cn"
WEBAPP = "1990000000000000001"
NODES = [{"nodeId": "12", "fieldName": "prompt", "fieldValue": "a red bicycle"}]
Handler = Callable[[httpx.Request], httpx.Response]


def client_for(handler: Handler, timeout: float = 10.0) -> RunningHubClient:
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return RunningHubClient(BASE, KEY, http=http, timeout=timeout)


def answering(payload: Any, status: int = 200) -> Handler:
    return lambda request: httpx.Response(status, json=payload)


def raising(exc_type: type[httpx.TransportError], text: str = "boom") -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type(text, request=request)

    return handler


def submit(handler: Handler, timeout: float = 10.0) -> SubmitOutcome:
    return client_for(handler, timeout).submit(WEBAPP, NODES, None)


def envelope(code: int, msg: str, data: Any = None) -> dict[str, Any]:
    return {"code": code, "msg": msg, "data": data}


ACCEPTED = envelope(
    0,
    "success",
    {
        "netWssUrl": None,
        "taskId": "1990000000000000101",
        "clientId": "c",
        "taskStatus": "QUEUED",
        "promptTips": "{}",
    },
)
FAILED_REASON = {
    "node_id": "31",
    "node_name": "KSampler",
    "exception_type": "RuntimeError",
    "exception_message": "CUDA out of memory",
    "traceback": '["  File ..."]',
    "current_inputs": "{}",
    "current_outputs": "{}",
}


# -- submit: the request ---------------------------------------------------------------


def test_submit_sends_documented_request_with_string_webapp_id_and_bearer() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ACCEPTED)

    outcome = client_for(handler, timeout=2.5).submit(WEBAPP, NODES, "https://hooks.example/rh?job=7")

    assert outcome == SubmitOutcome("accepted", task_id="1990000000000000101", code=0, message="QUEUED")
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == f"{BASE}/task/openapi/ai-app/run"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.extensions["timeout"]["read"] == 2.5
    body = json.loads(request.content)
    assert body == {
        "apiKey": KEY,
        "webappId": WEBAPP,
        "nodeInfoList": NODES,
        "webhookUrl": "https://hooks.example/rh?job=7",
    }
    assert b'"webappId":"1990000000000000001"' in request.content.replace(b" ", b"")


def test_submit_omits_webhook_url_when_none_and_stringifies_an_int_webapp_id() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=ACCEPTED)

    client_for(handler).submit(1990000000000000001, NODES, None)  # type: ignore[arg-type]

    assert "webhookUrl" not in bodies[0]
    assert bodies[0]["webappId"] == "1990000000000000001"


def test_accepted_task_id_sent_as_json_number_keeps_all_digits() -> None:
    raw = b'{"code":0,"msg":"success","data":{"taskId":1990000000000000101,"taskStatus":"RUNNING"}}'
    outcome = submit(lambda request: httpx.Response(200, content=raw))
    assert outcome.kind == "accepted"
    assert outcome.task_id == "1990000000000000101"


def test_accepted_mentions_node_errors_from_prompt_tips() -> None:
    tips = json.dumps({"result": False, "node_errors": {"12": "bad value"}})
    outcome = submit(
        answering(envelope(0, "success", {"taskId": "1", "taskStatus": "QUEUED", "promptTips": tips}))
    )
    assert outcome.kind == "accepted"
    assert "node_errors" in outcome.message and "bad value" in outcome.message


# -- submit: business codes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "msg", "message"),
    [
        (421, "TASK_QUEUE_MAXED", "421 TASK_QUEUE_MAXED"),
        (415, "TASK_INSTANCE_MAXED", "415 TASK_INSTANCE_MAXED"),
        (1003, "Rate limit exceeded", "1003 Rate limit exceeded"),
        (1011, "", "1011 system busy"),
        (1520, "TASK_USER_CONCURRENT_LIMIT", "1520 TASK_USER_CONCURRENT_LIMIT"),
        (814, "PERSONAL_QUEUE_COUNT_LIMIT", "814 PERSONAL_QUEUE_COUNT_LIMIT"),
    ],
)
def test_capacity_codes_are_busy(code: int, msg: str, message: str) -> None:
    assert submit(answering(envelope(code, msg))) == SubmitOutcome("busy", code=code, message=message)


@pytest.mark.parametrize(
    ("code", "msg", "message"),
    [
        (803, "APIKEY_INVALID_NODE_INFO", "803 APIKEY_INVALID_NODE_INFO"),
        (802, "APIKEY_UNAUTHORIZED", "802 APIKEY_UNAUTHORIZED"),
        (901, "webapp 42 does not exist", "901 WEBAPP_NOT_EXISTS: webapp 42 does not exist"),
        (416, "TASK_CREATE_FAILED_BY_NOT_ENOUGH_WALLET", "416 TASK_CREATE_FAILED_BY_NOT_ENOUGH_WALLET"),
        (433, "", "433 VALIDATE_PROMPT_FAILED"),
        (804, "APIKEY_TASK_IS_RUNNING", "804 APIKEY_TASK_IS_RUNNING"),
        (1501, "Content moderation failed", "1501 Content moderation failed"),
        (4242, "", "4242 (unknown code)"),
    ],
)
def test_other_codes_are_rejected_with_the_real_words(code: int, msg: str, message: str) -> None:
    assert submit(answering(envelope(code, msg))) == SubmitOutcome("rejected", code=code, message=message)


def test_code_given_as_a_string_is_still_read() -> None:
    assert submit(answering({"code": "421", "msg": "TASK_QUEUE_MAXED", "data": None})).kind == "busy"


def test_server_error_code_at_submit_is_unknown_not_rejected() -> None:
    # The server failed while handling a non-idempotent create: it may have created the task.
    outcome = submit(answering(envelope(500, "UNKNOWN_ERROR")))
    assert outcome == SubmitOutcome("unknown", code=500, message="500 UNKNOWN_ERROR")


def test_code_zero_without_task_id_is_unknown() -> None:
    outcome = submit(answering(envelope(0, "success", {"taskStatus": "QUEUED"})))
    assert outcome.kind == "unknown"
    assert outcome.message.startswith("code 0 but no taskId in the answer")


def test_json_without_code_is_unknown() -> None:
    outcome = submit(answering({"hello": "world"}))
    assert outcome.kind == "unknown"
    assert outcome.message.startswith("answer had no business code")


# -- submit: transport and HTTP -----------------------------------------------------------


@pytest.mark.parametrize("exc_type", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
def test_nothing_sent_is_busy(exc_type: type[httpx.TransportError]) -> None:
    outcome = submit(raising(exc_type, "[Errno 111] Connection refused"))
    assert outcome == SubmitOutcome("busy", message="connection failed: [Errno 111] Connection refused")


def test_read_timeout_is_unknown_and_names_the_timeout() -> None:
    outcome = submit(raising(httpx.ReadTimeout), timeout=2.5)
    assert outcome == SubmitOutcome("unknown", message="no answer within 2.5s after the request was sent")
    assert submit(raising(httpx.ReadTimeout)).message == "no answer within 10s after the request was sent"


@pytest.mark.parametrize(
    ("exc_type", "start"),
    [
        (httpx.WriteTimeout, "timed out after 10s while sending the request"),
        (httpx.RemoteProtocolError, "connection lost after the request was sent: boom"),
        (httpx.ReadError, "connection lost after the request was sent: boom"),
        (httpx.WriteError, "request failed after it may have been sent: boom"),
    ],
)
def test_answer_lost_is_unknown(exc_type: type[httpx.TransportError], start: str) -> None:
    outcome = submit(raising(exc_type))
    assert outcome.kind == "unknown"
    assert outcome.message.startswith(start)


@pytest.mark.parametrize(
    ("status", "text"), [(500, "Internal Server Error"), (502, "Bad Gateway"), (503, "Service Unavailable")]
)
def test_http_5xx_is_unknown(status: int, text: str) -> None:
    outcome = submit(lambda request: httpx.Response(status, text="<html>oops</html>"))
    assert outcome == SubmitOutcome("unknown", message=f"HTTP {status} {text}")


def test_html_page_with_200_is_unknown_with_a_short_excerpt() -> None:
    page = "<!DOCTYPE html>\n<html><body>" + "x" * 500 + "</body></html>"
    outcome = submit(lambda request: httpx.Response(200, text=page, headers={"Content-Type": "text/html"}))
    assert outcome.kind == "unknown"
    assert outcome.message.startswith("answer was not JSON: <!DOCTYPE html> <html><body>xxx")
    assert len(outcome.message) <= len("answer was not JSON: ") + 80
    assert "\n" not in outcome.message


def test_http_4xx_without_business_code_is_rejected() -> None:
    outcome = submit(lambda request: httpx.Response(404, text="no such page"))
    assert outcome == SubmitOutcome("rejected", message="HTTP 404 Not Found: no such page")
    assert submit(lambda request: httpx.Response(405)).message == "HTTP 405 Method Not Allowed"


def test_http_4xx_with_business_code_uses_the_code() -> None:
    outcome = submit(answering(envelope(802, "APIKEY_UNAUTHORIZED"), status=401))
    assert outcome == SubmitOutcome("rejected", code=802, message="802 APIKEY_UNAUTHORIZED")


def test_http_429_is_busy() -> None:
    assert submit(lambda request: httpx.Response(429)) == SubmitOutcome(
        "busy", message="HTTP 429 Too Many Requests"
    )


# -- outputs ------------------------------------------------------------------------------


def outputs(handler: Handler) -> TaskOutcome:
    return client_for(handler).outputs("1990000000000000101")


def test_outputs_request_and_success() -> None:
    seen: list[httpx.Request] = []
    data = [
        {"fileUrl": "https://cdn.example.com/a.png", "fileType": "png", "taskCostTime": "42", "nodeId": "9"},
        {"fileUrl": "https://cdn.example.com/b.mp4", "fileType": "mp4", "taskCostTime": "42", "nodeId": "10"},
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=envelope(0, "success", data))

    outcome = outputs(handler)

    assert outcome == TaskOutcome(
        "success", outputs=["https://cdn.example.com/a.png", "https://cdn.example.com/b.mp4"], code=0
    )
    assert str(seen[0].url) == f"{BASE}/task/openapi/outputs"
    assert json.loads(seen[0].content) == {"apiKey": KEY, "taskId": "1990000000000000101"}
    assert seen[0].headers["Authorization"] == f"Bearer {KEY}"


def test_outputs_matches_the_documented_sample() -> None:
    with open("/work/shared/runninghub/samples/07-outputs-success.json", "rb") as f:
        raw = f.read()
    outcome = outputs(lambda request: httpx.Response(200, content=raw))
    assert outcome.kind == "success"
    assert outcome.outputs == [
        "https://cdn.example.com/0a1b2c3d4e5f60718293a4b5c6d7e8f9/output/ComfyUI_00001_abcde_1750000000.png"
    ]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (envelope(0, "success", None), "not finished yet (code 0 without outputs)"),
        (envelope(0, "success", []), "not finished yet (code 0 without outputs)"),
        (envelope(804, "APIKEY_TASK_IS_RUNNING"), "804 APIKEY_TASK_IS_RUNNING"),
        (envelope(813, "APIKEY_TASK_IS_QUEUED"), "813 APIKEY_TASK_IS_QUEUED"),
    ],
)
def test_outputs_pending(payload: dict[str, Any], message: str) -> None:
    outcome = outputs(answering(payload))
    assert outcome.kind == "pending"
    assert outcome.message == message


def test_outputs_805_is_failed_with_the_real_reason() -> None:
    outcome = outputs(answering(envelope(805, "APIKEY_TASK_STATUS_ERROR", {"failedReason": FAILED_REASON})))
    assert outcome == TaskOutcome(
        "failed", message="node 31 (KSampler) RuntimeError: CUDA out of memory", code=805
    )


def test_outputs_805_without_reason_falls_back_to_the_code() -> None:
    outcome = outputs(answering(envelope(805, "APIKEY_TASK_STATUS_ERROR", None)))
    assert outcome == TaskOutcome("failed", message="805 APIKEY_TASK_STATUS_ERROR", code=805)


def test_outputs_multiline_exception_message_becomes_one_line() -> None:
    reason = dict(FAILED_REASON, exception_message="line one\nline two\n" + "y" * 1000)
    outcome = outputs(answering(envelope(805, "APIKEY_TASK_STATUS_ERROR", {"failedReason": reason})))
    assert outcome.message is not None
    assert outcome.message.startswith("node 31 (KSampler) RuntimeError: line one line two yyy")
    assert "\n" not in outcome.message and len(outcome.message) <= 300


@pytest.mark.parametrize(
    ("code", "msg", "message"),
    [
        (807, "APIKEY_TASK_NOT_FOUND", "807 APIKEY_TASK_NOT_FOUND"),
        (423, "TASK_NOT_FOUNED", "423 TASK_NOT_FOUNED"),
    ],
)
def test_outputs_task_not_found_is_failed(code: int, msg: str, message: str) -> None:
    assert outputs(answering(envelope(code, msg))) == TaskOutcome("failed", message=message, code=code)


def test_outputs_key_problem_is_unknown_not_a_task_failure() -> None:
    outcome = outputs(answering(envelope(802, "APIKEY_UNAUTHORIZED")))
    assert outcome == TaskOutcome("unknown", message="802 APIKEY_UNAUTHORIZED", code=802)


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (raising(httpx.ConnectError, "refused"), "connection failed: refused"),
        (raising(httpx.ReadTimeout), "no answer within 10s after the request was sent"),
        (lambda request: httpx.Response(502), "HTTP 502 Bad Gateway"),
        (lambda request: httpx.Response(200, text="<html>hi</html>"), "answer was not JSON: <html>hi</html>"),
        (lambda request: httpx.Response(404), "HTTP 404 Not Found"),
    ],
)
def test_outputs_unknown(handler: Handler, message: str) -> None:
    assert outputs(handler) == TaskOutcome("unknown", message=message)


# -- cancel -------------------------------------------------------------------------------


def test_cancel_ok_and_request_shape() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=envelope(0, "success"))

    assert client_for(handler).cancel("1990000000000000101") == CancelOutcome(ok=True, message="cancelled")
    assert str(seen[0].url) == f"{BASE}/task/openapi/cancel"
    assert json.loads(seen[0].content) == {"apiKey": KEY, "taskId": "1990000000000000101"}


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (answering(envelope(807, "APIKEY_TASK_NOT_FOUND")), "807 APIKEY_TASK_NOT_FOUND"),
        (
            answering(envelope(805, "task already finished")),
            "805 APIKEY_TASK_STATUS_ERROR: task already finished",
        ),
        (raising(httpx.ConnectError, "refused"), "connection failed: refused"),
        (lambda request: httpx.Response(503), "HTTP 503 Service Unavailable"),
    ],
)
def test_cancel_not_ok(handler: Handler, message: str) -> None:
    assert client_for(handler).cancel("1") == CancelOutcome(ok=False, message=message)


# -- account status -----------------------------------------------------------------------


def test_account_status_returns_data_and_uses_lowercase_apikey() -> None:
    seen: list[dict[str, Any]] = []
    data = {
        "remainCoins": "1200",
        "currentTaskCounts": "1",
        "remainMoney": None,
        "currency": None,
        "apiType": "NORMAL",
    }

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        assert request.url.path == "/uc/openapi/accountStatus"
        return httpx.Response(200, json=envelope(0, "success", data))

    assert client_for(handler).account_status() == data
    assert seen == [{"apikey": KEY}]


@pytest.mark.parametrize(
    ("handler", "message", "code"),
    [
        (answering(envelope(802, "APIKEY_UNAUTHORIZED")), "802 APIKEY_UNAUTHORIZED", 802),
        (raising(httpx.ConnectError, "refused"), "connection failed: refused", None),
        (lambda request: httpx.Response(502), "HTTP 502 Bad Gateway", None),
        (answering(envelope(0, "success", None)), "account status without data", 0),
    ],
)
def test_account_status_raises_provider_error(handler: Handler, message: str, code: int | None) -> None:
    with pytest.raises(ProviderError) as info:
        client_for(handler).account_status()
    assert info.value.message.startswith(message)
    assert getattr(info.value, "code", None) == code
    assert info.value.exit_code == 7


# -- the key never leaks ------------------------------------------------------------------


def test_repr_masks_the_key() -> None:
    client = client_for(answering(ACCEPTED))
    assert KEY not in repr(client) and KEY not in str(client)
    assert "api_key='***'" in repr(client)


@pytest.mark.parametrize(
    "handler",
    [
        answering(envelope(802, f"key {KEY} is not valid")),
        answering(envelope(805, "x", {"failedReason": {"exception_message": f"bad key {KEY}"}})),
        lambda request: httpx.Response(200, text=f"<html>your key {KEY}</html>"),
        lambda request: httpx.Response(404, text=f"not found for {KEY}"),
        raising(httpx.ConnectError, f"cannot connect with {KEY}"),
        raising(httpx.RemoteProtocolError, f"peer said {KEY}"),
        answering({"echo": KEY}),
    ],
)
def test_key_echoed_by_the_server_is_scrubbed_from_every_message(handler: Handler) -> None:
    client = client_for(handler)
    results = [client.submit(WEBAPP, NODES, None), client.outputs("1"), client.cancel("1")]
    for result in results:
        assert KEY not in result.message  # type: ignore[operator]
    try:
        client.account_status()
    except ProviderError as exc:
        assert KEY not in str(exc) and KEY not in json.dumps(exc.to_dict())


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "key", "timeout"),
    [("www.runninghub.cn", KEY, 10.0), (BASE, "", 10.0), (BASE, KEY, 0.0)],
)
def test_bad_configuration_is_a_config_error_without_the_key(base_url: str, key: str, timeout: float) -> None:
    with pytest.raises(ConfigError) as info:
        RunningHubClient(base_url, key, timeout=timeout)
    assert KEY not in str(info.value)


def test_trailing_slash_in_base_url_is_ignored() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(200, json=ACCEPTED)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    RunningHubClient(BASE + "/", KEY, http=http).submit(WEBAPP, NODES, None)
    assert paths == ["/task/openapi/ai-app/run"]

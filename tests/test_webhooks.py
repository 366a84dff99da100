"""parse_webhook: v1 string eventData, v2 object eventData, and every malformed class."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiqueue.errors import InvalidWebhookError
from aiqueue.provider.base import TaskOutcome
from aiqueue.webhooks import MAX_BODY_BYTES, WebhookEvent, parse_webhook

TASK = "1990000000000000101"
SAMPLE = "/work/shared/runninghub/samples/08-webhook-success.json"
FAILED_REASON = {
    "node_id": "31",
    "node_name": "KSampler",
    "exception_type": "RuntimeError",
    "exception_message": "CUDA out of memory",
    "traceback": '["  File \\"x.py\\", line 1\\n"]',
    "current_inputs": "{}",
    "current_outputs": "{}",
}


def body(event_data: Any, task_id: Any = TASK, event: Any = "TASK_END", **extra: Any) -> bytes:
    return json.dumps({"event": event, "taskId": task_id, "eventData": event_data, **extra}).encode()


def v1(code: int, msg: str, data: Any) -> str:
    return json.dumps({"code": code, "msg": msg, "data": data})


def v2(status: str, **fields: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "taskId": TASK,
        "status": status,
        "errorCode": "",
        "errorMessage": "",
        "results": None,
    }
    result.update(fields)
    return result


# -- accepted shapes ------------------------------------------------------------------------


def test_documented_sample_parses() -> None:
    with open(SAMPLE, "rb") as f:
        event = parse_webhook(f.read())
    assert event == WebhookEvent(
        task_id=TASK,
        outcome=TaskOutcome(
            "success",
            outputs=[
                "https://cdn.example.com/0a1b2c3d4e5f60718293a4b5c6d7e8f9/output/ComfyUI_00001_abcde_1750000000.png"
            ],
            code=0,
        ),
        event="TASK_END",
    )


def test_v1_string_success_with_several_files() -> None:
    data = [
        {"fileUrl": "https://cdn/a.png", "fileType": "png"},
        {"fileUrl": "https://cdn/b.png", "fileType": "png"},
    ]
    event = parse_webhook(body(v1(0, "success", data)))
    assert event.outcome == TaskOutcome("success", outputs=["https://cdn/a.png", "https://cdn/b.png"], code=0)


def test_v1_string_failure_carries_the_real_reason() -> None:
    event = parse_webhook(body(v1(805, "APIKEY_TASK_STATUS_ERROR", {"failedReason": FAILED_REASON})))
    assert event.task_id == TASK
    assert event.outcome == TaskOutcome(
        "failed", message="node 31 (KSampler) RuntimeError: CUDA out of memory", code=805
    )


def test_v1_envelope_sent_as_an_object_is_also_read() -> None:
    event = parse_webhook(body({"code": 0, "msg": "success", "data": [{"fileUrl": "https://cdn/a.png"}]}))
    assert event.outcome.kind == "success" and event.outcome.outputs == ["https://cdn/a.png"]


def test_v2_object_success() -> None:
    results = [
        {"url": "https://cdn/x.png", "outputType": "png", "text": None},
        {"url": None, "outputType": "txt", "text": "hi"},
    ]
    event = parse_webhook(body(v2("SUCCESS", results=results, failedReason={})))
    assert event.outcome == TaskOutcome("success", outputs=["https://cdn/x.png"])


def test_v2_object_failure_with_failed_reason() -> None:
    reason = {"node_name": "LoadImage", "exception_message": "stale file handle"}
    event = parse_webhook(body(v2("FAILED", failedReason=reason)))
    assert event.outcome == TaskOutcome("failed", message="node LoadImage stale file handle")


def test_v2_object_failure_with_only_an_error_code() -> None:
    event = parse_webhook(body(v2("FAILED", errorCode="1501", errorMessage="Content moderation failed")))
    assert event.outcome == TaskOutcome("failed", message="1501 Content moderation failed", code=1501)


def test_v2_error_code_without_status_is_a_failure_in_a_task_end() -> None:
    event = parse_webhook(body(v2("", errorCode="1015", errorMessage="generation failed")))
    assert event.outcome.kind == "failed" and event.outcome.code == 1015


def test_v2_cancel_is_failed_and_says_so() -> None:
    event = parse_webhook(body(v2("CANCEL")))
    assert event.outcome == TaskOutcome("failed", message="task was cancelled at RunningHub")


def test_v2_object_sent_as_a_string_is_also_read() -> None:
    event = parse_webhook(body(json.dumps(v2("SUCCESS", results=[{"url": "https://cdn/y.png"}]))))
    assert event.outcome.outputs == ["https://cdn/y.png"]


def test_task_id_as_a_big_json_number_keeps_all_19_digits() -> None:
    raw = b'{"event":"TASK_END","taskId":1990000000000000101,"eventData":"{\\"code\\":0,\\"msg\\":\\"success\\",\\"data\\":[{\\"fileUrl\\":\\"https://cdn/a.png\\"}]}"}'
    event = parse_webhook(raw)
    assert event.task_id == "1990000000000000101"  # a float would have given ...000000


def test_extra_fields_are_ignored() -> None:
    event = parse_webhook(body(v1(0, "success", [{"fileUrl": "https://cdn/a.png"}]), retryCount=3))
    assert event.outcome.kind == "success"


# -- malformed input ------------------------------------------------------------------------

SUCCESS_V1 = v1(0, "success", [{"fileUrl": "https://cdn/a.png"}])


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "webhook body is empty"),
    ("blank", b"  \n ", "webhook body is empty"),
    (
        "not utf-8",
        b'{"event": "TASK_END", "taskId": "\xff\xfe"}',
        "webhook body is not UTF-8: invalid start byte at byte 33",
    ),
    ("not json", b'{"event": "TASK_END",', "webhook body is not JSON: Expecting property name"),
    ("trailing garbage", body(SUCCESS_V1) + b"xyz", "webhook body is not JSON: Extra data"),
    (
        "NaN",
        b'{"event":"TASK_END","taskId":"1","eventData":NaN}',
        "webhook body is not JSON: NaN is not allowed",
    ),
    ("array", b"[1, 2]", "webhook body is not a JSON object (got array)"),
    ("string", b'"TASK_END"', "webhook body is not a JSON object (got string)"),
    (
        "no event",
        json.dumps({"taskId": TASK, "eventData": SUCCESS_V1}).encode(),
        "webhook has no event field",
    ),
    (
        "other event",
        body(SUCCESS_V1, event="TASK_START"),
        "unsupported webhook event 'TASK_START' (expected 'TASK_END')",
    ),
    ("event not string", body(SUCCESS_V1, event=1), "unsupported webhook event 1"),
    (
        "no taskId",
        json.dumps({"event": "TASK_END", "eventData": SUCCESS_V1}).encode(),
        "webhook has no taskId",
    ),
    ("null taskId", body(SUCCESS_V1, task_id=None), "webhook has no taskId"),
    ("empty taskId", body(SUCCESS_V1, task_id=""), "webhook taskId is empty"),
    ("blank taskId", body(SUCCESS_V1, task_id="   "), "webhook taskId is empty"),
    (
        "float taskId",
        b'{"event":"TASK_END","taskId":1.990000000000000101e18,"eventData":"{}"}',
        "webhook taskId must be a string or an integer, not number with a fraction",
    ),
    (
        "bool taskId",
        body(SUCCESS_V1, task_id=True),
        "webhook taskId must be a string or an integer, not boolean",
    ),
    (
        "object taskId",
        body(SUCCESS_V1, task_id={"id": 1}),
        "webhook taskId must be a string or an integer, not object",
    ),
    ("negative taskId", body(SUCCESS_V1, task_id=-5), "webhook taskId is not a valid task id: -5"),
    (
        "taskId with newline",
        body(SUCCESS_V1, task_id="12\n34"),
        "webhook taskId is not a valid task id: '12\\n34'",
    ),
    ("huge taskId", body(SUCCESS_V1, task_id="9" * 65), "webhook taskId is not a valid task id"),
    ("no eventData", json.dumps({"event": "TASK_END", "taskId": TASK}).encode(), "webhook has no eventData"),
    ("null eventData", body(None), "webhook has no eventData"),
    ("eventData number", body(42), "webhook eventData is not a JSON object (got integer)"),
    ("eventData not json", body("{code: 0}"), "webhook eventData is not JSON: Expecting property name"),
    ("eventData empty string", body(""), "webhook eventData is empty"),
    ("eventData json array", body("[1, 2]"), "webhook eventData is not a JSON object (got array)"),
    (
        "eventData neither",
        body({"hello": "world"}),
        "webhook eventData has neither code (v1) nor status (v2)",
    ),
    (
        "v1 still running",
        body(v1(804, "APIKEY_TASK_IS_RUNNING", None)),
        "webhook eventData is not a final result: 804 APIKEY_TASK_IS_RUNNING",
    ),
    (
        "v1 code 0 without data",
        body(v1(0, "success", None)),
        "webhook eventData is not a final result: not finished yet",
    ),
    (
        "v1 code not a number",
        body(json.dumps({"code": "zero", "msg": "", "data": []})),
        "webhook eventData is not a final result: answer had no code",
    ),
    ("v2 still running", body(v2("RUNNING")), "webhook eventData is not a final result: RUNNING"),
    (
        "v2 strange status",
        body(v2("EXPLODED")),
        "webhook eventData is not a final result: unexpected task status: EXPLODED",
    ),
    (
        "taskId mismatch",
        body(v2("SUCCESS", taskId="1990000000000000999")),
        "webhook taskId 1990000000000000101 does not match eventData.taskId 1990000000000000999",
    ),
    (
        "too large",
        b" " * (MAX_BODY_BYTES + 1),
        f"webhook body is too large: {MAX_BODY_BYTES + 1} bytes (limit {MAX_BODY_BYTES})",
    ),
    (
        "deep body",
        ('{"event":"TASK_END","taskId":"1","eventData":' + nested(100) + "}").encode(),
        "webhook body is nested too deeply: 101 levels (limit 32)",
    ),
    ("very deep body", nested(200_000).encode(), "webhook body is nested too deeply: 200000 levels"),
    ("deep eventData string", body(nested(50)), "webhook eventData is nested too deeply: 50 levels"),
]


@pytest.mark.parametrize(
    ("raw", "message"),
    [(raw, message) for _, raw, message in MALFORMED],
    ids=[name for name, _, _ in MALFORMED],
)
def test_malformed_body_is_rejected_with_a_one_line_message(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidWebhookError) as info:
        parse_webhook(raw)
    assert info.value.message.startswith(message), info.value.message
    assert "\n" not in info.value.message
    assert info.value.exit_code == 9


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    data = [{"fileUrl": "https://cdn/" + "[{" * 100 + ".png"}]
    event = parse_webhook(body(v1(0, "success", data)))
    assert event.outcome.outputs == ["https://cdn/" + "[{" * 100 + ".png"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_invalid_webhook(raw: bytes) -> None:
    try:
        parse_webhook(raw)
    except InvalidWebhookError as exc:
        assert "\n" not in exc.message


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "event": st.sampled_from(["TASK_END", "OTHER"]) | JSON_VALUES,
            "taskId": st.sampled_from([TASK, 1990000000000000101]) | JSON_VALUES,
            "eventData": JSON_VALUES
            | st.dictionaries(
                st.sampled_from(["code", "msg", "data", "status", "errorCode", "results", "failedReason"]),
                JSON_VALUES,
            )
            | JSON_VALUES.map(json.dumps),
        },
    )
)
def test_arbitrary_json_shapes_never_raise_anything_but_invalid_webhook(payload: dict[str, Any]) -> None:
    try:
        event = parse_webhook(json.dumps(payload).encode())
    except InvalidWebhookError as exc:
        assert "\n" not in exc.message
    else:
        assert event.outcome.kind in ("success", "failed")
        assert event.task_id


def test_importing_webhooks_does_not_import_httpx() -> None:
    code = "import sys, aiqueue.webhooks; sys.exit(1 if 'httpx' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_a_utf8_bom_from_an_editor_is_accepted() -> None:
    from aiqueue.webhooks import parse_webhook

    body = json.dumps({"event": "TASK_END", "taskId": "1990000000000000101",
                       "eventData": json.dumps({"code": 0, "msg": "success",
                                                "data": [{"fileUrl": "https://cdn.example.com/a.png"}]})})
    event = parse_webhook(b"\xef\xbb\xbf" + body.encode())
    assert event.task_id == "1990000000000000101" and event.outcome.kind == "success"

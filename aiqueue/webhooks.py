"""Parse a RunningHub TASK_END webhook body into one event type.

Two shapes arrive (API.md section 3): v1 puts the outputs envelope `{code, msg, data}` in
`eventData` as a JSON *string*; v2 receivers see `eventData` as an *object* with the query fields
(`status`, `results`, `errorCode`, `errorMessage`, `failedReason`). Either may come in either
form, so both are parsed and branched on `code` (v1) or `status` (v2) by the shared interpretation
in `aiqueue.provider.codes`. The body is untrusted: size and nesting are capped before json runs,
and every problem is an InvalidWebhookError with a one-line message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, NoReturn

from aiqueue.errors import InvalidWebhookError
from aiqueue.provider.base import TaskOutcome
from aiqueue.provider.codes import interpret_task_result, without_surrogates

MAX_BODY_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_TASK_ID_LENGTH = 64
EVENT_TASK_END = "TASK_END"

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_TASK_ID = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces


@dataclass(frozen=True)
class WebhookEvent:
    task_id: str
    outcome: TaskOutcome  # always success or failed: a TASK_END means the task has ended
    event: str


def parse_webhook(raw: bytes) -> WebhookEvent:
    """Parse a webhook body. Raises InvalidWebhookError naming what is wrong."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    body = _load_json(bytes(raw), "webhook body")
    if not isinstance(body, dict):
        _fail(f"webhook body is not a JSON object (got {_type_name(body)})")

    event = body.get("event")
    if event is None:
        _fail("webhook has no event field")
    if event != EVENT_TASK_END:
        _fail(f"unsupported webhook event {_show(event)} (expected 'TASK_END')")

    task_id = _task_id(body.get("taskId"), "taskId")

    if "eventData" not in body or body["eventData"] is None:
        _fail("webhook has no eventData")
    data = body["eventData"]
    if isinstance(data, str):
        data = _load_json(data.encode("utf-8"), "webhook eventData")
    if not isinstance(data, dict):
        _fail(f"webhook eventData is not a JSON object (got {_type_name(data)})")
    if "code" not in data and "status" not in data and "errorCode" not in data:
        _fail("webhook eventData has neither code (v1) nor status (v2)")

    inner_id = data.get("taskId")
    if inner_id not in (None, ""):
        inner = _task_id(inner_id, "eventData.taskId")
        if inner != task_id:
            _fail(f"webhook taskId {task_id} does not match eventData.taskId {inner}")

    outcome = interpret_task_result(data, final=True)
    if outcome.kind not in ("success", "failed"):
        _fail(f"webhook eventData is not a final result: {outcome.message or outcome.kind}")
    return WebhookEvent(task_id=task_id, outcome=outcome, event=event)


def _load_json(raw: bytes, what: str) -> Any:
    if len(raw) > MAX_BODY_BYTES:
        _fail(f"{what} is too large: {len(raw)} bytes (limit {MAX_BODY_BYTES})")
    if not raw.strip():
        _fail(f"{what} is empty")
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a BOM from an editor is not part of the JSON
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}")
    # Measure nesting before json recurses: drop strings, keep brackets, take the running max.
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    depth = max(accumulate(_DEPTH_STEP[c] for c in brackets), default=0)
    if depth > MAX_DEPTH:
        _fail(f"{what} is nested too deeply: {depth} levels (limit {MAX_DEPTH})")
    try:
        return without_surrogates(json.loads(text, parse_constant=_reject_constant))
    except json.JSONDecodeError as exc:
        _fail(f"{what} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    except RecursionError:
        _fail(f"{what} is nested too deeply")
    except ValueError as exc:  # NaN/Infinity, or an integer beyond Python's digit limit
        _fail(f"{what} is not JSON: {_first_line(exc)}")


def _task_id(value: Any, field: str) -> str:
    if value is None:
        _fail(f"webhook has no {field}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        # A float has already lost digits of a 19-digit id: refuse rather than guess.
        _fail(f"webhook {field} must be a string or an integer, not {_type_name(value)}")
    if isinstance(value, int) and value <= 0:
        _fail(f"webhook {field} is not a valid task id: {value}")
    text = str(value)
    if not text.strip():
        _fail(f"webhook {field} is empty")
    if len(text) > MAX_TASK_ID_LENGTH or not _TASK_ID.fullmatch(text):
        _fail(f"webhook {field} is not a valid task id: {_show(text)}")
    return text


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def _fail(message: str) -> NoReturn:
    raise InvalidWebhookError(message)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def _type_name(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        int: "integer",
        float: "number with a fraction",
        bool: "boolean",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _first_line(exc: Exception) -> str:
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__

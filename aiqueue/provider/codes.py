"""RunningHub business codes and the one interpretation of a task result.

The client (outputs polling) and the webhook parser both read task results: a v1 outputs envelope
`{code, msg, data}` or a v2 query-shaped object `{status, results, errorCode, errorMessage,
failedReason}`. Both use the functions here, so a result means the same thing whichever way it
arrived. This module imports no HTTP library, which keeps `aiqueue.webhooks` cheap to import.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiqueue.provider.base import TaskOutcome

# API.md section 4: code -> (identifier, meaning). Codes from 1000 up carry no identifier.
CODES: dict[int, tuple[str | None, str]] = {
    301: ("PARAMS_INVALID", "missing or invalid parameter"),
    380: ("WORKFLOW_NOT_EXISTS", "workflowId unknown"),
    412: ("TOKEN_INVALID", "wrong API path"),
    415: ("TASK_INSTANCE_MAXED", "no free dedicated machine"),
    416: ("TASK_CREATE_FAILED_BY_NOT_ENOUGH_WALLET", "wallet balance too low"),
    421: ("TASK_QUEUE_MAXED", "account concurrency limit reached"),
    423: ("TASK_NOT_FOUNED", "task not found"),
    433: ("VALIDATE_PROMPT_FAILED", "ComfyUI validation failed"),
    435: ("TASK_USER_EXCLAPI_INSTANCE_NOT_FOUND", "no dedicated instance of that type"),
    436: ("TASK_USER_EXCLAPI_REQUIRED", "dedicated-resource membership expired"),
    500: ("UNKNOWN_ERROR", "server-side error"),
    801: ("APIKEY_UNSUPPORTED_FREE_USER", "free account cannot use the API"),
    802: ("APIKEY_UNAUTHORIZED", "API key wrong, disabled or for another region"),
    803: ("APIKEY_INVALID_NODE_INFO", "nodeInfoList does not match the app"),
    804: ("APIKEY_TASK_IS_RUNNING", "task still running"),
    805: ("APIKEY_TASK_STATUS_ERROR", "task failed or was interrupted"),
    806: ("APIKEY_USER_NOT_FOUND", "user for key not found"),
    807: ("APIKEY_TASK_NOT_FOUND", "task not found"),
    808: ("APIKEY_UPLOAD_FAILED", "upload failed"),
    809: ("APIKEY_FILE_SIZE_EXCEEDED", "file too large"),
    810: ("WORKFLOW_NOT_SAVED_OR_NOT_RUNNING", "workflow never saved or run in the UI"),
    811: ("CORPAPIKEY_INVALID", "enterprise key invalid"),
    812: ("CORPAPIKEY_INSUFFICIENT_FUNDS", "enterprise balance exhausted"),
    813: ("APIKEY_TASK_IS_QUEUED", "task queued"),
    814: ("PERSONAL_QUEUE_COUNT_LIMIT", "personal queue full"),
    901: ("WEBAPP_NOT_EXISTS", "webappId unknown"),
    1000: (None, "unknown error"),
    1001: (None, "invalid URL"),
    1002: (None, "invalid API key"),
    1003: (None, "rate limit exceeded"),
    1004: (None, "task not found or expired"),
    1005: (None, "internal server error"),
    1006: (None, "task execution timed out"),
    1007: (None, "invalid parameters"),
    1008: (None, "file size limit exceeded"),
    1009: (None, "HTTP method not supported"),
    1010: (None, "service unavailable"),
    1011: (None, "system busy"),
    1012: (None, "upstream service error"),
    1013: (None, "file processing failed"),
    1014: (None, "standard model API requires an enterprise-shared key"),
    1015: (None, "generation failed"),
    1101: (None, "node info error"),
    1501: (None, "content moderation failed"),
    1504: (None, "model timed out"),
    1505: (None, "photorealistic real people prohibited"),
    1520: ("TASK_USER_CONCURRENT_LIMIT", "per-user concurrent task limit reached"),
}

# Submit: nothing was created, submit again later (API.md sections 4 and 6).
CAPACITY_CODES = frozenset({421, 415, 1003, 1011, 1520, 814})
# Answers about the account or the set-up, not the job: every job would get the same one, so
# the queue stops (jobs keep their places) and the operator is told.
ACCOUNT_CODES = frozenset({412, 416, 436, 801, 802, 806, 811, 812, 1002, 1014})
# Submit: the server failed while handling it; a task may or may not have been created.
SERVER_ERROR_CODES = frozenset({500, 1000, 1005, 1010, 1012})
# Outputs/query: the task exists and has not finished.
PENDING_CODES = frozenset({804, 813})
FAILED_CODE = 805
NOT_FOUND_CODES = frozenset({807, 423, 1004})

PENDING_STATUSES = frozenset({"CREATE", "QUEUED", "RUNNING"})
MESSAGE_LIMIT = 300

_SPACE = re.compile(r"\s+")


def one_line(value: Any, limit: int = MESSAGE_LIMIT) -> str:
    """Provider text made safe for a one-line message: whitespace collapsed, length capped."""
    text = _SPACE.sub(" ", value if isinstance(value, str) else str(value)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def without_surrogates(value: Any) -> Any:
    """Parsed JSON with lone surrogates (from escapes like \\ud800) replaced: such strings can be
    neither stored nor printed as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")
        return value
    if isinstance(value, list):
        return [without_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {without_surrogates(k): without_surrogates(v) for k, v in value.items()}
    return value


def parse_code(value: Any) -> int | None:
    """A business code from `code` (int) or `errorCode` (often a string); None when absent/blank."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def describe_code(code: int, msg: Any = None) -> str:
    """'<code> <IDENTIFIER>', plus ': <msg>' when the provider's msg says more than the identifier."""
    identifier, meaning = CODES.get(code, (None, ""))
    head = f"{code} {identifier}" if identifier else str(code)
    text = one_line(msg) if isinstance(msg, (str, int)) and not isinstance(msg, bool) else ""
    if text and text.lower() not in {(identifier or "").lower(), "success", str(code)}:
        return f"{head}: {text}" if identifier else f"{head} {text}"
    if identifier:
        return head
    return f"{head} {meaning}" if meaning else f"{head} (unknown code)"


def describe_failed_reason(reason: Any) -> str | None:
    """'node 31 (KSampler) RuntimeError: CUDA out of memory' from a failedReason; None if empty."""
    if isinstance(reason, str):
        try:
            reason = json.loads(reason)
        except (ValueError, RecursionError):
            return one_line(reason) or None
    if not isinstance(reason, dict) or not reason:
        return None
    node_id = _text(reason.get("node_id"))
    node_name = _text(reason.get("node_name"))
    exception_type = _text(reason.get("exception_type"))
    exception_message = _text(reason.get("exception_message"))
    where = f"node {node_id}" if node_id else ""
    if node_name:
        where = f"{where} ({node_name})" if where else f"node {node_name}"
    if exception_type and exception_message:
        what = f"{exception_type}: {exception_message}"
    else:
        what = exception_type or exception_message
    text = " ".join(part for part in (where, what) if part)
    return one_line(text) if text else None


def interpret_outputs_envelope(envelope: Any, *, final: bool = False) -> TaskOutcome:
    """A v1 `/task/openapi/outputs` answer (or a v1 webhook's eventData) as a TaskOutcome.

    `final` is True for a TASK_END webhook: the task has ended, so an unexpected error code
    is a failure rather than "could not tell".
    """
    if not isinstance(envelope, dict):
        return TaskOutcome("unknown", message=f"answer was not an object: {excerpt(envelope)}")
    code = parse_code(envelope.get("code"))
    if code is None:
        return TaskOutcome("unknown", message=f"answer had no code: {excerpt(envelope)}")
    data = envelope.get("data")
    msg = envelope.get("msg")
    if code == 0:
        if data is None or data == []:
            return TaskOutcome("pending", message="not finished yet (code 0 without outputs)", code=0)
        if isinstance(data, list):
            urls = [
                item["fileUrl"] for item in data if isinstance(item, dict) and _is_url(item.get("fileUrl"))
            ]
            return TaskOutcome("success", outputs=urls, code=0)
        return TaskOutcome("unknown", message=f"code 0 with unexpected data: {excerpt(data)}", code=0)
    if code in PENDING_CODES:
        return TaskOutcome("pending", message=describe_code(code, msg), code=code)
    if code == FAILED_CODE:
        reason = data.get("failedReason") if isinstance(data, dict) else None
        message = describe_failed_reason(reason) or describe_code(code, msg)
        return TaskOutcome("failed", message=message, code=code)
    if code in NOT_FOUND_CODES or final:
        return TaskOutcome("failed", message=describe_code(code, msg), code=code)
    # e.g. 802 on a poll is our key's problem, not the task's: never fail a job over it.
    return TaskOutcome("unknown", message=describe_code(code, msg), code=code)


def interpret_query_result(result: Any, *, final: bool = False) -> TaskOutcome:
    """A v2 `/openapi/v2/query`-shaped object (or a v2 webhook's eventData) as a TaskOutcome."""
    if not isinstance(result, dict):
        return TaskOutcome("unknown", message=f"answer was not an object: {excerpt(result)}")
    status = result.get("status")
    status = status.strip().upper() if isinstance(status, str) else ""
    error_code = parse_code(result.get("errorCode"))
    error_message = _text(result.get("errorMessage"))
    if status == "SUCCESS":
        results = result.get("results")
        items = results if isinstance(results, list) else []
        urls = [item["url"] for item in items if isinstance(item, dict) and _is_url(item.get("url"))]
        return TaskOutcome("success", outputs=urls, code=error_code)
    if status == "FAILED":
        message = (
            describe_failed_reason(result.get("failedReason"))
            or (describe_code(error_code, error_message) if error_code else None)
            or one_line(error_message)
            or "task failed (no reason given)"
        )
        return TaskOutcome("failed", message=message, code=error_code)
    if status == "CANCEL":
        detail = describe_failed_reason(result.get("failedReason")) or one_line(error_message)
        message = "task was cancelled at RunningHub" + (f": {detail}" if detail else "")
        return TaskOutcome("failed", message=message, code=error_code)
    if error_code:
        if error_code in PENDING_CODES:
            return TaskOutcome("pending", message=describe_code(error_code, error_message), code=error_code)
        if error_code in NOT_FOUND_CODES or final:
            return TaskOutcome("failed", message=describe_code(error_code, error_message), code=error_code)
        return TaskOutcome("unknown", message=describe_code(error_code, error_message), code=error_code)
    if status in PENDING_STATUSES:
        return TaskOutcome("pending", message=status)
    shown = status or "missing"
    return TaskOutcome("unknown", message=f"unexpected task status: {one_line(shown, 40)}")


def interpret_task_result(data: Any, *, final: bool = False) -> TaskOutcome:
    """Either shape: `code` means a v1 envelope, otherwise the v2 query shape."""
    if isinstance(data, dict) and "code" in data:
        return interpret_outputs_envelope(data, final=final)
    return interpret_query_result(data, final=final)


def excerpt(value: Any, limit: int = 80) -> str:
    """The first `limit` characters of an answer, on one line."""
    if not isinstance(value, str):
        try:
            value = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            value = repr(value)
    return one_line(value, limit)


def _text(value: Any) -> str:
    if value is None or isinstance(value, (dict, list)):
        return ""
    return one_line(value)


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())

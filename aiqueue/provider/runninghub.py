"""RunningHub v1 client over an injected httpx.Client (the only module that imports httpx).

Every answer class becomes one of the outcomes in `base.py`; nothing here raises for a provider
answer except `account_status`. The rule that matters most: a submit is not idempotent, so only
"nothing was sent" (connection failures) and explicit capacity codes are `busy` (safe to resubmit);
anything that may have reached RunningHub without a clear answer is `unknown`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal, Self, TypeVar

import httpx

from aiqueue.errors import ConfigError, ProviderError
from aiqueue.provider.base import CancelOutcome, SubmitOutcome, TaskOutcome
from aiqueue.provider.codes import (
    CAPACITY_CODES,
    SERVER_ERROR_CODES,
    describe_code,
    excerpt,
    interpret_outputs_envelope,
    interpret_query_result,
    interpret_task_result,
    one_line,
    parse_code,
    without_surrogates,
)

__all__ = [
    "RunningHubClient",
    "interpret_outputs_envelope",
    "interpret_query_result",
    "interpret_task_result",
]

RUN_PATH = "/task/openapi/ai-app/run"
OUTPUTS_PATH = "/task/openapi/outputs"
CANCEL_PATH = "/task/openapi/cancel"
ACCOUNT_PATH = "/uc/openapi/accountStatus"

_Outcome = TypeVar("_Outcome", SubmitOutcome, TaskOutcome, CancelOutcome)
# How one HTTP answer reads before any endpoint-specific meaning is applied.
_AnswerKind = Literal["envelope", "server_error", "http_error", "too_many", "garbage"]


class _NotSent(Exception):
    """The request never left this machine: resubmitting cannot create a duplicate."""


class _AnswerLost(Exception):
    """The request was (or may have been) sent, but no answer came back."""


class RunningHubClient:
    """Provider implementation for RunningHub's v1 API. The API key never appears in any message."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        http: httpx.Client | None = None,
        timeout: float = 10.0,
        secrets: Sequence[str] = (),
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"RunningHub base URL must start with http:// or https://: {base_url!r}")
        if not api_key:
            raise ConfigError("RunningHub API key is empty")
        if not _KEY_CHARS.fullmatch(api_key):
            # An HTTP library would quote a bad header value back in its error: refuse it here.
            raise ConfigError("RunningHub API key may hold only letters, digits and . _ ~ + / = -")
        if timeout <= 0:
            raise ConfigError(f"RunningHub timeout must be positive, got {timeout}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._api_key = api_key
        # Masked like the key in every text we keep: the webhook token rides in each submit's
        # webhookUrl, and an answer that echoes the request would otherwise carry it.
        self._secrets = sorted({s for s in (api_key, *secrets) if len(s) >= 8}, key=len, reverse=True)
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client()

    def __repr__(self) -> str:
        return f"RunningHubClient(base_url={self.base_url!r}, api_key='***', timeout={self.timeout:g})"

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- Provider protocol ---------------------------------------------------------------

    def submit(
        self, webapp_id: str, node_info_list: list[dict[str, Any]], webhook_url: str | None
    ) -> SubmitOutcome:
        """Start an AI app. busy = safe to submit again later; unknown = it may exist (and cost)."""
        body: dict[str, Any] = {
            "apiKey": self._api_key,
            "webappId": str(webapp_id),  # 19 digits: never a JSON number
            "nodeInfoList": node_info_list,
        }
        if webhook_url is not None:
            body["webhookUrl"] = webhook_url
        try:
            response = self._post(RUN_PATH, body)
        except _NotSent as exc:
            return self._scrubbed(SubmitOutcome("busy", message=str(exc)))
        except _AnswerLost as exc:
            return self._scrubbed(SubmitOutcome("unknown", message=str(exc)))
        kind, value = self._read(response)
        if kind == "envelope":
            outcome = _submit_outcome(value)
        elif kind == "too_many":
            outcome = SubmitOutcome("busy", message=value)
        elif kind == "http_error":
            outcome = SubmitOutcome("rejected", message=value)
        else:
            outcome = SubmitOutcome("unknown", message=value)
        return self._scrubbed(outcome)

    def outputs(self, task_id: str) -> TaskOutcome:
        """Poll a task. Only a clear 805/not-found answer is `failed`; doubt is `unknown`."""
        try:
            response = self._post(OUTPUTS_PATH, {"apiKey": self._api_key, "taskId": str(task_id)})
        except (_NotSent, _AnswerLost) as exc:
            return self._scrubbed(TaskOutcome("unknown", message=str(exc)))
        kind, value = self._read(response)
        if kind == "envelope":
            return self._scrubbed(interpret_outputs_envelope(value))
        return self._scrubbed(TaskOutcome("unknown", message=value))

    def cancel(self, task_id: str) -> CancelOutcome:
        try:
            response = self._post(CANCEL_PATH, {"apiKey": self._api_key, "taskId": str(task_id)})
        except (_NotSent, _AnswerLost) as exc:
            return self._scrubbed(CancelOutcome(ok=False, message=str(exc)))
        kind, value = self._read(response)
        if kind != "envelope":
            return self._scrubbed(CancelOutcome(ok=False, message=value))
        code = parse_code(value.get("code"))
        if code == 0:
            return CancelOutcome(ok=True, message="cancelled")
        return self._scrubbed(CancelOutcome(ok=False, message=describe_code(code or 0, value.get("msg"))))

    # -- extras ----------------------------------------------------------------------------

    def account_status(self) -> dict[str, Any]:
        """The account's `data` as RunningHub sends it (numbers are strings, e.g. "1200").

        Raises ProviderError (with `.code` when RunningHub gave one) on any failure.
        """
        try:
            response = self._post(ACCOUNT_PATH, {"apikey": self._api_key})
        except (_NotSent, _AnswerLost) as exc:
            raise ProviderError(self._scrub(str(exc))) from None
        kind, value = self._read(response)
        if kind != "envelope":
            raise ProviderError(self._scrub(value))
        code = parse_code(value.get("code"))
        data = value.get("data")
        if code != 0:
            raise ProviderError(self._scrub(describe_code(code or 0, value.get("msg"))), code=code)
        if not isinstance(data, dict):
            raise ProviderError(self._scrub(f"account status without data: {excerpt(value)}"), code=0)
        return data

    # -- plumbing --------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST with the key in the body and as Bearer (API.md 8.7: both are harmless)."""
        try:
            return self._http.post(
                self.base_url + path,
                json=body,
                headers={"Authorization": f"Bearer {self._api_key}"},
                timeout=self.timeout,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _NotSent(f"connection failed: {_reason(exc)}") from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise _NotSent(f"request not sent: {_reason(exc)}") from None
        except httpx.ReadTimeout:
            raise _AnswerLost(f"no answer within {self.timeout:g}s after the request was sent") from None
        except httpx.WriteTimeout:
            raise _AnswerLost(
                f"timed out after {self.timeout:g}s while sending the request; it may have arrived"
            ) from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise _AnswerLost(f"connection lost after the request was sent: {_reason(exc)}") from None
        except httpx.TransportError as exc:
            raise _AnswerLost(f"request failed after it may have been sent: {_reason(exc)}") from None

    def _read(self, response: httpx.Response) -> tuple[_AnswerKind, Any]:
        """('envelope', dict) for a business answer, else (kind, one-line description)."""
        status = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
        if response.status_code >= 500:
            return "server_error", status
        # The key is masked before anything is parsed or cut short: an answer that echoes the
        # request must not leak it, not even a prefix of it in a truncated excerpt. (Settings
        # allow only URL-safe characters in the key, so the JSON stays valid.)
        text = self._scrub(response.content.decode("utf-8", errors="replace"))
        try:
            payload = without_surrogates(json.loads(text))
        except (ValueError, RecursionError):
            payload = None
            parsed = False
        else:
            parsed = True
        if isinstance(payload, dict) and parse_code(payload.get("code")) is not None:
            return "envelope", payload
        if response.status_code == 429:
            return "too_many", status
        if response.status_code >= 300:
            return "http_error", f"{status}: {excerpt(text)}" if text.strip() else status
        if not parsed:
            return "garbage", f"answer was not JSON: {excerpt(text)}"
        return "garbage", f"answer had no business code: {excerpt(payload)}"

    def redact(self, text: str) -> str:
        """Mask the key (and the webhook token) in provider text (secrets shorter than 8
        characters are left: masking them would corrupt ordinary words, and they are not worth
        hiding)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    _scrub = redact

    def _scrubbed(self, outcome: _Outcome) -> _Outcome:
        if outcome.message and any(secret in outcome.message for secret in self._secrets):
            return replace(outcome, message=self._scrub(outcome.message))
        return outcome


def _submit_outcome(envelope: dict[str, Any]) -> SubmitOutcome:
    code = parse_code(envelope.get("code"))
    assert code is not None  # _read only returns envelopes with a code
    msg = envelope.get("msg")
    if code == 0:
        data = envelope.get("data")
        if not isinstance(data, dict):
            data = {}
        task_id = data.get("taskId")
        if isinstance(task_id, int) and not isinstance(task_id, bool) and task_id > 0:
            task_id = str(task_id)  # json parsed it exactly; keep all digits
        if not isinstance(task_id, str) or not task_id.strip():
            return SubmitOutcome(
                "unknown", code=0, message=f"code 0 but no taskId in the answer: {excerpt(envelope)}"
            )
        return SubmitOutcome("accepted", task_id=task_id.strip(), code=0, message=_accepted_note(data))
    if code in CAPACITY_CODES:
        return SubmitOutcome("busy", code=code, message=describe_code(code, msg))
    if code in SERVER_ERROR_CODES:
        return SubmitOutcome("unknown", code=code, message=describe_code(code, msg))
    return SubmitOutcome("rejected", code=code, message=describe_code(code, msg))


def _accepted_note(data: dict[str, Any]) -> str:
    """The task status, plus ComfyUI's node_errors when promptTips reports any."""
    note = one_line(data.get("taskStatus") or "", 20)
    tips = data.get("promptTips")
    if isinstance(tips, str):
        try:
            parsed = json.loads(tips)
        except (ValueError, RecursionError):
            parsed = None
        node_errors = parsed.get("node_errors") if isinstance(parsed, dict) else None
        if node_errors:
            note = f"{note}; promptTips node_errors: {excerpt(node_errors)}".lstrip("; ")
    return note


_KEY_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")


def _reason(exc: Exception) -> str:
    return one_line(str(exc) or type(exc).__name__, 160)

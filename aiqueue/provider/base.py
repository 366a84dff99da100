"""What the manager needs from a provider, and the outcomes it gets back (no HTTP here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

SubmitKind = Literal["accepted", "busy", "rejected", "unknown"]
TaskKind = Literal["success", "failed", "pending", "unknown"]


@dataclass(frozen=True)
class SubmitOutcome:
    """accepted: task_id set. busy: capacity code or not sent, retry later (job back to queued).
    rejected: terminal code (fail + refund). unknown: may or may not exist at the provider."""

    kind: SubmitKind
    task_id: str | None = None
    code: int | None = None
    message: str = ""  # the provider's real words, e.g. "803 APIKEY_INVALID_NODE_INFO"


@dataclass(frozen=True)
class TaskOutcome:
    """success: outputs hold the file URLs. failed: message holds the real reason.
    pending: still queued/running at the provider. unknown: could not tell (unreachable...)."""

    kind: TaskKind
    outputs: list[str] = field(default_factory=list)
    message: str | None = None
    code: int | None = None


@dataclass(frozen=True)
class CancelOutcome:
    ok: bool
    message: str = ""


class Provider(Protocol):
    def submit(
        self, webapp_id: str, node_info_list: list[dict[str, Any]], webhook_url: str | None
    ) -> SubmitOutcome: ...

    def outputs(self, task_id: str) -> TaskOutcome: ...

    def cancel(self, task_id: str) -> CancelOutcome: ...

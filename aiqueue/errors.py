"""One error hierarchy. Each class carries its exit code and a short slug; data rides as attributes.

Exit codes (documented in the README):
  0 ok · 1 unexpected error · 2 usage / bad value · 3 config · 4 not found · 5 wrong state or
  conflict · 6 insufficient credits · 7 provider · 8 database · 9 invalid webhook · 10 audit problems ·
  130 interrupted (Ctrl-C)
"""

from __future__ import annotations

from typing import Any


class AiqueueError(Exception):
    """Something went wrong."""

    exit_code = 1
    slug = "error"

    def __init__(self, message: str | None = None, **data: Any) -> None:
        self.message = message or (self.__doc__ or self.slug).strip().splitlines()[0]
        self.data = data
        for key, value in data.items():
            setattr(self, key, value)
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"code": self.slug, "message": self.message, "exit_code": self.exit_code}
        payload.update({k: v for k, v in self.data.items() if _jsonable(v)})
        return payload


class UsageError(AiqueueError):
    """Invalid value."""

    exit_code = 2
    slug = "usage"


class ConfigError(AiqueueError):
    """Invalid configuration."""

    exit_code = 3
    slug = "config"


class NotFoundError(AiqueueError):
    """Not found."""

    exit_code = 4
    slug = "not_found"


class UnknownJobError(NotFoundError):
    """Unknown job id."""

    slug = "unknown_job"


class UnknownToolError(NotFoundError):
    """Unknown tool."""

    slug = "unknown_tool"


class InputError(UsageError):
    """Unknown or missing tool input."""

    slug = "bad_input"


class ConflictError(AiqueueError):
    """The request conflicts with the current state."""

    exit_code = 5
    slug = "conflict"


class ActiveJobError(ConflictError):
    """The user already has an active job."""

    slug = "active_job"


class WrongStateError(ConflictError):
    """The job is not in a state that allows this."""

    slug = "wrong_state"


class InsufficientCreditsError(AiqueueError):
    """Not enough credits."""

    exit_code = 6
    slug = "insufficient_credits"


class ProviderError(AiqueueError):
    """The provider could not be reached or answered with an error."""

    exit_code = 7
    slug = "provider"


class DatabaseError(AiqueueError):
    """The database could not be used."""

    exit_code = 8
    slug = "database"


class SchemaMissingError(DatabaseError):
    """The database has no aiqueue schema yet: run `aiqueue db init`."""

    slug = "schema_missing"


class InvalidWebhookError(AiqueueError):
    """The webhook body is malformed."""

    exit_code = 9
    slug = "invalid_webhook"


class Interrupted(AiqueueError):
    """Interrupted (Ctrl-C)."""

    exit_code = 130
    slug = "interrupted"


class AuditProblemsError(AiqueueError):
    """The refund audit found problems."""

    exit_code = 10
    slug = "audit_problems"


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None)))

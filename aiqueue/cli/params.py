"""Turn command-line text into the values the manager takes. Parsing only: rules live in the
manager. Every problem is a UsageError (exit 2) with a one-line message."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

from aiqueue.clock import parse_duration
from aiqueue.errors import UsageError

MAX_ID = 2**63 - 1  # ids are BIGINTs
MAX_DIGITS = 4000  # below int()'s 4300-digit guard; the manager caps real amounts far lower


def positive_int(text: str, what: str) -> int:
    """'25' or '+25' -> 25. Refuses '-5', '0', '1.5', 'nan', '1e30', '٣' (non-ASCII digits)."""
    raw = text.strip()
    digits = raw[1:] if raw.startswith("+") else raw
    if not (digits.isascii() and digits.isdigit()) or len(digits) > MAX_DIGITS or int(digits) == 0:
        shown = raw if len(raw) <= 40 else raw[:37] + "..."
        raise UsageError(f"{what} must be a positive integer (got {shown!r})", value=shown)
    return int(digits)


def job_id(text: str) -> int:
    """A job id: a positive integer that fits the database's BIGINT (anything else is a typo)."""
    import typer

    raw = text.strip()
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not 0 < int(raw) <= MAX_ID:
        raise typer.BadParameter(f"{text!r} is not a job id (a positive integer)")
    return int(raw)


def inputs(pairs: list[str] | None) -> dict[str, str]:
    """['image=a.png', 'scale=4'] -> {'image': 'a.png', 'scale': '4'} (the value may hold '=')."""
    parsed: dict[str, str] = {}
    for pair in pairs or []:
        name, eq, value = pair.partition("=")
        name = name.strip()
        if not eq or not name:
            raise UsageError(f"--input takes NAME=VALUE (got {pair!r})", value=pair)
        if name in parsed:
            raise UsageError(f"--input {name} is given twice", value=name)
        parsed[name] = value
    return parsed


def duration(text: str | None, option: str) -> timedelta | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}", value=text) from None


def status_filter(values: list[str] | None) -> list[str]:
    """--status values as given (the manager checks the names); one naming no status at all
    ('' or ',') is a usage error, not "no filter"."""
    for value in values or []:
        if not any(part.strip() for part in value.split(",")):
            raise UsageError(f"--status: {value!r} names no status (queued, starting, running, completed, "
                             "failed, cancelled)", value=value)
    return list(values or [])


def webhook_body(source: str, max_bytes: int) -> bytes:
    """The raw bytes of FILE, or of stdin for '-'. Reads at most max_bytes + 1 so an oversized
    body is refused by the parser without being held whole in memory."""
    try:
        if source == "-":
            return sys.stdin.buffer.read(max_bytes + 1)
        with Path(source).open("rb") as handle:
            return handle.read(max_bytes + 1)
    except OSError as exc:
        raise UsageError(f"cannot read webhook body from {source}: {exc.strerror or exc}", path=source) from None


def finish_mode(
    job_id: int | None, status: str | None, error: str | None, outputs: list[str] | None, webhook: str | None
) -> None:
    """Exactly one of JOB_ID (with --status) or --webhook."""
    if webhook is not None:
        if job_id is not None:
            raise UsageError("give either JOB_ID or --webhook, not both")
        if status is not None or error is not None or outputs:
            raise UsageError("--status, --error and --output go with JOB_ID, not with --webhook")
        return
    if job_id is None:
        raise UsageError("give a JOB_ID (with --status) or --webhook FILE|-")
    if status is None:
        raise UsageError("finish JOB_ID needs --status completed|failed")

"""Commands that look at the queue: status (overview, one job, one user, unmatched webhooks, a live
watch) and jobs (filtered listings as a table, a JSON list or streamed JSON lines)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer

from aiqueue.cli import completions, params, render
from aiqueue.cli.common import (
    JsonOpt,
    OptionalJobIdArg,
    app,
    manager_of,
    options_of,
    show,
)
from aiqueue.clock import SystemClock
from aiqueue.errors import DatabaseError, SchemaMissingError, UsageError

if TYPE_CHECKING:
    from aiqueue.manager import QueueManager

STATUS_ROWS = 50  # queued jobs shown (and estimated) by default; --limit changes it
JOBS_ROWS = 50  # `jobs` rows by default (--jsonl streams everything unless --limit is given)

StatusLimitOpt = Annotated[int | None, typer.Option(
    "--limit", metavar="N", min=1, max=1_000_000, show_default=False,
    help=f"Queued jobs shown, with positions and estimates (default {STATUS_ROWS}); the total is always exact.")]
JobsLimitOpt = Annotated[int | None, typer.Option(
    "--limit", metavar="N", min=1, max=1_000_000, show_default=False,
    help=f"At most N jobs, the newest (default {JOBS_ROWS}; with --jsonl every match).")]
UnmatchedOpt = Annotated[bool, typer.Option(
    "--unmatched", help="List kept webhooks whose task no job has (yet).")]
StatusUserOpt = Annotated[str | None, typer.Option(
    "--user", metavar="USER", show_default=False,
    help="One user's active job (position, estimated start) and latest jobs. Exit 4 for a user with "
         "no jobs and no credits.")]
WindowOpt = Annotated[str, typer.Option(
    "--window", metavar="DURATION", help="Count the jobs finished within this window (90s, 10m, 1h, 7d).")]
WatchOpt = Annotated[bool, typer.Option(
    "--watch", help="Refresh live until Ctrl-C (exit 0). PostgreSQL: on every change (LISTEN/NOTIFY), "
                    "else every --interval; SQLite: every --interval. With --json: one JSON line per change.")]
IntervalOpt = Annotated[float, typer.Option(
    "--interval", metavar="SECONDS", min=0.1, max=3600,
    help="--watch: seconds between refreshes without a change (SQLite polls at this pace).")]
StatusFilterOpt = Annotated[list[str] | None, typer.Option(
    "--status", metavar="STATUS[,STATUS]", show_default=False, autocompletion=completions.complete_status,
    help="Only these statuses (repeatable or comma-separated): queued, starting, running, completed, "
         "failed, cancelled.")]
JobsUserOpt = Annotated[str | None, typer.Option("--user", metavar="USER", help="Only this user's jobs.")]
JobsToolOpt = Annotated[str | None, typer.Option("--tool", metavar="TOOL", help="Only this tool's jobs.")]
SinceOpt = Annotated[str | None, typer.Option(
    "--since", metavar="DURATION|TIME", show_default=False,
    help="Only jobs created since: a duration back from now (1h, 2d) or an ISO-8601 time "
         "(2026-12-03T10:00:00Z; without an offset it is UTC).")]
JsonlOpt = Annotated[bool, typer.Option(
    "--jsonl", help="One JSON object per line, streamed (bounded memory; every match unless --limit).")]


@app.command()
def status(
    ctx: typer.Context, job_id: OptionalJobIdArg = None, limit: StatusLimitOpt = None,
    user: StatusUserOpt = None, window: WindowOpt = "24h", watch: WatchOpt = False,
    interval: IntervalOpt = 2.0, unmatched: UnmatchedOpt = False, as_json: JsonOpt = False,
) -> None:
    """The running slots and the queue (positions, estimated starts), counts per status and the
    oldest wait; with JOB_ID one job with its events and ledger; with --user one user's job.

    Example: aiqueue status --watch; aiqueue status 42 --json; aiqueue status --user alice
    """
    span = params.duration(window, "--window")
    assert span is not None
    if unmatched:
        if job_id is not None or limit is not None or user is not None or watch:
            raise UsageError("--unmatched lists webhooks; it goes without JOB_ID, --user, --limit and --watch")
        result = render.Unmatched(manager_of(ctx).unmatched_webhooks())
        show(ctx, as_json, result, render.render_unmatched)
        return
    if job_id is not None:
        if limit is not None or user is not None or watch:
            raise UsageError("JOB_ID shows one job; it goes without --limit, --user and --watch")
        show(ctx, as_json, manager_of(ctx).job_detail(job_id), render.render_job_detail)
        return
    if user is not None and limit is not None:
        raise UsageError("--limit cuts the queue; it does not go with --user")
    manager = manager_of(ctx, long_lived=watch)  # a watch checks pooled connections before use
    from aiqueue.cli import render_queue

    if user is not None:
        snapshot: Callable[[], Any] = lambda: manager.user_status(user)
        view: Callable[[Any, int], list[Any]] = render_queue.user_view
    else:
        rows = STATUS_ROWS if limit is None else limit
        snapshot = lambda: manager.status(rows, span)
        view = render_queue.status_view
    as_json = as_json or options_of(ctx).json
    if watch:
        _watch(manager, snapshot, view, interval, as_json)
    elif user is not None:
        show(ctx, as_json, snapshot(), render_queue.render_user_status)
    else:
        show(ctx, as_json, snapshot(), render.render_status)


@app.command()
def jobs(
    ctx: typer.Context, statuses: StatusFilterOpt = None, user: JobsUserOpt = None, tool: JobsToolOpt = None,
    since: SinceOpt = None, limit: JobsLimitOpt = None, as_json: JsonOpt = False, jsonl: JsonlOpt = False,
) -> None:
    """List jobs, newest first, filtered by status, user, tool and creation time.

    Example: aiqueue jobs --status failed,cancelled --since 24h; aiqueue jobs --jsonl > jobs.jsonl
    """
    as_json = as_json or options_of(ctx).json
    if as_json and jsonl:
        raise UsageError("give --json (one list) or --jsonl (one object per line), not both")
    statuses = params.status_filter(statuses)
    cutoff = _since(since)
    manager = manager_of(ctx)
    if jsonl:
        import json
        import sys

        out = sys.stdout
        for job in manager.jobs(statuses, user, tool, cutoff, limit, stream=True):
            out.write(json.dumps(job.to_dict()) + "\n")
        out.flush()
        return
    found = list(manager.jobs(statuses, user, tool, cutoff, JOBS_ROWS if limit is None else limit))
    if as_json:
        render.write_json([job.to_dict() for job in found])
    else:
        from aiqueue.cli import render_queue

        render_queue.render_job_list(render.stdout_console(), found)


def _since(text: str | None) -> timedelta | datetime | None:
    """A duration back from now, or an ISO-8601 time (UTC when it has no offset)."""
    if text is None:
        return None
    raw = text.strip()
    if raw[:1].isdigit() and any(ch in raw for ch in "-:T"):
        try:
            moment = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise UsageError(f"--since: bad time {text!r} (use e.g. 2026-12-03T10:00:00Z or 1h)",
                             value=text) from None
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment
    return params.duration(raw, "--since")


def _watch(
    manager: QueueManager, snapshot: Callable[[], Any], view: Callable[[Any, int], list[Any]],
    interval: float, as_json: bool,
) -> None:
    """Redraw on every change (or every `interval` seconds) until Ctrl-C, which exits 0. Started in
    the background without job control, SIGINT would be ignored: take it back explicitly."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    listener = manager.listen()
    snapshot = _while_file_exists(manager, snapshot)
    try:
        if as_json:
            _watch_json(listener, snapshot, interval)
        else:
            _watch_live(listener, snapshot, view, interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends; Live has restored the cursor on its way out
    finally:
        listener.close()


RECONNECT_FIRST = 0.5  # seconds before the second attempt to reconnect, doubling up to
RECONNECT_MAX = 5.0


def _snapshots(listener: Any, snapshot: Callable[[], Any], interval: float,
               lost: Callable[[str], None]) -> Iterator[Any]:
    """The first snapshot, then one after every change (or `interval`), through lost connections.

    A lost connection (the listener's or the engine's: DatabaseError) calls lost(message) and
    retries until both are back, 0.5 s doubling to 5 s apart, forever (Ctrl-C ends it); then a
    snapshot at once, as what changed meanwhile was never heard. Only this read is retried, never a
    write. The first snapshot is not: a database unreachable at start is an error (exit 8), and so
    is any error on SQLite (no connection to lose) and a schema gone from the database."""
    current = snapshot()
    while True:
        yield current
        try:
            listener.wait(interval)
            current = snapshot()
        except DatabaseError as exc:
            if not listener.reconnects or isinstance(exc, SchemaMissingError):
                raise
            current = _reconnect(listener, snapshot, lost, exc)


def _reconnect(listener: Any, snapshot: Callable[[], Any], lost: Callable[[str], None],
               error: DatabaseError) -> Any:
    """LISTEN again and read the queue afresh, retrying with a backoff until both work."""
    from aiqueue.cli.wiring import scrub

    delay = RECONNECT_FIRST
    while True:
        lost(scrub(error.message))
        try:
            listener.reconnect()
            return snapshot()
        except SchemaMissingError:
            raise
        except DatabaseError as exc:
            error = exc
        time.sleep(delay)
        delay = min(delay * 2, RECONNECT_MAX)


def _while_file_exists(manager: QueueManager, snapshot: Callable[[], Any]) -> Callable[[], Any]:
    """On SQLite, each refresh first checks that the database file is still there: an open
    connection keeps reading a deleted file, so the watch would go on showing its last state.
    A SchemaMissingError ends the watch (exit 8), as it ends a one-shot command."""
    from aiqueue.store.engine import sqlite_file

    path = sqlite_file(manager.store.url)
    if path is None:
        return snapshot

    def checked() -> Any:
        if not path.exists():  # the words of Store._check_file, which one-shot commands meet
            raise SchemaMissingError(f"database file {path} does not exist: run `aiqueue db init`")
        return snapshot()

    return checked


def _watch_json(listener: Any, snapshot: Callable[[], Any], interval: float) -> None:
    """One JSON line per change: a first snapshot, then one whenever the queue differs. stdout stays
    JSON only: a lost connection says one line on stderr per outage."""
    last = None
    said = False

    def lost(message: str) -> None:
        nonlocal said
        if not said:
            render.note(f"reconnecting to the database\u2026 ({message})")
            said = True

    for data in _snapshots(listener, snapshot, interval, lost):
        said = False
        current = data.to_dict()
        key = _fingerprint(current)
        if key != last:
            render.write_json(current)
            last = key


def _fingerprint(data: dict[str, Any]) -> str:
    """What counts as a change: everything but the clock-driven fields (ages, estimates, now)."""
    import json

    volatile = {"generated_at", "window", "oldest_queued_age_seconds", "running_seconds", "waiting_seconds",
                "estimated_start", "estimated_wait_seconds", "estimates"}

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in volatile}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return json.dumps(strip(data), sort_keys=True)


def _watch_live(listener: Any, snapshot: Callable[[], Any], view: Callable[[Any, int], list[Any]],
                interval: float) -> None:
    from rich.console import Group
    from rich.live import Live

    console = render.stdout_console()
    how = "on every change" if type(listener).__name__ == "PgListener" else f"every {interval:g}s"
    body: list[Any] = []

    def clock() -> str:
        return SystemClock().now().strftime("%H:%M:%S")

    since = ""

    with Live(Group(), console=console, auto_refresh=False, transient=False) as live:

        def lost(message: str) -> None:  # the last view stays, with what happened in the footer
            nonlocal since
            since = since or clock()
            footer = render_footer(f"{clock()} UTC - reconnecting to the database\u2026 (lost at {since}; "
                                   "the view above is from then) - Ctrl-C to quit")
            live.update(Group(*body, footer, render_footer(f"last error: {message}")), refresh=True)

        for data in _snapshots(listener, snapshot, interval, lost):
            since = ""
            body = view(data, console.width)
            live.update(Group(*body, render_footer(f"{clock()} UTC - refreshes {how} - Ctrl-C to quit")),
                        refresh=True)


def render_footer(text: str) -> Any:
    from rich.text import Text

    return Text(text, style="dim", no_wrap=True, overflow="ellipsis")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt

"""The one renderer: JSON for scripts, rich tables for people, both from the same result objects.

JSON is plain `json.dumps(result.to_dict())` on stdout, never through rich. Tables go to stdout,
talk (notes, warnings) to stderr. rich is imported only when a table is drawn; it already drops
colour for NO_COLOR and for output that is not a terminal, so nothing here forces colour. Every
text that came from a user or a provider is drawn as plain text (no markup, control characters
escaped), so it cannot restyle or corrupt the terminal. The `render_*` functions take a console
so that `aiqueue demo` can draw the same tables.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

from aiqueue.clock import format_duration

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from aiqueue.domain import (
        AuditProblem,
        AuditResult,
        Balance,
        CleanupResult,
        EnqueueResult,
        FinishResult,
        GrantResult,
        Job,
        JobDetail,
        JobEvent,
        LedgerEntry,
        ProcessResult,
        PauseResult,
        QueueStatus,
        UnmatchedWebhook,
    )

DASH = "-"


class Result(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SchemaInit:
    """`db init`'s answer: the manager returns a bool, the contract wants an object."""

    created: bool
    database: str  # already masked

    def to_dict(self) -> dict[str, Any]:
        return {"created": self.created, "database": self.database}


@dataclass(frozen=True)
class Entries:
    """`credits ledger`'s answer: {"entries": [...]} around the manager's list."""

    entries: Sequence[LedgerEntry]

    def to_dict(self) -> dict[str, Any]:
        return {"entries": [e.to_dict() for e in self.entries]}


@dataclass(frozen=True)
class ServerInfo:
    """`fake-runninghub`'s answer while it serves."""

    base_url: str

    def to_dict(self) -> dict[str, Any]:
        return {"base_url": self.base_url}


@dataclass(frozen=True)
class Unmatched:
    """`status --unmatched`'s answer: {"webhooks": [...]}."""

    webhooks: Sequence[UnmatchedWebhook]

    def to_dict(self) -> dict[str, Any]:
        return {"webhooks": [w.to_dict() for w in self.webhooks]}


@dataclass(frozen=True)
class Written:
    """`config init`'s answer."""

    path: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path}


@dataclass(frozen=True)
class ConfigView:
    """`config show` / `config check`: the redacted settings."""

    settings: dict[str, Any]
    checked: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, **self.settings} if self.checked else dict(self.settings)


# --- the two channels -------------------------------------------------------------------------


def write_json(payload: Any, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(json.dumps(payload) + "\n")
    stream.flush()


def note(message: str) -> None:
    """Talk for people: stderr, one line, plain."""
    sys.stderr.write(_plain(message) + "\n")
    sys.stderr.flush()


def stdout_console() -> Console:
    from rich.console import Console

    # markup/emoji/highlight off: cells hold data, not rich markup; colour only for terminals.
    return Console(markup=False, emoji=False, highlight=False)


def show(as_json: bool, result: Result, table: Callable[[Console, Any], None]) -> None:
    """The whole output of a command: `result.to_dict()` as JSON, or `table(console, result)`."""
    if as_json:
        write_json(result.to_dict())
    else:
        table(stdout_console(), result)


def render_server(console: Console, info: ServerInfo) -> None:
    _line(console, info.base_url)  # stdout holds only the URL, for scripts
    note("fake RunningHub serving on 127.0.0.1; Ctrl-C to stop")


# --- schema and credits -----------------------------------------------------------------------


def render_db_init(console: Console, result: SchemaInit) -> None:
    state = "created" if result.created else "already present"
    _line(console, f"aiqueue schema {state} in {result.database}")


def render_grant(console: Console, result: GrantResult) -> None:
    _line(console, f"granted {result.entry.amount} credits to {_plain(result.entry.user)}"
                   f" (ledger entry {result.entry.id}); balance {result.balance}")


def render_balance(console: Console, balance: Balance) -> None:
    _line(console, f"{_plain(balance.user)}: {balance.balance} credits")


def render_entries(console: Console, result: Entries) -> None:
    render_ledger(console, result.entries)


def render_ledger(console: Console, entries: Sequence[LedgerEntry], title: str | None = "Ledger") -> None:
    table = _table(title, ("entry", R), ("at (UTC)", L), ("user", W), ("job", R), ("kind", L),
                   ("amount", R), ("note", W))
    for entry in entries:
        table.add_row(
            _cell(entry.id), _cell(_when(entry.created_at)), _cell(entry.user), _cell(entry.job_id),
            _cell(entry.kind), _cell(f"{entry.amount:+d}"), _cell(entry.note),
        )
    _print_table(console, table, len(entries), "no ledger entries")


# --- the queue --------------------------------------------------------------------------------


def render_status(console: Console, status: QueueStatus, now: datetime | None = None) -> None:
    # The queue views (status, --user, --watch, jobs) live in render_queue.
    from aiqueue.cli import render_queue

    render_queue.render_status(console, status, now)


def render_pause(console: Console, result: PauseResult) -> None:
    state = "paused: nothing new is submitted" if result.paused else "running: jobs are submitted"
    _line(console, f"queue {state}" + ("" if result.changed else " (it already was)"))
    if result.process.started or result.process.failed or result.process.requeued:
        render_jobs(console, "Next jobs", _process_rows(result.process), "")


def render_written(console: Console, result: Written) -> None:
    _line(console, f"wrote {result.path} (mode 0600); edit its tools, then: aiqueue config check")


def render_config(console: Console, view: ConfigView) -> None:
    values = view.settings
    if view.checked:
        where = values["config_path"] or "no config file (defaults only)"
        tools = len(values["tools"])
        _line(console, f"config OK: {where}; {tools} tool{'' if tools == 1 else 's'}; database {values['database_url']}")
        return
    sources = values["sources"]
    table = _table("Effective config", ("key", L), ("value", W), ("from", L))
    rows = [
        ("config file", values["config_path"] or "-", "-"),
        ("database.url", values["database_url"], sources.get("database.url")),
        ("queue.max_concurrent", values["max_concurrent"], sources.get("queue.max_concurrent")),
        ("queue.stale_after", f"{values['stale_after_seconds']:g}s", sources.get("queue.stale_after")),
        ("provider.name", values["provider_name"], sources.get("provider.name")),
        ("provider.base_url", values["base_url"], sources.get("provider.base_url")),
        ("provider.webhook_url", values["webhook_url"] or "-", sources.get("provider.webhook_url")),
        ("provider.api_key", values["api_key"] or "(not set)", sources.get("provider.api_key")),
        ("provider.timeout", f"{values['request_timeout']:g}s", sources.get("provider.timeout")),
        ("webhook.public_url", values["webhook"]["public_url"] or "-", sources.get("webhook.public_url")),
        ("webhook.token", values["webhook"]["token"] or "(not set)", sources.get("webhook.token")),
    ]
    doctor = values["doctor"]
    for level in ("warning", "critical"):
        key = f"doctor.queue_age_{level}"
        rows.append((key, f"{doctor[f'queue_age_{level}_seconds']:g}s", sources.get(key)))
    for level in ("warning", "critical"):
        key = f"doctor.queue_depth_{level}"
        rows.append((key, doctor[f"queue_depth_{level}"], sources.get(key)))
    for key, value, source in rows:
        table.add_row(_cell(key), _cell(value), _cell(source))
    _print_table(console, table, len(rows), "")
    tools = _table(f"Tools (from the {sources.get('tools')})", ("tool", W), ("webapp id", L),
                   ("cost", R), ("inputs: name -> node.field [=default]", W))
    for name, tool in values["tools"].items():
        inputs = ", ".join(f"{i} -> {spec['node_id']}.{spec['field']}" + ("" if spec["required"] else f" ={spec['default']}")
                           for i, spec in tool["inputs"].items())
        tools.add_row(_cell(name), _cell(tool["webapp_id"]), _cell(tool["cost"]), _cell(inputs))
    _print_table(console, tools, len(values["tools"]), "no tools configured")


def render_unmatched(console: Console, result: Unmatched) -> None:
    table = _table("Unmatched webhooks (no job has their task yet)", ("inbox", "right"),
                   ("received (UTC)", "left"), ("provider task", "left"), ("bytes", "right"))
    for hook in result.webhooks:
        table.add_row(_cell(hook.id), _cell(_when(hook.received_at)), _cell(hook.task_id),
                      _cell(len(hook.body.encode("utf-8"))))
    _print_table(console, table, len(result.webhooks), "every kept webhook matched a job")


def render_job_detail(console: Console, detail: JobDetail, now: datetime | None = None) -> None:
    from rich.panel import Panel
    from rich.table import Table

    job = detail.job
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    rows: list[tuple[str, Any]] = [
        ("status", job.status),
        ("user", job.user),
        ("tool", job.tool),
        ("cost", job.cost),
        ("position", job.position),
        ("est. start", None if job.status != "queued" else _estimate(detail)),
        ("slot", job.slot),
        ("provider task", job.provider_task_id),
        ("inputs", ", ".join(f"{k}={v}" for k, v in job.inputs.items()) or None),
        ("outputs", "\n".join(job.outputs) or None),
        ("error", job.error),
        ("created", _when(job.created_at)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
    ]
    for key, value in rows:
        grid.add_row(key, _text(value))
    console.print(Panel(grid, title=f"job {job.id}", title_align="left", expand=False))
    render_events(console, detail.events)
    render_ledger(console, detail.ledger, title=f"Ledger of job {job.id}")


def _estimate(detail: JobDetail) -> str:
    if detail.estimated_start is None:
        return "unknown (paused, or no completed run to estimate from)"
    approx = ", approximate" if detail.approximate else ""
    return f"{_when(detail.estimated_start)} UTC{approx}"


def render_events(console: Console, events: Sequence[JobEvent]) -> None:
    table = _table("Events", ("at (UTC)", L), ("from", L), ("to", L), ("detail", W))
    for event in events:
        table.add_row(_cell(_when(event.at)), _cell(event.from_status), _cell(event.to_status),
                      _cell(event.detail))
    _print_table(console, table, len(events), "no events")


def render_jobs(console: Console, title: str, rows: Sequence[tuple[str, Job]], empty: str) -> None:
    """Jobs a command touched, one per row, with what happened to each."""
    if not rows:
        if empty:
            _line(console, empty)
        return
    table = _table(title, ("outcome", L), ("job", R), ("user", W), ("tool", W), ("status", L),
                   ("detail", W))
    for outcome, job in rows:
        table.add_row(_cell(outcome), _cell(job.id), _cell(job.user), _cell(job.tool),
                      _cell(job.status), _cell(_detail(job)))
    _print_table(console, table, len(rows), empty)


def render_enqueue(console: Console, result: EnqueueResult) -> None:
    job = result.job
    _line(console, f"job {job.id} for {_plain(job.user)}: {_plain(job.tool)}, {_state(job)}; charged {job.cost}")
    others = [(o, j) for o, j in _process_rows(result.process) if j.id != job.id]
    if others:
        render_jobs(console, "Also moved by this enqueue", others, "")


def render_process(console: Console, result: ProcessResult) -> None:
    render_jobs(console, "process-next", _process_rows(result),
                "nothing to do: no free slot, nothing queued or the queue is paused")


def render_finish(console: Console, result: FinishResult) -> None:
    if result.job is None:  # a webhook for a task no job has: the message says so
        _line(console, _plain(result.message or "nothing changed: no job has this provider task"))
    elif not result.changed:
        _line(console, f"nothing changed: {_plain(result.message or _state(result.job))}")
    else:
        refund = f"; refunded {result.refunded} credits" if result.refunded else ""
        _line(console, f"job {result.job.id}: {_state(result.job)}{refund}")
        if result.message:
            _line(console, _plain(result.message))
    if result.process.started or result.process.failed or result.process.requeued:
        render_jobs(console, "Next jobs", _process_rows(result.process), "")


def render_cleanup(console: Console, result: CleanupResult) -> None:
    if result.dry_run:
        render_jobs(console, "cleanup --dry-run: would end (after asking the provider)",
                    [("stale", j) for j in result.stale], "nothing to clean up: no job held its slot too long")
        return
    rows = ([("expired", j) for j in result.expired] + [("completed", j) for j in result.completed]
            + [("failed", j) for j in result.failed] + _process_rows(result.process))
    render_jobs(console, "cleanup", rows, "nothing to clean up: no job held its slot too long")


def render_audit(console: Console, result: AuditResult) -> None:
    if result.dry_run:
        if result.would_fix:
            _problems(console, "--fix would repair (dry run: nothing changed)", result.would_fix)
        else:
            _line(console, "dry run: --fix would change nothing")
    if result.fixed:
        _problems(console, "Fixed", result.fixed)
    if result.ok:
        _line(console, "refund audit: the ledger is clean")
        return
    _problems(console, "Refund audit problems", result.problems)
    fixable = sum(1 for p in result.problems if p.fixable)
    hint = f"; {fixable} fixable with --fix" if fixable else ""
    note(f"refund audit found {len(result.problems)} problem(s){hint}")


def _problems(console: Console, title: str, problems: Sequence[AuditProblem]) -> None:
    table = _table(title, ("kind", L), ("job", R), ("user", W), ("detail", W))
    for p in problems:
        table.add_row(_cell(p.kind), _cell(p.job_id), _cell(p.user), _cell(p.detail))
    _print_table(console, table, len(problems), "none")


# --- helpers ----------------------------------------------------------------------------------


def _process_rows(result: ProcessResult) -> list[tuple[str, Job]]:
    return ([("expired", j) for j in result.expired] + [("started", j) for j in result.started]
            + [("requeued", j) for j in result.requeued] + [("failed", j) for j in result.failed]
            + [(f"polled: {j.status}", j) for j in result.finished]
            + [("unknown", j) for j in result.unknown])


def _state(job: Job) -> str:
    if job.status == "queued":
        return f"queued at position {job.position}"
    if job.status == "running":
        return f"running as provider task {job.provider_task_id}"
    if job.error:
        error = _plain(job.error)
        return error if error.startswith(str(job.status)) else f"{job.status}: {error}"
    return str(job.status)


def _detail(job: Job) -> str | None:
    if job.error:
        return job.error
    if job.status == "queued":
        return f"position {job.position}"
    if job.outputs:
        return " ".join(job.outputs)
    return f"task {job.provider_task_id}" if job.provider_task_id else None


# Column kinds: short values kept on one line (left or right aligned), and free text that wraps
# to fit 80 columns.
L, R, W = "left", "right", "wrap"


def _table(title: str | None, *columns: tuple[str, str]) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    # L and R columns keep their words whole; W columns take the remaining width and wrap.
    for header, kind in columns:
        wrap = kind == W
        table.add_column(header, justify="right" if kind == R else "left", no_wrap=not wrap,
                         overflow="fold", ratio=1 if wrap else None)
    return table


def _print_table(console: Console, table: Table, rows: int, empty: str) -> None:
    if rows == 0 and empty and not table.caption:
        table.caption = empty
    print_whole(console, keep_whole(table))


def keep_whole(table: Table) -> Table:
    """Never cut an id, a number, a status or a time: every one-line column (no_wrap, not cut
    with an ellipsis) is at least as wide as its widest cell. On a terminal too narrow for them,
    rich narrows the free-text columns, and the line wraps rather than showing a wrong value."""
    from rich.cells import cell_len

    for column in table.columns:
        if column.no_wrap and column.overflow != "ellipsis":
            widest = max((cell_len(getattr(cell, "plain", str(cell))) for cell in column._cells), default=0)
            column.min_width = max(column.min_width or 0, widest)
    return table


def print_whole(console: Console, renderable: Any) -> None:
    """Print a table no narrower than its columns' minimum widths, uncropped: on a terminal too
    narrow for it the lines wrap there, rather than rich squeezing an id to nothing."""
    from rich.segment import Segments
    from rich.table import Table

    if isinstance(renderable, Table):
        # The columns' own minimums (keep_whole's), not rich's measure, which asks a whole word
        # of every cell: a long user id would widen a table meant to cut it with an ellipsis.
        needed = renderable._extra_width + sum(
            (column.min_width or 1) + renderable._get_padding_width(index)
            for index, column in enumerate(renderable.columns))
        if needed > console.width:  # console.print(width=) only narrows: render at `needed` first
            renderable = Segments(console.render(renderable, console.options.update_width(needed)))
    console.print(renderable, crop=False)


def _cell(value: Any) -> Any:
    return _text(value)


def _line(console: Console, text: str) -> None:
    # soft_wrap: a message stays one line however wide, so scripts can grep it.
    console.print(text, soft_wrap=True)


def _text(value: Any) -> Any:
    from rich.text import Text

    return Text(DASH if value is None else _plain(str(value)))


def _plain(text: str) -> str:
    """Escape control characters (ANSI escapes, carriage returns) in text we did not write."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == "\n" else ascii(ch)[1:-1] for ch in text)


def _when(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _since(value: datetime | None, now: datetime) -> str:
    return DASH if value is None else format_duration(now - value)

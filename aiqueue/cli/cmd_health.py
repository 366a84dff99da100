"""Commands for monitoring: doctor (health checks with plugin exit codes) and metrics (Prometheus
text exposition format, on stdout or written atomically for node_exporter's textfile collector).

The numbers come from aiqueue.monitor; this module only renders them. rich is imported only when
the doctor's table is drawn.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from typer.core import TyperCommand

from aiqueue.cli import render, wiring
from aiqueue.cli.common import JsonOpt, app, manager_of, options_of, show
from aiqueue.errors import UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from aiqueue.monitor import HealthReport, Metrics

OutputOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045 - as common.py: typer reads it
    "--output", metavar="FILE", show_default=False, dir_okay=False,
    help="Write to FILE atomically (mode 0644) instead of stdout, e.g. for node_exporter's "
         "textfile collector (a name ending in .prom).")]



class PluginCommand(TyperCommand):
    """A command that follows the monitoring-plugin exit codes, where 2 means CRITICAL: its usage
    errors exit 3 (UNKNOWN) instead. The catch point (app.py main) reads `usage_exit_code`."""

    usage_exit_code = 3

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:
            # Some parser errors ("--skip requires an argument") come without a context: give
            # them this one, so the catch point knows whose usage error it is.
            if getattr(exc, "ctx", False) is None:
                exc.ctx = ctx  # type: ignore[attr-defined]
            raise


def _skippable(ctx: Any, param: Any, values: list[str] | None) -> list[str] | None:
    """--skip's values, checked while parsing (before any connection): a usage error of doctor."""
    from aiqueue.monitor import SKIPPABLE

    unknown = sorted(set(values or ()) - set(SKIPPABLE))
    if unknown:
        raise typer.BadParameter(f"no check named {unknown[0]!r} can be skipped (choose from {', '.join(SKIPPABLE)})")
    return values


def _complete_skip(ctx: Any, incomplete: str) -> list[str]:
    from aiqueue.monitor import SKIPPABLE

    return [name for name in SKIPPABLE if name.startswith(incomplete)]


SkipOpt = Annotated[Optional[list[str]], typer.Option(  # noqa: UP045 - as common.py: typer reads it
    "--skip", metavar="CHECK", show_default=False, callback=_skippable, autocompletion=_complete_skip,
    help="Do not run this check (repeatable): provider, stuck_jobs, queue_age, queue_depth, paused, "
         "refund_audit. E.g. the audit, which reads every job, from a check run every minute.")]

_LEVEL_STYLE = {"ok": "green", "warning": "yellow", "critical": "bold red"}


@app.command(cls=PluginCommand)
def doctor(ctx: typer.Context, skip: SkipOpt = None, as_json: JsonOpt = False) -> None:
    """Check the database, the schema, RunningHub (account status), stuck jobs, the queue's age
    and depth (thresholds in the config's doctor section), a paused queue and the refund audit.
    Exit 0 ok, 1 warning, 2 critical, as monitoring plugins do (3: an invalid config or usage).

    Example: aiqueue doctor --skip refund_audit --json | jq '.checks[] | select(.level != "ok")'
    """
    from aiqueue.monitor import doctor as run_doctor

    manager = manager_of(ctx)
    provider = ctx.with_resource(closing(wiring.LazyRunningHub(manager.settings)))
    report = run_doctor(manager, provider, skip=skip or ())
    show(ctx, as_json, report, render_doctor)
    raise typer.Exit(report.exit_code)


@app.command()
def metrics(ctx: typer.Context, output: OutputOpt = None, as_json: JsonOpt = False) -> None:
    """Queue metrics in the Prometheus text format: depth, running, slots, paused, oldest queued
    age, stuck jobs, jobs by status and tool, refunds, provider errors by code, scrape time.

    Example: aiqueue metrics --output /var/lib/node_exporter/textfile/aiqueue.prom
    """
    from aiqueue.monitor import collect_metrics

    result = collect_metrics(manager_of(ctx))
    options = options_of(ctx)
    if output is not None:
        write_atomically(output, prometheus_text(result))
    if options.quiet:  # a read: the exit code tells
        return
    if as_json or options.json:
        render.write_json(result.to_dict())
    elif output is None:
        sys.stdout.write(prometheus_text(result))
        sys.stdout.flush()


# --- doctor's table -----------------------------------------------------------------------------


def render_doctor(console: Console, report: HealthReport) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    counts = {level: sum(1 for c in report.checks if c.level == level) for level in ("warning", "critical")}
    summary = ", ".join(f"{n} {level}" for level, n in counts.items() if n) or "all checks passed"
    table = Table(title=Text(f"aiqueue doctor: {report.status.upper()} ({summary})"), title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("check", no_wrap=True)
    table.add_column("level", no_wrap=True)
    table.add_column("detail", overflow="fold", ratio=1)
    for check in report.checks:
        table.add_row(Text(check.name), Text(check.level, style=_LEVEL_STYLE[check.level]),
                      Text(_plain(check.detail)))
    console.print(table)


def _plain(text: str) -> str:
    # Details may quote a provider or a database: no control characters reach the terminal.
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


# --- the Prometheus text exposition format ----------------------------------------------------

# (name, type, help); every family is always written, so an absent series means "no data".
_FAMILIES = {
    "queue_depth": ("gauge", "Jobs waiting in the queue (status queued)."),
    "running_jobs": ("gauge", "Jobs holding a slot (starting or running)."),
    "slots_limit": ("gauge", "The global limit of jobs holding a slot (queue.max_concurrent)."),
    "paused": ("gauge", "1 while the queue is paused (nothing is submitted), else 0."),
    "oldest_queued_age_seconds": ("gauge", "How long the job at the head of the queue has waited; 0 when empty."),
    "stuck_jobs": ("gauge", "Jobs holding a slot longer than queue.stale_after (cleanup ends them)."),
    "jobs": ("gauge", "Active jobs by status (queued, starting, running) and tool."),
    "jobs_total": ("counter", "Jobs that reached a terminal status (completed, failed, cancelled), by status and tool."),
    "refunds_total": ("counter", "Refund entries in the credit ledger."),
    "refunded_credits_total": ("counter", "Credits refunded through the ledger."),
    "provider_errors_total": ("counter", "Failed jobs whose stored error carries a RunningHub code, by code."),
    "scrape_duration_seconds": ("gauge", "Seconds this collection of the metrics took."),
}


def prometheus_text(m: Metrics) -> str:
    """The metrics in the text exposition format 0.0.4: HELP and TYPE before each family,
    aiqueue_ names, label values escaped (backslash, double quote, newline), a final newline."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {
        "queue_depth": [({}, m.queued)],
        "running_jobs": [({}, m.running)],
        "slots_limit": [({}, m.slots_limit)],
        "paused": [({}, 1 if m.paused else 0)],
        "oldest_queued_age_seconds": [({}, m.oldest_queued_age_seconds)],
        "stuck_jobs": [({}, m.stuck)],
        "jobs": [({"status": s, "tool": t}, n) for s, t, n in m.active],
        "jobs_total": [({"status": s, "tool": t}, n) for s, t, n in m.finished],
        "refunds_total": [({}, m.refunds)],
        "refunded_credits_total": [({}, m.refunded_credits)],
        "provider_errors_total": [({"code": c}, n) for c, n in m.provider_errors],
        "scrape_duration_seconds": [({}, m.scrape_duration_seconds)],
    }
    lines: list[str] = []
    for family, (kind, text) in _FAMILIES.items():
        name = f"aiqueue_{family}"
        lines.append(f"# HELP {name} {_escape_help(text)}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples[family]:
            shown = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels.items())
            lines.append(f"{name}{{{shown}}} {_number(value)}" if shown else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, fsync, rename and
    fsync the directory: a scraper sees the old file or the new one, never half of one. Mode
    0644 so that node_exporter (another user) can read it."""
    target = Path(os.path.abspath(os.path.expanduser(path)))
    directory = target.parent
    if not directory.is_dir():
        raise UsageError(f"--output: directory {directory} does not exist", path=str(target))
    if target.is_dir():
        raise UsageError(f"--output: {target} is a directory", path=str(target))
    try:
        # Not ending in .prom: the textfile collector never reads a half-written temporary file.
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise UsageError(f"--output: cannot write in {directory}: {exc.strerror}", path=str(target)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fchmod(handle.fileno(), 0o644)
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise UsageError(f"--output: cannot write {target}: {exc.strerror}", path=str(target)) from None
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems refuse to open a directory; the rename already happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

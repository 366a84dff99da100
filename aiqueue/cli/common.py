"""What every command module shares: the Typer app and its sub-apps, the options declared once,
and the three helpers a command is made of (settings-free globals, the manager, the renderer).

Command modules (app.py's core commands, cmd_*.py) register on `app` here; app.py imports them
all and holds main(), the one catch point.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from typer.core import TyperArgument, TyperGroup

from aiqueue.cli import completions, params, render, wiring
from aiqueue.domain import ProcessResult
from aiqueue.errors import ProviderError

if TYPE_CHECKING:
    from aiqueue.manager import QueueManager

# --- options and arguments, each declared once ---------------------------------------------------


class FinishStatus(str, Enum):
    completed = "completed"
    failed = "failed"


Text = Optional[str]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (errors on stderr).")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", metavar="PATH", show_default=False,
    help="Config file. Default: $AIQUEUE_CONFIG, else ./aiqueue.toml, else ~/.config/aiqueue/config.toml.")]
DbOpt = Annotated[Text, typer.Option(
    "--db", metavar="URL", show_default=False,
    help="Database URL; overrides $AIQUEUE_DATABASE_URL and database.url.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for unexpected errors.")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", help="For cron: print nothing unless something changed or failed; the exit code tells.")]
JobIdArg = Annotated[int, typer.Argument(metavar="JOB_ID", parser=params.job_id, show_default=False)]
OptionalJobIdArg = Annotated[Optional[int], typer.Argument(
    metavar="JOB_ID", parser=params.job_id, show_default=False)]
UserArg = Annotated[str, typer.Argument(metavar="USER", show_default=False, help="User id.")]
AmountArg = Annotated[str, typer.Argument(metavar="AMOUNT", show_default=False, help="A positive integer.")]
NoteOpt = Annotated[Text, typer.Option("--note", metavar="TEXT", help="Why (kept in the ledger).")]
LimitOpt = Annotated[Optional[int], typer.Option(
    "--limit", metavar="N", min=1, max=1_000_000, show_default=False, help="Show at most N rows.")]
UserFilterOpt = Annotated[Text, typer.Option("--user", metavar="USER", help="Only this user's entries.")]
JobFilterOpt = Annotated[Optional[int], typer.Option(
    "--job", metavar="ID", parser=params.job_id, help="Only this job's entries.")]
UserOpt = Annotated[str, typer.Option("--user", metavar="USER", show_default=False, help="Who pays.")]
ToolOpt = Annotated[str, typer.Option("--tool", metavar="TOOL", show_default=False, help="A tool from the config.",
                                      autocompletion=completions.complete_tool)]
InputOpt = Annotated[Optional[list[str]], typer.Option(
    "--input", metavar="NAME=VALUE", help="A tool input (repeatable).")]
NoStartOpt = Annotated[bool, typer.Option("--no-start", help="Only queue it; do not fill free slots.")]
FinishStatusOpt = Annotated[Optional[FinishStatus], typer.Option("--status", help="How the job ended.")]
ErrorOpt = Annotated[Text, typer.Option("--error", metavar="MSG", help="The provider's real failure message.")]
OutputOpt = Annotated[Optional[list[str]], typer.Option(
    "--output", metavar="URL", help="An output URL (repeatable).")]
WebhookOpt = Annotated[Text, typer.Option(
    "--webhook", metavar="FILE|-", help="A raw RunningHub webhook body; '-' reads stdin.")]
ReasonOpt = Annotated[Text, typer.Option("--reason", metavar="TEXT", help="Why (kept in the job's history).")]
OlderThanOpt = Annotated[Text, typer.Option(
    "--older-than", metavar="DURATION", show_default=False,
    help="End jobs holding a slot longer than this (90s, 10m, 1h). Default: queue.stale_after.")]
FixOpt = Annotated[bool, typer.Option("--fix", help="Add missing refunds and reset cached balances.")]
PortOpt = Annotated[int, typer.Option("--port", metavar="N", min=0, max=65535, help="0 picks a free port.")]
ApiKeyOpt = Annotated[Text, typer.Option(
    "--api-key", metavar="KEY", show_default=False, help="Refuse other keys (default: accept any).")]


@dataclass(frozen=True)
class Globals:
    config: Path | None
    db: str | None
    json: bool  # `aiqueue --json status` works as well as `aiqueue status --json`
    quiet: bool = False


# `aiqueue --help` lists commands by what an operator comes for, in this order, whichever module
# registered them; a command missing here is listed last under "Other".
PANELS: dict[str, tuple[str, ...]] = {
    "Jobs": ("enqueue", "status", "jobs", "cancel", "finish"),
    "The queue": ("process-next", "cleanup", "pause", "resume"),
    "Credits": ("credits", "refund-audit"),
    "Monitoring": ("doctor", "metrics"),
    "Servers": ("webhook", "fake-runninghub"),
    "Set-up and tools": ("config", "db", "demo", "bench"),
}


class _UsageArgument(TyperArgument):
    """An argument shown in the usage line as its metavar (`JOB_ID`, optional `[JOB_ID]`), without
    the braces typer puts around a required one (`{JOB_ID}`, which reads like a set of choices)."""

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")


def plain_usage(command: Any) -> None:
    """Help reads as the command line is typed, over the whole command tree: a flag shows no
    value (typer 0.29 writes every bool option, --help too, as `--json <bool>`, as if it took
    one), and an argument shows its metavar in the usage line. Done once, as the app is built."""
    help_option = command.get_help_option(typer.Context(command))  # created once, then cached
    _plain_params([*command.params, help_option])
    for sub in getattr(command, "commands", {}).values():
        plain_usage(sub)


def _plain_params(params: list[Any]) -> list[Any]:
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # the help's type column then stays empty
        if type(param) is TyperArgument:
            param.__class__ = _UsageArgument  # only the usage line's rendering differs
    return params


class CommandGroup(TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plain_usage(self)

    def get_params(self, ctx: Any) -> list[Any]:
        # typer adds --install-completion and --show-completion to the root after building it.
        return _plain_params(super().get_params(ctx))

    def list_commands(self, ctx: Any) -> list[str]:
        order = [name for names in PANELS.values() for name in names]
        for panel, names in PANELS.items():
            for name in names:
                if name in self.commands:
                    self.commands[name].rich_help_panel = panel  # type: ignore[attr-defined]
        for name, command in self.commands.items():
            if name not in order:
                command.rich_help_panel = "Other"  # type: ignore[attr-defined]
            if not command.short_help and command.help:  # the first paragraph, on one line
                command.short_help = " ".join(inspect.cleandoc(command.help).split("\n\n")[0].split())
        return sorted(self.commands, key=lambda name: order.index(name) if name in order else len(order))


app = typer.Typer(
    cls=CommandGroup,
    name="aiqueue",
    help="Run a queue of paid AI jobs on RunningHub: global slots, one FIFO, a credit ledger.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
credits_app = typer.Typer(help="Credits: grants, balances and the ledger.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(credits_app, name="credits")
config_app = typer.Typer(help="The config file: write a starter, show the effective values, check.",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")

STARTER_CONFIG: dict[str, Any] = {
    "queue": {"max_concurrent": 3, "stale_after": "10m"},
    "provider": {"name": "runninghub", "base_url": "https://www.runninghub.ai", "timeout": 10},
    "tools": {
        "upscale_image": {
            "webapp_id": "1990000000000000001",
            "cost": 5,
            "inputs": {
                "image": {"node_id": "12", "field": "image"},
                "scale": {"node_id": "15", "field": "value", "default": "2"},
            },
        },
    },
}


@app.callback()
def root(
    ctx: typer.Context, config: ConfigOpt = None, db: DbOpt = None, debug: DebugOpt = False,
    as_json: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    # Settings load lazily in _manager(): `aiqueue enqueue --help` must not need a valid config.
    # --debug and --json are also read by main() from argv, as errors may come before this runs.
    ctx.obj = Globals(config=config, db=db, json=as_json, quiet=quiet)


def options_of(ctx: typer.Context) -> Globals:
    options = ctx.find_object(Globals)
    assert options is not None
    return options


def manager_of(ctx: typer.Context, *, long_lived: bool = False) -> QueueManager:
    options = options_of(ctx)
    return ctx.with_resource(wiring.managed(options.config, options.db, long_lived=long_lived))


def show(ctx: typer.Context, as_json: bool, result: render.Result, table: Callable[[Any, Any], None]) -> None:
    options = options_of(ctx)
    if not (options.quiet and not worth_saying(result)):
        render.show(as_json or options.json, result, table)
    # Every command that frees or fills slots says so when the fill stopped for every job (a
    # rejected API key, a tool missing from the config): the jobs stay queued in their places.
    process = result if isinstance(result, ProcessResult) else getattr(result, "process", None)
    if process is not None and process.halted:
        render.note(f"warning: the queue is halted, jobs stay queued: {process.halted}")
        if isinstance(result, ProcessResult):  # process-next's whole point was the fill
            raise typer.Exit(ProviderError.exit_code)
    elif process is not None and process.requeued:
        # RunningHub unreachable or busy: the jobs are queued (that is the result, exit 0), but
        # nothing started, which only `status` would otherwise tell. Said under --quiet too.
        render.note(requeued_warning(process.requeued))


def requeued_warning(jobs: list[Any]) -> str:
    """One line for jobs a fill put back in their places because RunningHub was not reached or
    busy: which jobs, why (the provider's answer, kept on the job), and what retries."""
    first = jobs[0]
    reason = (first.error or "no answer").removeprefix("not started yet: ")
    if len(jobs) == 1:
        where = f"job {first.id} stays queued at position {first.position}"
    else:
        where = f"jobs {', '.join(str(job.id) for job in jobs)} stay queued in their places"
    return f"warning: RunningHub did not start a job ({reason}): {where}; `aiqueue process-next` retries"


def worth_saying(result: Any) -> bool:
    """Whether --quiet still prints this result: it changed something, or reports a problem.
    Reads (status, balances, listings) say nothing under --quiet; their exit code still tells."""
    if getattr(result, "ok", True) is False:  # an audit with problems, a failing health check
        return True
    if isinstance(result, ProcessResult):
        return bool(result.started or result.requeued or result.failed or result.unknown or result.expired
                    or result.finished or result.halted)
    lists = ("expired", "completed", "failed", "stale", "problems", "fixed", "would_fix")
    if any(getattr(result, name, None) for name in lists):
        return True
    if getattr(result, "changed", False) or getattr(result, "created", False):
        return True
    process = getattr(result, "process", None)
    if process is not None and worth_saying(process):
        return True
    return type(result).__name__ in _ALWAYS_SAID


# Results that are a change by their nature: a new job, a grant, a written file.
_ALWAYS_SAID = {"EnqueueResult", "GrantResult", "Written"}


@contextmanager
def progress(what: str, *, total_hint: int = 0) -> Iterator[Callable[[int, int], None]]:
    """A progress callback `(done, total)` for a long operation: a rich bar on stderr when stderr
    is a terminal, and a no-op otherwise (cron, pipes, tests), so output stays machine-clean."""
    if not sys.stderr.isatty():
        yield _no_progress
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    task = bar.add_task(what, total=total_hint or None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total or None)

    with bar:
        yield update


def _no_progress(done: int, total: int) -> None:
    return None

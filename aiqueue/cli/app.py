"""The Typer app's core commands (parse, call one QueueManager method, render) and main(), the one
place errors become exit codes. Options, the app object and the shared helpers are in common.py;
more commands live in cmd_*.py, imported at the bottom so that they register.

Kept cheap to import: the manager, the store (SQLAlchemy) and the provider (httpx) are reached
through `wiring` inside the commands, and rich only when a table is drawn, so `--help` and
argument errors stay fast.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer
from typer.main import get_command

from aiqueue.cli import params, render, wiring
from aiqueue.cli.common import (
    STARTER_CONFIG, AmountArg, ApiKeyOpt, ErrorOpt, FinishStatusOpt, FixOpt, InputOpt, JobFilterOpt,
    JobIdArg, JsonOpt, LimitOpt, NoStartOpt, NoteOpt, OlderThanOpt, OptionalJobIdArg, OutputOpt,
    PortOpt, ReasonOpt, ToolOpt, UserArg, UserFilterOpt, UserOpt, WebhookOpt, app, config_app,
    credits_app, manager_of, options_of, progress, show,
)
from aiqueue.errors import AiqueueError, AuditProblemsError, UsageError

PIPE_CLOSED_EXIT = 128 + signal.SIGPIPE  # 141: stdout's reader went away (`aiqueue jobs | head`)

# --- commands -----------------------------------------------------------------------------------


# ignore_unknown_options: "-5" reaches AMOUNT (and its clear message) instead of "No such option".
@credits_app.command("grant", context_settings={"ignore_unknown_options": True})
def credits_grant(
    ctx: typer.Context, user: UserArg, amount: AmountArg, note: NoteOpt = None, as_json: JsonOpt = False
) -> None:
    """Add credits to a user's balance.

    Example: aiqueue credits grant alice 100 --note "first top-up"
    """
    credits = params.positive_int(amount, "AMOUNT")
    show(ctx, as_json, manager_of(ctx).grant(user, credits, note), render.render_grant)


@credits_app.command("balance")
def credits_balance(ctx: typer.Context, user: UserArg, as_json: JsonOpt = False) -> None:
    """A user's balance.

    Example: aiqueue credits balance alice --json
    """
    show(ctx, as_json, manager_of(ctx).balance(user), render.render_balance)


@credits_app.command("ledger")
def credits_ledger(
    ctx: typer.Context, user: UserFilterOpt = None, job: JobFilterOpt = None, limit: LimitOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ledger entries (grants, charges, refunds), oldest first.

    Example: aiqueue credits ledger --user alice --limit 20
    """
    entries = manager_of(ctx).ledger(user=user, job_id=job, limit=limit)
    show(ctx, as_json, render.Entries(entries), render.render_entries)


@app.command()
def enqueue(
    ctx: typer.Context, user: UserOpt, tool: ToolOpt, inputs: InputOpt = None, no_start: NoStartOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Charge the tool's cost and queue a job; start it at once when a slot is free.

    Example: aiqueue enqueue --user alice --tool upscale_image --input image=api/cat.png --input scale=4
    """
    given = params.inputs(inputs)
    show(ctx, as_json, manager_of(ctx).enqueue(user, tool, given, start=not no_start), render.render_enqueue)


@app.command()
def pause(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Stop submitting jobs (stored in the database, for every machine); queued jobs keep their
    places and running ones finish normally.

    Example: aiqueue pause; aiqueue status; aiqueue resume
    """
    show(ctx, as_json, manager_of(ctx).pause(), render.render_pause)


@app.command()
def resume(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Submit again, filling the free slots at once.

    Example: aiqueue resume --json
    """
    show(ctx, as_json, manager_of(ctx).resume(), render.render_pause)


@config_app.command("init")
def config_init(
    ctx: typer.Context,
    path: Annotated[Optional[Path], typer.Argument(metavar="PATH", show_default=False,
                                                   help="Where to write (default: --config, else ./aiqueue.toml).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a starter config (mode 0600); refuses to overwrite without --force.

    Example: aiqueue config init ./aiqueue.toml && aiqueue config check
    """
    from aiqueue.settings import save_config

    target = save_config(path or options_of(ctx).config or Path("aiqueue.toml"), STARTER_CONFIG, force=force)
    show(ctx, as_json, render.Written(str(target)), render.render_written)


@config_app.command("show")
def configshow(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The effective settings, secrets masked, and where each value came from.

    Example: aiqueue config show --json
    """
    from aiqueue.settings import load_settings, redacted

    options = options_of(ctx)
    show(ctx, as_json, render.ConfigView(redacted(load_settings(options.config, options.db))), render.render_config)


@config_app.command("check")
def config_check(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Validate the config and its tool mappings; exit 3 naming the first bad key.

    Example: aiqueue --config /etc/aiqueue.toml config check
    """
    from aiqueue.settings import load_settings, redacted

    options = options_of(ctx)
    view = redacted(load_settings(options.config, options.db))
    show(ctx, as_json, render.ConfigView(view, checked=True), render.render_config)


@app.command("process-next")
def process_next(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """End stale jobs, then fill every free slot in FIFO order.

    Example: aiqueue process-next --json
    """
    show(ctx, as_json, manager_of(ctx).process_next(), render.render_process)


@app.command()
def finish(
    ctx: typer.Context, job_id: OptionalJobIdArg = None, outcome: FinishStatusOpt = None, error: ErrorOpt = None,
    outputs: OutputOpt = None, webhook: WebhookOpt = None, as_json: JsonOpt = False,
) -> None:
    """End a started job by hand (JOB_ID --status), or apply a RunningHub webhook body (--webhook).

    Example: aiqueue finish --webhook body.json; aiqueue finish 42 --status failed --error "node 12: out of memory"
    """
    params.finish_mode(job_id, outcome, error, outputs, webhook)
    if webhook is not None:
        from aiqueue.webhooks import MAX_BODY_BYTES

        result = manager_of(ctx).finish_webhook(params.webhook_body(webhook, MAX_BODY_BYTES))
    else:
        assert job_id is not None and outcome is not None
        result = manager_of(ctx).finish(job_id, outcome.value, error=error, outputs=outputs)
    show(ctx, as_json, result, render.render_finish)


@app.command()
def cancel(
    ctx: typer.Context, job_id: JobIdArg, reason: ReasonOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="End it here even when RunningHub did not confirm the cancel or never answered "
        "the submit (refunded; a task there may still run and be billed).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Cancel a queued, starting or running job (at the provider too) and refund it.

    A running job whose cancel RunningHub does not confirm keeps its slot (exit 7), unless its
    task had already ended there: then it ends as the task did.

    Example: aiqueue cancel 42 --reason "asked by the user"
    """
    show(ctx, as_json, manager_of(ctx).cancel(job_id, reason, force=force), render.render_finish)


@app.command()
def cleanup(
    ctx: typer.Context, older_than: OlderThanOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list the stale jobs; change nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """End jobs that held their slot too long (asking the provider first), then start the next.

    Example: aiqueue cleanup --older-than 15m --dry-run
    """
    limit = params.duration(older_than, "--older-than")
    with progress("cleanup") as tick:
        result = manager_of(ctx).cleanup(limit, dry_run=dry_run, progress=tick)
    show(ctx, as_json, result, render.render_cleanup)


@app.command("refund-audit")
def refund_audit(
    ctx: typer.Context, fix: FixOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --fix: list what it would repair; change nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check jobs against the ledger; exit 10 unless it is clean (after --fix).

    Example: aiqueue refund-audit --fix --dry-run; aiqueue -q refund-audit --fix  (cron)
    """
    if dry_run and not fix:
        raise UsageError("--dry-run goes with --fix (the audit alone never changes anything)")
    with progress("refund audit") as tick:
        result = manager_of(ctx).refund_audit(fix=fix, dry_run=dry_run, progress=tick)
    show(ctx, as_json, result, render.render_audit)
    if not result.ok:
        raise typer.Exit(AuditProblemsError.exit_code)


@app.command("fake-runninghub")
def fake_runninghub(
    ctx: typer.Context, port: PortOpt = 0, api_key: ApiKeyOpt = None, as_json: JsonOpt = False
) -> None:
    """Serve a fake RunningHub on 127.0.0.1 until Ctrl-C (for tests, the demo, rehearsals).

    Example: aiqueue fake-runninghub --port 8765
    """
    from aiqueue.provider.fake_server import serve_forever_cli

    try:
        hub = serve_forever_cli(port, api_key)
    except OSError as exc:
        raise UsageError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", port=port) from None
    # SIGTERM (kill, a supervisor) ends it like Ctrl-C does: cleanly, exit 0. SIGINT too, set
    # explicitly: a shell starting us in the background without job control ignores it, and
    # Python then never turns it into KeyboardInterrupt.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        show(ctx, as_json, render.ServerInfo(hub.base_url), render.render_server)
        hub.wait()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how an operator ends a rehearsal
    finally:
        hub.stop()


@app.command()
def demo(
    ctx: typer.Context,
    keep: Annotated[Optional[Path], typer.Option(
        "--keep", metavar="DIR", help="Keep the demo's database and config in DIR.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a realistic session on a fresh SQLite file against a fake RunningHub on 127.0.0.1.

    Example: aiqueue demo --keep ./demo-run
    """
    from aiqueue.cli.demo import run_demo

    as_json = as_json or options_of(ctx).json
    summary = run_demo(keep, as_json)
    if as_json:
        render.write_json(summary)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# Command modules register on `app` when imported.
from aiqueue.cli import cmd_bench, cmd_db, cmd_health, cmd_status, cmd_webhook  # noqa: E402, F401

# --- the one catch point ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point: run the app, turn every error into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Read from argv, not from the parsed options: errors can happen before parsing finishes.
    options = args[: args.index("--")] if "--" in args else args
    as_json, debug = "--json" in options, "--debug" in options
    try:
        code = get_command(app).main(args=args, prog_name="aiqueue", standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into a silent Exit(130); no command exits 130 itself
            raise KeyboardInterrupt
        raise SystemExit(code if isinstance(code, int) else 0)
    except AiqueueError as err:
        _fail(err, as_json)
    except (KeyboardInterrupt, typer.Abort):
        _fail(_with_code(AiqueueError("interrupted"), 130), as_json)
    except BrokenPipeError:
        _pipe_closed()
    except SystemExit as exc:
        # Typer's main() turns a broken pipe into a bare exit 1: tell it apart by its cause.
        if isinstance(exc.__context__, OSError) and exc.__context__.errno == errno.EPIPE:
            _pipe_closed()
        raise
    except Exception as exc:  # noqa: BLE001 - the catch point: one line, traceback only on request
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `aiqueue` or `aiqueue credits`
            _print_help(exc)
        if _is_click_error(exc):  # bad option, missing argument, bad value...
            _fail(_usage(exc), as_json)
        if debug:
            sys.stderr.write(_scrub(traceback.format_exc()))
        message = f"unexpected {type(exc).__name__}: {_first_line(exc)}"
        if not debug:
            message += " (run with --debug for the traceback)"
        _fail(AiqueueError(_scrub(message)), as_json)


def _pipe_closed() -> NoReturn:
    """The reader (e.g. `| head`) went away: nothing left to say to anyone. Exit silently with
    what a shell reports for a command killed by SIGPIPE (128 + 13), as `cat | head` does."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout already closed, or not a real file (tests)
        pass
    raise SystemExit(PIPE_CLOSED_EXIT) from None


def _print_help(exc: Any) -> NoReturn:
    # Help was asked for, not an error: typer's rich help is already on stdout; plain help is not.
    text = str(exc.format_message())
    if text.strip():
        sys.stdout.write(text.rstrip("\n") + "\n")
    raise SystemExit(0)


def _fail(err: AiqueueError, as_json: bool) -> NoReturn:
    sys.stdout.flush()
    if as_json:
        render.write_json({"error": err.to_dict()}, err=True)
    else:
        render.note("error: " + " ".join(err.message.split("\n")))  # one line, always
    raise SystemExit(err.exit_code)


def _with_code(err: AiqueueError, code: int) -> AiqueueError:
    err.exit_code = code  # on the instance, so to_dict() reports the code the process exits with
    return err


def _is_click_error(exc: BaseException) -> bool:
    # By name: typer vendors click in recent versions and uses the real one in older ones.
    return any(cls.__name__ == "ClickException" for cls in type(exc).__mro__)


def _usage(exc: Any) -> AiqueueError:
    message = str(exc.format_message())
    ctx: Any = getattr(exc, "ctx", None)
    if ctx is not None:
        message = f"{message.rstrip('.')}. See '{ctx.command_path} --help'."
    code = getattr(exc, "exit_code", 1)
    if code == 2 and ctx is not None:  # doctor: 2 is CRITICAL, its usage errors are 3 (UNKNOWN)
        code = getattr(ctx.command, "usage_exit_code", 2)
        if code != 2:
            return _with_code(UsageError(message), code)
    return UsageError(message) if code == 2 else _with_code(AiqueueError(message), code)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


_QUERY_PASSWORD = re.compile(r"(?P<name>password|passwd|api_?key|apikey|token)=[^&\s'\"]+", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")


def _scrub(text: str) -> str:
    """Unexpected messages come from libraries that may echo a DSN or the API key: mask both."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    text = _QUERY_PASSWORD.sub(r"\g<name>=***", text)
    secrets = set(wiring.SECRETS)
    secrets.add(os.environ.get("RUNNINGHUB_API_KEY", "").strip())
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text

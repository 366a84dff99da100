"""Commands that look at the queue: status (slots, queue, one job, unmatched webhooks)."""

from __future__ import annotations

from typing import Annotated

import typer

from aiqueue.cli import render
from aiqueue.cli.common import JsonOpt, LimitOpt, OptionalJobIdArg, app, manager_of, show
from aiqueue.errors import UsageError

UnmatchedOpt = Annotated[bool, typer.Option(
    "--unmatched", help="List kept webhooks whose task no job has (yet).")]


@app.command()
def status(
    ctx: typer.Context, job_id: OptionalJobIdArg = None, limit: LimitOpt = None,
    unmatched: UnmatchedOpt = False, as_json: JsonOpt = False,
) -> None:
    """The running slots and the queue; or, with JOB_ID, one job with its events and ledger.

    Example: aiqueue status --limit 20; aiqueue status 42 --json; aiqueue status --unmatched
    """
    if unmatched:
        if job_id is not None or limit is not None:
            raise UsageError("--unmatched lists webhooks; it goes without JOB_ID and --limit")
        result = render.Unmatched(manager_of(ctx).unmatched_webhooks())
        show(ctx, as_json, result, render.render_unmatched)
    elif job_id is None:
        show(ctx, as_json, manager_of(ctx).status(limit), render.render_status)
    elif limit is not None:
        raise UsageError("--limit lists the queue; it does not go with JOB_ID")
    else:
        show(ctx, as_json, manager_of(ctx).job_detail(job_id), render.render_job_detail)

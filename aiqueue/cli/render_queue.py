"""Tables for the queue views: `status`, `status --user`, `status --watch` and `jobs`.

Each view is built as a list of rich renderables (so `--watch` redraws the same thing in a Live)
and fits the console's width: one line per job at 80 columns, with long user ids and tool names
cut with an ellipsis rather than wrapped, and the least needed columns dropped on narrower
terminals (the provider task id first, then the waiting time). Ids, numbers, statuses and times
are never cut (render.keep_whole): on a very narrow terminal the line wraps instead. JSON never comes through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiqueue.cli.render import (
    DASH,
    L,
    R,
    _plain,
    _since,
    _text,
    _when,
    keep_whole,
    print_whole,
)
from aiqueue.clock import SystemClock, format_duration

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table

    from aiqueue.domain import Job, QueueStatus, UserStatus

E = "ellipsis"  # one line, takes the spare width, cut with "…" when too long
NARROW = 70  # below this width the provider task column goes
TINY = 56  # below this the waiting time goes too


def _table(title: str | None, *columns: tuple[str, str]) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for header, kind in columns:
        # Only E columns may be narrowed to fit (their cells are one-line texts that end in an
        # ellipsis); ids, statuses and times keep their width (keep_whole, once the rows are in).
        table.add_column(header, justify="right" if kind == R else "left", no_wrap=kind != E,
                         overflow="ellipsis" if kind == E else "fold", min_width=4 if kind == E else None)
    return table


def _one_line(text: str) -> Any:
    from rich.text import Text

    return Text(_plain(text).replace("\n", " "), no_wrap=True, overflow="ellipsis")


def _starts_in(start: datetime | None, now: datetime, paused: bool) -> str:
    if paused:
        return "paused"
    if start is None:
        return "?"
    if (start - now).total_seconds() < 1:
        return "next"
    return "~" + format_duration(start - now)


def status_view(status: QueueStatus, width: int, now: datetime | None = None) -> list[RenderableType]:
    now = status.now or now or SystemClock().now()
    views: list[RenderableType] = [_one_line(_summary(status, now)), _one_line(_counts_line(status))]

    columns = [("slot", R), ("job", R), ("user", E), ("tool", E)]
    if width >= NARROW:
        columns.append(("provider task", L))
    columns.append(("running for", R))
    paused = " - queue paused" if status.paused else ""
    slots = _table(f"Running slots: {len(status.running)}/{status.limit} in use{paused}", *columns)
    for job in status.running:
        cells = [_text(job.slot), _text(job.id), _one_line(job.user), _one_line(job.tool)]
        if width >= NARROW:
            cells.append(_text(job.provider_task_id or f"({job.status})"))
        cells.append(_text(_since(job.started_at, now)))
        slots.add_row(*cells)
    if not status.running:
        slots.caption = "no job holds a slot"
    views.append(keep_whole(slots))

    columns = [("position", R), ("job", R), ("user", E), ("tool", E)]
    if width >= TINY:
        columns.append(("waiting for", R))
    columns.append(("est. start", R))
    queue = _table(f"Queue: {status.queued_total} waiting", *columns)
    for job in status.queued:
        cells = [_text(job.position), _text(job.id), _one_line(job.user), _one_line(job.tool)]
        if width >= TINY:
            cells.append(_text(_since(job.created_at, now)))
        cells.append(_text(_starts_in(status.starts.get(job.id), now, status.paused)))
        queue.add_row(*cells)
    more = status.queued_total - len(status.queued)
    if more > 0:
        queue.caption = f"… and {more} more"
    elif not status.queued:
        queue.caption = "nothing is queued"
    elif not status.paused and any(status.starts.get(j.id) is None for j in status.queued):
        queue.caption = "? = no completed run yet to estimate from"
    views.append(keep_whole(queue))
    return views


def _summary(status: QueueStatus, now: datetime) -> str:
    state = "PAUSED (nothing new starts)" if status.paused else "running"
    oldest = ""
    if status.oldest_queued_at is not None:
        oldest = f", oldest waiting {format_duration(now - status.oldest_queued_at)}"
    return (f"Queue {state}: {len(status.running)}/{status.limit} slots in use, "
            f"{status.queued_total} queued{oldest}")


def _counts_line(status: QueueStatus) -> str:
    window = format_duration_window(status.window_seconds)
    finished = ", ".join(f"{status.counts.get(s, 0)} {s}" for s in ("completed", "failed", "cancelled"))
    return f"Finished in the last {window}: {finished}"


def format_duration_window(seconds: float) -> str:
    from datetime import timedelta

    days, rest = divmod(int(seconds), 86400)
    if days and rest == 0:
        return f"{days}d" if days > 1 else "24h"
    return format_duration(timedelta(seconds=seconds))


def render_status(console: Console, status: QueueStatus, now: datetime | None = None) -> None:
    for view in status_view(status, console.width, now):
        print_whole(console, view)


# --- one user -----------------------------------------------------------------------------------


def user_view(result: UserStatus, width: int) -> list[RenderableType]:
    now = result.now
    views: list[RenderableType] = [
        _one_line(f"user {result.user}: balance {result.balance} credits"
                  + (" - queue paused" if result.paused else ""))]
    job = result.active
    if job is None:
        views.append(_one_line("no active job"))
    elif job.status == "queued":
        if result.paused:
            eta = "the queue is paused: it starts after a resume"
        elif result.estimated_start is None:
            eta = "start time unknown (no completed run to estimate from)"
        else:
            approx = ", approximate" if result.approximate else ""
            eta = f"estimated start {_starts_in(result.estimated_start, now, False)} " \
                  f"({_when(result.estimated_start)} UTC{approx})"
        views.append(_one_line(f"active job {job.id} ({job.tool}): queued at position {job.position}, "
                               f"waiting {_since(job.created_at, now)}"))
        views.append(_one_line(eta))
    else:
        where = f"provider task {job.provider_task_id}" if job.provider_task_id else "being submitted"
        views.append(_one_line(f"active job {job.id} ({job.tool}): {job.status} in slot {job.slot}, {where}, "
                               f"for {_since(job.started_at, now)}"))
    views.append(jobs_table(result.recent, width, title=f"Latest jobs of {result.user}", empty="no jobs yet"))
    return views


def render_user_status(console: Console, result: UserStatus) -> None:
    for view in user_view(result, console.width):
        print_whole(console, view)


# --- job listings -------------------------------------------------------------------------------


def jobs_table(jobs: Sequence[Job], width: int, title: str | None = "Jobs, newest first",
               empty: str = "no job matches") -> Table:
    columns = [("job", R), ("user", E), ("tool", E), ("status", L)]
    wide = width >= 100  # the full date; below, month-day hours:minutes leaves room for the detail
    if width >= TINY:
        columns.append(("created (UTC)", L))
    columns.append(("detail", E))
    table = _table(title, *columns)
    for job in jobs:
        cells = [_text(job.id), _one_line(job.user), _one_line(job.tool), _text(job.status)]
        if width >= TINY:
            cells.append(_text(_when(job.created_at) if wide else job.created_at.strftime("%m-%d %H:%M")))
        cells.append(_one_line(_job_detail(job)))
        table.add_row(*cells)
    if not jobs:
        table.caption = empty
    return keep_whole(table)


def _job_detail(job: Job) -> str:
    if job.status == "queued":
        return f"position {job.position}" + (f"; {job.error}" if job.error else "")
    if job.error:
        return job.error
    if job.outputs:
        return " ".join(job.outputs)
    if job.provider_task_id:
        return f"task {job.provider_task_id}"
    return DASH


def render_job_list(console: Console, jobs: Sequence[Job]) -> None:
    print_whole(console, jobs_table(jobs, console.width))

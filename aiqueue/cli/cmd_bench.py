"""Commands: bench (QueueManager lifecycles against the raw-SQL limit; the scale measurement)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from aiqueue.cli import render
from aiqueue.cli.common import JsonOpt, app, options_of, show

if TYPE_CHECKING:
    from rich.console import Console

    from aiqueue.bench import BenchResult

JobsOpt = Annotated[int, typer.Option("--jobs", "-n", metavar="N", min=1, max=10_000_000,
                                      help="Lifecycles per side.")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-k", metavar="K", min=1, max=64,
                                         help="Parallel worker processes per side.")]
FailRateOpt = Annotated[float, typer.Option("--fail-rate", metavar="SHARE", min=0.0, max=1.0,
                                            help="Share of jobs that fail (and are refunded).")]
BenchLimitOpt = Annotated[Optional[int], typer.Option(
    "--limit", metavar="N", min=1, max=1000, show_default=False,
    help="Global limit for both sides. Default: max(3, K), so workers never queue behind it.")]
InPlaceOpt = Annotated[bool, typer.Option(
    "--in-place", help="Run in the configured database itself (not a fresh schema or file).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="With --in-place: run even if the database holds jobs.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", metavar="N", show_default=False,
                                                help="Seed for the failures (default: random).")]
ScaleOpt = Annotated[bool, typer.Option(
    "--scale", help="Instead: time the commands on a nearly empty database and on a big one.")]
FinishedOpt = Annotated[int, typer.Option("--finished", metavar="N", min=0, max=100_000_000,
                                          help="With --scale: finished jobs in the big database.")]
QueuedOpt = Annotated[int, typer.Option("--queued", metavar="N", min=1, max=10_000_000,
                                        help="With --scale: queued jobs (one user each) in the big database.")]


@app.command()
def bench(
    ctx: typer.Context, jobs: JobsOpt = 2000, workers: WorkersOpt = 1, fail_rate: FailRateOpt = 0.1,
    limit: BenchLimitOpt = None, in_place: InPlaceOpt = False, force: ForceOpt = False, seed: SeedOpt = None,
    scale: ScaleOpt = False, finished: FinishedOpt = 1_000_000, queued: QueuedOpt = 100_000,
    as_json: JsonOpt = False,
) -> None:
    """Benchmark whole job lifecycles through the queue against hand-written SQL on the same
    database, in fresh schemas (or temporary SQLite files) removed afterwards; print both
    throughputs, their ratio and p50/p95/p99 per operation. With --scale, time the commands on
    a nearly empty database against one with --finished and --queued jobs.

    Example: aiqueue --db postgresql://postgres@127.0.0.1/test bench --jobs 5000 --workers 4
    """
    from aiqueue.settings import load_settings

    options = options_of(ctx)
    url = load_settings(options.config, options.db).database_url
    quiet = as_json or options.json
    if scale:
        from aiqueue.bench.scale import run_scale

        with _progress(quiet) as progress:
            result: Any = run_scale(url, finished=finished, queued=queued, progress=progress)
        show(ctx, as_json, result, _render_scale)
        return
    from aiqueue.bench import run_bench

    with _progress(quiet) as progress:
        result = run_bench(url, jobs=jobs, workers=workers, fail_rate=fail_rate, limit=limit,
                           in_place=in_place, force=force, progress=progress, seed=seed)
    show(ctx, as_json, result, _render_bench)


@contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar on stderr, only when stderr is a terminal."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    bars: dict[str, Any] = {}
    with Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as bar:

        def update(what: str, done: int, total: int) -> None:
            if what not in bars:
                bars[what] = bar.add_task(what, total=total)
            bar.update(bars[what], completed=done, total=total)

        yield update


def _render_bench(console: Console, result: BenchResult) -> None:
    from rich.table import Table

    head = (f"{result.backend}, {result.workers} worker(s), {result.jobs} jobs per side, limit {result.limit}, "
            f"{result.fail_rate:.0%} failing ({result.where})")
    table = Table(title=head)
    for name in ("side", "jobs/s", "seconds", "enqueue p50/p95/p99 ms", "claim+submit p50/p95/p99 ms",
                 "finish p50/p95/p99 ms"):
        table.add_column(name, justify="left" if name == "side" else "right")
    for label, side in (("QueueManager", result.manager), ("raw SQL", result.raw_sql)):
        ops = [side.operations[op] for op in ("enqueue", "claim_submit", "finish")]
        table.add_row(label, f"{side.jobs_per_second:,.0f}", f"{side.seconds:.2f}",
                      *(f"{o.p50_ms:.2f} / {o.p95_ms:.2f} / {o.p99_ms:.2f}" for o in ops))
    console.print(table)
    console.print(f"QueueManager / raw SQL = {result.ratio:.2f}; the manager spent "
                  f"{result.manager.provider_ms_per_job:.2f} ms per job inside the provider's submit (HTTP); "
                  f"without it: {result.ratio_without_provider:.2f}")
    if result.manager.left_active or result.raw_sql.left_active:
        render.note(f"warning: jobs left active: manager {result.manager.left_active}, "
                    f"raw SQL {result.raw_sql.left_active}")


def _render_scale(console: Console, result: Any) -> None:
    from rich.table import Table

    table = Table(title=f"{result.backend}: nearly empty vs {result.big_jobs:,} jobs (median ms)")
    for name in ("operation", "empty ms", "big ms", "ratio"):
        table.add_column(name, justify="left" if name == "operation" else "right")
    for op in result.operations:
        table.add_row(op.name, f"{op.empty_ms:.2f}", f"{op.big_ms:.2f}", f"{op.ratio:.2f}")
    console.print(table)
    audit = result.audit
    console.print(f"refund-audit over {audit.rows:,} rows: {audit.rows_per_second:,.0f} rows/s, "
                  f"{audit.seconds:.1f} s, peak RSS {audit.peak_rss_mb:.0f} MB, ok={audit.ok}")

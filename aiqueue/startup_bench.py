"""Command start-up benchmark: each command's wall time against the time to import what it needs.

    python -m aiqueue.startup_bench [--rounds 15] [--db URL]

For each command it measures, in the same run and interleaved round by round (so the machine's
drift hits every line alike), the median wall time of:
- `python -c pass` and `python -c "import typer"` (the floor of any Python CLI),
- `python -c "import typer, sqlmodel, <dialect>"`: what a command that reads or writes the
  database truly needs (the tables are SQLModel classes; SQLAlchemy's sqlite dialect and the
  stdlib sqlite3, or its psycopg dialect and psycopg itself), plus httpx for
  `finish`, which starts the next queued job at RunningHub,
- the real console script: `aiqueue status --json`, `aiqueue enqueue --no-start`,
  `aiqueue finish --webhook FILE`, `aiqueue --help`.
It prints each median and the ratio of each command to its needs line (target <= 1.3x).

The database is a temporary SQLite file (or a fresh schema in --db's PostgreSQL database, dropped
at the end) with one job per round waiting for its webhook, so every `finish` does real work.
Run it from a regular (non-editable) install, or after `python -m compileall`, since
PYTHONDONTWRITEBYTECODE makes an editable install recompile on every start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any



def _console_script() -> str:
    found = shutil.which("aiqueue", path=str(Path(sys.executable).parent)) or shutil.which("aiqueue")
    if found is None:
        raise SystemExit("error: the aiqueue console script is not installed next to this Python")
    return found


def _prepare(workdir: Path, db_url: str | None, rounds: int, base_url: str) -> tuple[Path, str, list[Path], Any]:
    """Config, schema, funded users, and one running job (with its webhook body) per round."""
    from aiqueue.cli.demo import DEMO_TOOLS
    from aiqueue.cli.wiring import LazyRunningHub, manager_for
    from aiqueue.settings import load_settings

    drop = None
    if db_url is None:
        db_url = f"sqlite:///{workdir / 'bench.db'}"
    else:
        from sqlalchemy import create_engine, text

        schema = f"aiqueue_startup_{uuid.uuid4().hex[:10]}"
        admin = create_engine(db_url)
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        sep = "&" if "?" in db_url else "?"
        db_url = f"{db_url}{sep}options=-csearch_path%3D{schema}"

        def drop() -> None:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()

    config = workdir / "aiqueue.toml"
    config.write_text(
        f'[database]\nurl = "{db_url}"\n[queue]\nmax_concurrent = {rounds + 5}\n'
        f'[provider]\nbase_url = "{base_url}"\n' + DEMO_TOOLS,
        encoding="utf-8",
    )
    os.environ["RUNNINGHUB_API_KEY"] = "startup-bench-key-0123456789abcdef"
    settings = load_settings(config)
    provider = LazyRunningHub(settings)
    manager = manager_for(settings, provider)
    manager.init_db()
    webhooks = []
    for i in range(rounds):
        manager.grant(f"runner{i}", 10)
        manager.grant(f"queuer{i}", 10)
        job = manager.enqueue(f"runner{i}", "upscale_image", {"image": f"in/{i}.png"}).job
        webhooks.append(job)
    provider.close()
    manager.store.dispose()
    return config, db_url, webhooks, drop


def run(rounds: int, db_url: str | None) -> dict[str, Any]:
    from aiqueue.provider.fake_server import FakeRunningHub

    script = _console_script()
    py = sys.executable
    # SQLAlchemy imports the driver itself only when it first connects: name it too.
    dialect = ("sqlalchemy.dialects.sqlite, sqlite3" if db_url is None
               else "sqlalchemy.dialects.postgresql.psycopg, psycopg")
    needs_db = f"import typer, sqlmodel, {dialect}"
    needs_http = f"{needs_db}, httpx"
    workdir = Path(tempfile.mkdtemp(prefix="aiqueue-startup-"))
    hub = FakeRunningHub().start()
    drop = None
    try:
        config, _, jobs, drop = _prepare(workdir, db_url, rounds, hub.base_url)
        bodies = []
        for i, job in enumerate(jobs):
            assert job.provider_task_id is not None  # enqueue started it: running, task id stored
            body = hub.finish_task(job.provider_task_id, success=(i % 2 == 0), deliver=False)
            path = workdir / f"webhook{i}.json"
            path.write_bytes(body)
            bodies.append(path)
        env = {**os.environ, "AIQUEUE_CONFIG": str(config)}
        lines: dict[str, list[str] | None] = {
            "python -c pass": [py, "-c", "pass"],
            "import typer": [py, "-c", "import typer"],
            needs_db: [py, "-c", needs_db],
            needs_http: [py, "-c", needs_http],
            "aiqueue --help": [script, "--help"],
            "aiqueue status --json": [script, "status", "--json"],
            "aiqueue enqueue --no-start": None,  # per round: a fresh user
            "aiqueue finish --webhook": None,  # per round: a running job's webhook; it starts a queued one
        }
        times: dict[str, list[float]] = {name: [] for name in lines}
        for i in range(rounds):
            for name, argv in lines.items():
                if name == "aiqueue enqueue --no-start":
                    argv = [script, "enqueue", "--user", f"queuer{i}", "--tool", "upscale_image",
                            "--input", f"image=q/{i}.png", "--no-start", "--json"]
                elif name == "aiqueue finish --webhook":
                    argv = [script, "finish", "--webhook", str(bodies[i]), "--json"]
                assert argv is not None
                start = time.perf_counter()
                done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                elapsed = time.perf_counter() - start
                if done.returncode != 0:
                    raise SystemExit(f"error: {name} exited {done.returncode}: {done.stderr.decode()[-300:]}")
                times[name].append(elapsed * 1000)
    finally:
        hub.stop()
        if drop is not None:
            drop()
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    needs = {"aiqueue status --json": needs_db, "aiqueue enqueue --no-start": needs_db,
             "aiqueue finish --webhook": needs_http}
    return {
        "backend": "sqlite" if db_url is None else "postgresql",
        "rounds": rounds,
        "median_ms": {name: round(value, 1) for name, value in medians.items()},
        "ratio_to_needs": {
            name: round(medians[name] / medians[line], 2) for name, line in needs.items()
        },
        "needs": needs,
        "help_ratio_to_import_typer": round(medians["aiqueue --help"] / medians["import typer"], 2),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aiqueue.startup_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="runs of each command (median); default 15")
    parser.add_argument("--db", metavar="URL", help="a PostgreSQL URL to run in (a fresh schema); default SQLite")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    result = run(args.rounds, args.db)
    if args.json:
        print(json.dumps(result))
        return
    print(f"command start-up, {result['backend']}, medians of {result['rounds']} interleaved runs")
    for name, value in result["median_ms"].items():
        print(f"  {name:<70} {value:8.1f} ms")
    for name, ratio in result["ratio_to_needs"].items():
        print(f"  {name:<36} {ratio:8.2f}x  {result['needs'][name]}")
    print(f"  {'aiqueue --help':<36} {result['help_ratio_to_import_typer']:8.2f}x  import typer")


if __name__ == "__main__":
    main()

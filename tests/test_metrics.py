"""`aiqueue metrics`: the Prometheus text exposition format (checked by a strict parser written
here, as prometheus_client is not a dependency), values after real jobs ran on SQLite and
PostgreSQL, label escaping, the atomic --output for node_exporter's textfile collector, and query
plans that stay on indexes."""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from aiqueue.cli.cmd_health import prometheus_text
from aiqueue.clock import FrozenClock
from aiqueue.monitor import collect_metrics
from tests.cli_helpers import Run, run_cli
from tests.conftest import API_KEY

IMG = {"image": "api/in.png"}
VIDEO = {"video": "api/in.mp4"}

# --- a strict parser for the text format 0.0.4 ---------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_VALUE = r"(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|NaN|[+-]Inf)"
_HELP = re.compile(rf"# HELP ({_NAME}) ((?:[^\\\n]|\\\\|\\n)*)")
_TYPE = re.compile(rf"# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)")
_SAMPLE_HEAD = re.compile(rf"({_NAME})(\{{)?")
_LABEL_PAIR = re.compile(rf'({_LABEL})="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')
_SAMPLE_TAIL = re.compile(rf" ({_VALUE})(?: (-?\d+))?")

Labels = tuple[tuple[str, str], ...]


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], value)


def parse_exposition(body: str) -> dict[str, dict[str, Any]]:
    """{family: {"type", "help", "samples": {labels: value}}}; raises AssertionError on any line
    that breaks the grammar, a TYPE after its samples, a family split in two, a duplicate."""
    assert body.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, dict[str, Any]] = {}
    closed: set[str] = set()
    current: str | None = None
    for number, line in enumerate(body[:-1].split("\n"), start=1):
        where = f"line {number}: {line!r}"
        if line.startswith("#"):
            match = _HELP.fullmatch(line) or _TYPE.fullmatch(line)
            assert match, where
            name = match.group(1)
            family = families.setdefault(name, {"type": None, "help": None, "samples": {}})
            key = "help" if line.startswith("# HELP") else "type"
            assert family[key] is None, f"second {key.upper()} for {name}: {where}"
            assert not family["samples"], f"{key.upper()} after samples of {name}: {where}"
            assert name not in closed, where
            family[key] = _unescape(match.group(2)) if key == "help" else match.group(2)
        else:
            head = _SAMPLE_HEAD.match(line)
            assert head, where
            name, position, labels = head.group(1), head.end(), []
            if head.group(2):
                while True:
                    pair = _LABEL_PAIR.match(line, position)
                    assert pair, where
                    labels.append((pair.group(1), _unescape(pair.group(2))))
                    position = pair.end()
                    if line.startswith(",", position):
                        position += 1
                        continue
                    assert line.startswith("}", position), where
                    position += 1
                    break
            tail = _SAMPLE_TAIL.fullmatch(line, position)
            assert tail, where
            assert len({k for k, _ in labels}) == len(labels), f"repeated label: {where}"
            family = families.get(name)
            assert family is not None and family["type"] is not None, f"sample before its TYPE: {where}"
            assert name not in closed, f"family {name} split in two: {where}"
            key = tuple(sorted(labels))
            assert key not in family["samples"], f"duplicate sample: {where}"
            family["samples"][key] = float(tail.group(1).replace("Inf", "inf"))
        if current is not None and name != current:
            closed.add(current)
        current = name
    return families


def value(families: dict[str, dict[str, Any]], name: str, **labels: str) -> float:
    return float(families[name]["samples"][tuple(sorted(labels.items()))])


def series(families: dict[str, dict[str, Any]], name: str) -> dict[Labels, float]:
    return dict(families[name]["samples"])


def test_the_parser_is_strict() -> None:
    good = '# HELP a_b x\\\\y\n# TYPE a_b gauge\na_b{l="q\\"\\n\\\\"} 1.5e3\na_b 2\n'
    assert value(parse_exposition(good), "a_b", l='q"\n\\') == 1500.0
    for bad in ("# TYPE a gauge\na 1",                      # no final newline
                "a 1\n",                                    # no TYPE
                "# TYPE a gauge\na{l=\"x\"\"} 1\n",          # unescaped quote
                "# TYPE a gauge\na{l=\"\\t\"} 1\n",          # unknown escape
                "# TYPE a gauge\na{1l=\"x\"} 1\n",           # bad label name
                "# TYPE a gauge\na 1\na 2\n",               # duplicate sample
                "# TYPE a gauge\na one\n",                  # not a number
                "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na 3\n",  # split family
                "# TYPE a gauge\na 1\n# HELP a late\n",     # HELP after samples
                "# TYPE a gaige\na 1\n"):                   # unknown type
        with pytest.raises(AssertionError):
            parse_exposition(bad)


# --- values after real jobs --------------------------------------------------------------------------


FAMILIES = {
    "aiqueue_queue_depth": "gauge", "aiqueue_running_jobs": "gauge", "aiqueue_slots_limit": "gauge",
    "aiqueue_paused": "gauge", "aiqueue_oldest_queued_age_seconds": "gauge", "aiqueue_stuck_jobs": "gauge",
    "aiqueue_jobs": "gauge", "aiqueue_jobs_total": "counter", "aiqueue_refunds_total": "counter",
    "aiqueue_refunded_credits_total": "counter", "aiqueue_provider_errors_total": "counter",
    "aiqueue_scrape_duration_seconds": "gauge",
}


def run_jobs(make_manager: Callable[..., Any], fake_hub: Any, clock: FrozenClock) -> tuple[Any, dict[str, int]]:
    """Real jobs through the manager and the fake RunningHub; returns the manager and job ids."""
    manager = make_manager()  # three slots
    for user in "abcdefgh":
        manager.grant(user, 100)
    ids: dict[str, int] = {}
    ids["a"] = manager.enqueue("a", "upscale_image", IMG).job.id
    manager.finish(ids["a"], "completed", outputs=["https://out/a.png"])
    ids["b"] = manager.enqueue("b", "upscale_video", VIDEO).job.id
    manager.finish(ids["b"], "failed", error="node 31 (KSampler) RuntimeError: CUDA out of memory")  # no code
    fake_hub.script_submits(["reject:803"])
    failed = manager.enqueue("c", "upscale_image", IMG).job
    assert failed.status == "failed" and failed.error.startswith("submit rejected: 803 APIKEY_INVALID_NODE_INFO")
    ids["d"] = manager.enqueue("d", "upscale_video", VIDEO).job.id
    manager.finish(ids["d"], "failed", error="805 APIKEY_TASK_STATUS_ERROR: task failed")
    ids["e"] = manager.enqueue("e", "upscale_image", IMG).job.id  # running, slot 1
    ids["f"] = manager.enqueue("f", "upscale_video", VIDEO).job.id  # running, slot 2
    manager.pause()
    clock.advance(timedelta(minutes=1))
    ids["g"] = manager.enqueue("g", "upscale_image", IMG).job.id  # queued: paused
    clock.advance(timedelta(seconds=30))
    ids["h"] = manager.enqueue("h", "upscale_video", VIDEO).job.id  # queued
    manager.cancel(ids["g"])  # refunded; h is the head now, waiting since 30 s ago
    clock.advance(timedelta(minutes=10, seconds=15))  # e and f have held their slots 11m45s
    return manager, ids


def check_values(families: dict[str, dict[str, Any]], *, ages: bool) -> None:
    assert {name: family["type"] for name, family in families.items()} == FAMILIES
    assert all(family["help"] for family in families.values())
    assert value(families, "aiqueue_queue_depth") == 1
    assert value(families, "aiqueue_running_jobs") == 2
    assert value(families, "aiqueue_slots_limit") == 3
    assert value(families, "aiqueue_paused") == 1
    finished = series(families, "aiqueue_jobs_total")
    assert {k: v for k, v in finished.items() if v} == {
        (("status", "completed"), ("tool", "upscale_image")): 1,
        (("status", "failed"), ("tool", "upscale_image")): 1,
        (("status", "failed"), ("tool", "upscale_video")): 2,
        (("status", "cancelled"), ("tool", "upscale_image")): 1,
    }
    assert len(finished) == 3 * 2  # every terminal status for every configured tool, zeros included
    active = series(families, "aiqueue_jobs")
    assert {k: v for k, v in active.items() if v} == {
        (("status", "queued"), ("tool", "upscale_video")): 1,
        (("status", "running"), ("tool", "upscale_image")): 1,
        (("status", "running"), ("tool", "upscale_video")): 1,
    }
    assert value(families, "aiqueue_refunds_total") == 4  # b, c, d, g
    assert value(families, "aiqueue_refunded_credits_total") == 20 + 5 + 20 + 5
    assert series(families, "aiqueue_provider_errors_total") == {(("code", "803"),): 1, (("code", "805"),): 1}
    assert 0 < value(families, "aiqueue_scrape_duration_seconds") < 30
    if ages:
        assert value(families, "aiqueue_stuck_jobs") == 2
        assert value(families, "aiqueue_oldest_queued_age_seconds") == 10 * 60 + 15


def test_metrics_after_real_jobs(make_manager: Callable[..., Any], fake_hub: Any, clock: FrozenClock,
                                 db_url: str, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager, _ = run_jobs(make_manager, fake_hub, clock)
    check_values(parse_exposition(prometheus_text(collect_metrics(manager))), ages=True)

    # The same numbers through the real command (its clock is the system's: ages are not fixed).
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    run = run_cli("--config", str(config_file), "--db", db_url, "metrics")
    assert run.code == 0 and run.stderr == ""
    check_values(parse_exposition(run.stdout), ages=False)
    as_json = run_cli("--config", str(config_file), "--db", db_url, "metrics", "--json").json()
    assert (as_json["queued"], as_json["running"], as_json["paused"], as_json["refunded_credits"]) == (1, 2, True, 50)
    assert as_json["provider_errors"] == [{"code": "803", "count": 1}, {"code": "805", "count": 1}]
    assert {"status": "failed", "tool": "upscale_video", "count": 2} in as_json["jobs_finished"]


def test_an_empty_queue(make_manager: Callable[..., Any]) -> None:
    families = parse_exposition(prometheus_text(collect_metrics(make_manager())))
    assert value(families, "aiqueue_queue_depth") == 0 and value(families, "aiqueue_oldest_queued_age_seconds") == 0
    assert value(families, "aiqueue_paused") == 0 and value(families, "aiqueue_refunds_total") == 0
    assert series(families, "aiqueue_provider_errors_total") == {}
    assert set(series(families, "aiqueue_jobs_total").values()) == {0}


def test_label_values_are_escaped(make_manager: Callable[..., Any], db_url: str) -> None:
    manager = make_manager()
    odd = 'we"ird\\tool\nname'
    engine = create_engine(db_url)
    with engine.begin() as conn:  # a tool name the config would refuse, as raw SQL could leave one
        conn.execute(text("INSERT INTO aiqueue_jobs (user_id, tool, status, cost, inputs, outputs, error, "
                          "created_at, finished_at, updated_at) VALUES ('z', :tool, 'failed', 5, '{}', '[]', "
                          ":error, :now, :now, :now)"),
                     {"tool": odd, "error": "1003 rate limit exceeded", "now": "2026-12-01 12:00:00+00:00"})
    engine.dispose()
    body = prometheus_text(collect_metrics(manager))
    assert 'tool="we\\"ird\\\\tool\\nname"' in body
    families = parse_exposition(body)
    assert value(families, "aiqueue_jobs_total", status="failed", tool=odd) == 1
    assert value(families, "aiqueue_provider_errors_total", code="1003") == 1


# --- --output: atomic, 0644, for node_exporter's textfile collector ------------------------------------


@pytest.fixture
def cli(db_url: str, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)

    def run(*args: str) -> Run:
        return run_cli("--config", str(config_file), "--db", db_url, *args)

    assert run("db", "init").code == 0
    return run


def test_output_writes_the_file_atomically(cli: Callable[..., Run], tmp_path: Path) -> None:
    directory = tmp_path / "textfile"
    directory.mkdir()
    target = directory / "aiqueue.prom"
    old = os.umask(0o077)  # the file must still be readable by node_exporter
    try:
        first = cli("metrics", "--output", str(target))
    finally:
        os.umask(old)
    assert (first.code, first.stdout, first.stderr) == (0, "", "")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert value(parse_exposition(target.read_text(encoding="utf-8")), "aiqueue_queue_depth") == 0
    assert os.listdir(directory) == ["aiqueue.prom"]  # no temporary file left behind

    cli("credits", "grant", "alice", "10")
    cli("pause")
    with target.open(encoding="utf-8") as reader:  # a scraper in the middle of reading the old file
        before = target.stat().st_ino
        both = cli("metrics", "--output", str(target), "--json")
        assert both.code == 0 and json.loads(both.stdout)["paused"] is True
        assert value(parse_exposition(reader.read()), "aiqueue_paused") == 0  # still the old file, whole
    assert target.stat().st_ino != before  # replaced by a rename, not rewritten in place
    quiet = cli("--quiet", "metrics", "--output", str(target))
    assert (quiet.code, quiet.stdout, quiet.stderr) == (0, "", "")
    assert value(parse_exposition(target.read_text(encoding="utf-8")), "aiqueue_paused") == 1
    assert os.listdir(directory) == ["aiqueue.prom"]


@pytest.mark.parametrize("where", ["missing/aiqueue.prom", "."])
def test_output_to_a_bad_place_is_refused(cli: Callable[..., Run], tmp_path: Path, where: str) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    run = cli("metrics", "--output", str(tmp_path / where))
    assert run.code == 2 and run.stdout == "" and run.stderr.count("\n") == 1 and "--output" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_dead_database_leaves_the_last_file_alone(tmp_path: Path, config_file: Path) -> None:
    target = tmp_path / "aiqueue.prom"
    target.write_text("# TYPE aiqueue_queue_depth gauge\naiqueue_queue_depth 7\n", encoding="utf-8")
    run = run_cli("--config", str(config_file), "--db", f"sqlite:///{tmp_path / 'gone.db'}",
                  "metrics", "--output", str(target))
    assert run.code == 8 and run.stdout == "" and "db init" in run.stderr
    assert value(parse_exposition(target.read_text(encoding="utf-8")), "aiqueue_queue_depth") == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aiqueue.prom", "aiqueue.toml"]


# --- the queries stay on indexes ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_plans_use_indexes(make_manager: Callable[..., Any]) -> None:
    """EXPLAIN QUERY PLAN of every metrics query: jobs and ledger are only reached through an
    index. (PostgreSQL rightly prefers a parallel sequential scan for whole-table counts at a
    million rows; its figures were measured, not asserted: plans there follow statistics.)"""
    from aiqueue.store import stats

    manager = make_manager()
    manager.grant("a", 10)
    manager.enqueue("a", "upscale_image", IMG, start=False)  # a queue head to look up
    plans: list[str] = []

    def explain(tx: Any) -> None:
        execute = tx.conn.execute

        def spy(statement: Any, *args: Any, **kwargs: Any) -> Any:
            compiled = statement.compile(dialect=tx.conn.dialect, compile_kwargs={"literal_binds": True})
            rows = tx.conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}").fetchall()
            plans.append(f"{compiled}\n" + "\n".join(str(r[-1]) for r in rows))
            return execute(statement, *args, **kwargs)

        tx.conn.execute = spy
        try:
            stats.queue_numbers(tx, manager.clock.now())
            stats.jobs_by_status_and_tool(tx)
            stats.refund_totals(tx)
            stats.provider_error_codes(tx)
        finally:
            del tx.conn.execute

    manager.store.read(explain)
    assert len(plans) == 7
    for plan in plans:
        steps = [line for line in plan.splitlines() if line.startswith(("SCAN", "SEARCH"))]
        assert steps, plan
        for step in steps:
            if "aiqueue_jobs" in step or "aiqueue_ledger" in step:
                assert "INDEX" in step or "PRIMARY KEY" in step, plan


def test_scrape_time_is_a_float(make_manager: Callable[..., Any]) -> None:
    metrics = collect_metrics(make_manager())
    assert isinstance(metrics.scrape_duration_seconds, float) and math.isfinite(metrics.scrape_duration_seconds)


# --- many rows: the SQL aggregates agree with a count in Python ------------------------------------

CODED = [  # (stored error, code the metric must count it under, or None)
    ("submit rejected: 803 APIKEY_INVALID_NODE_INFO", "803"),
    ("submit rejected: 1011 system busy", "1011"),
    ("805 APIKEY_TASK_STATUS_ERROR: task failed", "805"),
    ("provider code 805", "805"),
    ("1505 photorealistic real people prohibited", "1505"),
    ("803", "803"),
    ("submit rejected: HTTP 404 Not Found: <html>", None),
    ("12345 five digits", None),
    ("80 two digits", None),
    ("803APIKEY_INVALID", None),
    ("timed out after 10m01s running (limit 10m); provider: unreachable: 802 APIKEY_UNAUTHORIZED", None),
    ("", None),
]


def test_aggregates_over_many_rows_match_a_count_in_python(make_manager: Callable[..., Any], db_url: str) -> None:
    from collections import Counter

    from aiqueue.store.bulk import generate

    manager = make_manager()
    generate(manager.store, 3000, 300, fail_rate=0.3, users=1000, events=False, seed=1)
    generate(manager.store, 2000, 200, fail_rate=0.2, users=500, events=False, seed=2, cost=20,
             tool="upscale_video", user_prefix="video-")
    engine = create_engine(db_url)
    with engine.begin() as conn:
        failed = [r[0] for r in conn.execute(text("SELECT id FROM aiqueue_jobs WHERE status = 'failed' ORDER BY id"))]
        for n, job_id in enumerate(failed[: len(CODED) * 40]):
            conn.execute(text("UPDATE aiqueue_jobs SET error = :e WHERE id = :id"),
                         {"e": CODED[n % len(CODED)][0], "id": job_id})
        conn.execute(text("UPDATE aiqueue_jobs SET error = NULL WHERE id = :id"), {"id": failed[-1]})
        rows = conn.execute(text("SELECT status, tool, error FROM aiqueue_jobs")).all()
        refunds = conn.execute(text("SELECT amount FROM aiqueue_ledger WHERE kind = 'refund'")).all()
    engine.dispose()

    metrics = collect_metrics(manager)
    by_status = Counter((status, tool) for status, tool, _ in rows)
    assert {(s, t): n for s, t, n in metrics.finished + metrics.active if n} == dict(by_status)
    assert metrics.queued == 500 and metrics.running == 0
    assert (metrics.refunds, metrics.refunded_credits) == (len(refunds), sum(a for (a,) in refunds))
    code = re.compile(r"(?:submit rejected: |provider code )?([0-9]{3,4})(?: |\Z)")
    expected = Counter(m.group(1) for status, _, error in rows
                       if status == "failed" and error and (m := code.match(error)))
    assert dict(metrics.provider_errors) == dict(expected)
    assert expected == {"803": 80, "1011": 40, "805": 80, "1505": 40}

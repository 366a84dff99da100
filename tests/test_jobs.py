"""`aiqueue jobs`: listings newest first with --status (repeatable or comma list, validated),
--user, --tool, --since (a duration or an ISO-8601 time) and --limit, as a table, a JSON list or
streamed JSON lines (bounded memory), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import tracemalloc
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest

from aiqueue.domain import Status
from tests.cli_helpers import Run, run_cli
from tests.conftest import API_KEY

IMG = {"image": "api/in.png"}
VID = {"video": "api/in.mp4"}


@pytest.fixture
def history(make_manager: Any, fake_hub: Any, clock: Any) -> dict[str, Any]:
    """One job in every status, a minute apart (the frozen clock starts 2026-12-01 12:00 UTC)."""
    manager = make_manager(max_concurrent=1)
    jobs: dict[str, Any] = {}
    for name in ("done", "broken", "dropped", "busy", "next", "last"):
        manager.grant(name, 100)
    jobs["done"] = manager.enqueue("done", "upscale_image", IMG).job
    manager.finish(jobs["done"].id, "completed")
    clock.advance(60)
    jobs["broken"] = manager.enqueue("broken", "upscale_video", VID).job
    manager.finish(jobs["broken"].id, "failed", error="node 3: CUDA out of memory")
    clock.advance(60)
    jobs["busy"] = manager.enqueue("busy", "upscale_image", IMG).job  # 12:02, running
    clock.advance(60)
    jobs["dropped"] = manager.enqueue("dropped", "upscale_image", IMG).job  # 12:03, queued...
    manager.cancel(jobs["dropped"].id)  # ...then cancelled
    clock.advance(60)
    jobs["next"] = manager.enqueue("next", "upscale_video", VID).job  # 12:04, queued 1
    clock.advance(60)
    jobs["last"] = manager.enqueue("last", "upscale_image", IMG).job  # 12:05, queued 2
    return {"manager": manager, **{k: v.id for k, v in jobs.items()}}


@pytest.fixture
def cli(db_url: str, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    monkeypatch.setenv("COLUMNS", "80")

    def run(*args: str) -> Run:
        return run_cli("--config", str(config_file), "--db", db_url, *args)

    return run


def ids(run: Run) -> list[int]:
    return [job["id"] for job in run.json()]


def test_filters_newest_first(history: dict[str, Any], cli: Any) -> None:
    h = history
    everything = cli("jobs", "--json").json()
    assert [j["id"] for j in everything] == [h["last"], h["next"], h["dropped"], h["busy"], h["broken"], h["done"]]
    assert [(j["status"], j["position"]) for j in everything[:2]] == [("queued", 2), ("queued", 1)]
    assert ids(cli("jobs", "--status", "failed,cancelled", "--json")) == [h["dropped"], h["broken"]]
    assert ids(cli("jobs", "--status", "queued", "--status", "running", "--json")) == [h["last"], h["next"], h["busy"]]
    assert ids(cli("jobs", "--status", " Completed ", "--json")) == [h["done"]]
    assert ids(cli("jobs", "--status", "failed,cancelled", "--limit", "1", "--json")) == [h["dropped"]]
    assert ids(cli("jobs", "--user", "broken", "--json")) == [h["broken"]]
    assert ids(cli("jobs", "--user", "nobody", "--json")) == []  # a filter matching nothing: []
    assert ids(cli("jobs", "--tool", "upscale_video", "--json")) == [h["next"], h["broken"]]
    assert ids(cli("jobs", "--tool", "upscale_image", "--status", "queued", "--json")) == [h["last"]]
    assert ids(cli("jobs", "--tool", "upscale_image", "--limit", "2", "--json")) == [h["last"], h["dropped"]]
    assert ids(cli("jobs", "--limit", "2", "--json")) == [h["last"], h["next"]]
    # --since: an ISO-8601 time (Z, an offset, or none: UTC) or a duration back from now.
    assert ids(cli("jobs", "--since", "2026-12-01T12:03:00Z", "--json")) == [h["last"], h["next"], h["dropped"]]
    assert ids(cli("jobs", "--since", "2026-12-01T14:03:00+02:00", "--json")) == [h["last"], h["next"], h["dropped"]]
    assert ids(cli("jobs", "--since", "2026-12-01T12:04:00", "--status", "queued", "--json")) == [h["last"], h["next"]]
    assert ids(cli("jobs", "--since", "1h", "--json")) == []  # the system clock is days past the frozen one
    manager = h["manager"]
    assert [j.id for j in manager.jobs(since=timedelta(seconds=90))] == [h["last"], h["next"]]


@pytest.mark.parametrize("args, needle", [
    (["--status", "done"], "unknown status 'done'"),
    (["--status", "queued,,bogus"], "unknown status 'bogus'"),
    (["--since", "yesterday"], "--since"),
    (["--since", "2026-13-01T00:00:00Z"], "--since: bad time"),
    (["--limit", "0"], "--limit"),
    (["--json", "--jsonl"], "not both"),
    (["--user", " padded"], "spaces"),
])
def test_bad_filters_are_usage_errors(history: dict[str, Any], cli: Any, args: list[str], needle: str) -> None:
    plain = cli("jobs", *args)
    assert plain.code == 2 and plain.stdout == "" and needle in plain.stderr and plain.stderr.count("\n") == 1


def test_jsonl_streams_the_same_objects(history: dict[str, Any], cli: Any) -> None:
    listed = cli("jobs", "--json").json()
    streamed = cli("jobs", "--jsonl")
    assert streamed.code == 0
    assert [json.loads(line) for line in streamed.stdout.splitlines()] == listed
    some = cli("jobs", "--jsonl", "--status", "queued", "--limit", "1")
    assert [json.loads(line)["id"] for line in some.stdout.splitlines()] == [history["last"]]
    assert cli("jobs", "--jsonl", "--user", "nobody").stdout == ""  # nothing: no line, exit 0


def test_table_fits_80_columns(history: dict[str, Any], cli: Any) -> None:
    table = cli("jobs")
    assert table.code == 0
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    for word in ("job", "user", "tool", "status", "created (UTC)", "detail", "position 1", "12-01 12:05",
                 "node 3: CUDA"):
        assert word in table.stdout, word
    assert "no job matches" in cli("jobs", "--user", "nobody").stdout


def test_a_big_listing_streams_in_bounded_memory(make_manager: Any) -> None:
    from datetime import datetime

    from sqlalchemy import insert

    from aiqueue.store.tables import jobs

    manager = make_manager()
    now = datetime(2026, 12, 1, tzinfo=UTC)
    total = 20_000
    rows = [{"user_id": f"u{i}", "tool": "upscale_image", "status": "completed", "cost": 5,
             "inputs": json.dumps({"image": f"api/{i}.png"}), "outputs": json.dumps([f"https://cdn/{i}.png"]),
             "created_at": now, "started_at": now, "finished_at": now, "updated_at": now} for i in range(total)]
    manager.store.run(lambda tx: tx.conn.execute(insert(jobs), rows))
    rows.clear()

    tracemalloc.start()
    try:
        seen = sum(1 for _ in manager.jobs(limit=None, stream=True))
        streamed_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        held = list(manager.jobs(limit=None))
        listed_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == len(held) == total and held[0].status is Status.COMPLETED
    assert streamed_peak * 4 < listed_peak, (streamed_peak, listed_peak)


def test_positions_are_exact_across_chunks_and_filters(make_manager: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from aiqueue.store import reads

    monkeypatch.setattr(reads, "POSITION_CHUNK", 2)  # number a few rows per query, as a big stream does
    manager = make_manager()
    for i in range(9):
        manager.grant(f"p{i}", 100)
        tool, inputs = ("upscale_video", VID) if i % 3 == 0 else ("upscale_image", IMG)
        manager.enqueue(f"p{i}", tool, inputs, start=False)
    manager.cancel(manager.jobs(user="p4")[0].id)  # a hole in the queue
    truth = {job.id: job.position for job in manager.status().queued}
    assert sorted(truth.values()) == list(range(1, 9))
    for listing in (manager.jobs(limit=None, stream=True), manager.jobs(tool="upscale_video", stream=True),
                    manager.jobs(["queued"], limit=5), manager.jobs(tool="upscale_image", limit=None)):
        shown = [(job.id, job.position) for job in listing if job.status is Status.QUEUED]
        assert shown and all(truth[i] == position for i, position in shown), shown

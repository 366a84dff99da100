"""`status` answers an operator's questions (issue 4): running slots, the queue with estimated
starts from recent run durations, counts per status over a window, the oldest wait, paused or not;
`status --user U` for support; readable at 80 columns. The estimate itself is a pure simulation
(aiqueue.eta), tested alone first; then through the manager and the CLI on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import math
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from aiqueue.domain import Status
from aiqueue.eta import Durations, Simulation, estimate_starts
from tests.cli_helpers import Run, run_cli
from tests.conftest import API_KEY
from tests.test_query_plans import NOW, bad_steps, captured, store  # noqa: F401 - store: the generated database

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
IMG = {"image": "api/in.png"}
VID = {"video": "api/in.mp4"}


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- the estimate alone -------------------------------------------------------------------------


def test_durations_take_the_tool_median_then_the_overall_one() -> None:
    d = Durations.from_samples({"img": [60, 120, 90], "vid": []}, [60, 120, 90, 600])
    assert d.of("img") == 90 and d.per_tool["img"] == (90, 3)
    assert d.of("vid") == 105 == d.of("never-run")  # no run of its own: the median of all tools
    assert Durations.from_samples({}, []).of("img") is None  # nothing completed: unknown, not a guess


def test_simulation_replays_fifo_over_the_slots() -> None:
    d = Durations(per_tool={"img": (90.0, 3), "vid": (300.0, 5)}, overall=(100.0, 8))
    # Two slots: one frees in 60s (img started 30s ago), one in 200s (vid started 100s ago).
    holding = [(at(-30), "img"), (at(-100), "vid")]
    starts = estimate_starts(T0, 2, False, holding, ["img", "vid", "img", "img"], d)
    # img@60 (-> frees at 150), vid@150 (-> 450), img@200 (-> 290), img@290.
    assert starts == [at(60), at(150), at(200), at(290)]
    # A free slot starts the head of the queue now; an overdue job is assumed to end now.
    assert estimate_starts(T0, 2, False, [(at(-1000), "img")], ["img", "img"], d) == [at(0), at(0)]
    # Paused: nothing starts, so nothing is estimated.
    assert estimate_starts(T0, 2, True, holding, ["img"], d) == [None]
    # Nothing ever completed: a free slot still starts the head now; after that it is unknown.
    assert estimate_starts(T0, 1, False, [], ["img", "img"], Durations()) == [at(0), None]


def test_lowered_limit_waits_for_enough_holders_to_end() -> None:
    d = Durations(per_tool={"img": (100.0, 1)}, overall=(100.0, 1))
    holding = [(at(-90), "img"), (at(-50), "img"), (at(-10), "img")]  # end at 10, 50, 90
    # Limit lowered to 2 while 3 hold slots: the first slot opens when the second one ends.
    assert estimate_starts(T0, 2, False, holding, ["img"], d) == [at(50)]


def test_skip_is_exact_for_uniform_durations() -> None:
    d = Durations(per_tool={}, overall=(70.0, 20))
    holding = [(at(-10), "x"), (at(-40), "x"), (at(-65), "x")]
    for skipped in (0, 1, 2, 3, 7, 100, 1001):
        exact = Simulation(T0, 3, holding, d)
        for _ in range(skipped):
            exact.next_start("x")
        fast = Simulation(T0, 3, holding, d)
        fast.skip(skipped)
        assert fast.next_start("x") == exact.next_start("x"), skipped
    unknown = Simulation(T0, 2, [], Durations())
    unknown.skip(5)
    assert unknown.next_start("x") is None and math.isinf(min(unknown.heap))


# --- through the manager (both backends) ----------------------------------------------------------


def run_jobs(manager: Any, clock: Any, tool: str, inputs: dict[str, str], seconds: list[int]) -> list[Any]:
    """One job at a time through the single slot, each completed after `seconds`."""
    done = []
    for i, duration in enumerate(seconds):
        user = f"{tool}-history-{i}"
        manager.grant(user, 100)
        job = manager.enqueue(user, tool, inputs).job
        assert job.status is Status.RUNNING
        clock.advance(duration)
        done.append(manager.finish(job.id, "completed").job)
    return done


def test_status_estimates_counts_and_oldest_wait(make_manager: Any, fake_hub: Any, clock: Any) -> None:
    manager = make_manager(max_concurrent=1)
    run_jobs(manager, clock, "upscale_image", IMG, [60, 120, 90])  # median 90
    for user in ("d", "e", "f", "g", "x"):
        manager.grant(user, 100)
    cancelled = manager.enqueue("x", "upscale_image", IMG, start=False).job
    manager.cancel(cancelled.id)
    running = manager.enqueue("d", "upscale_video", VID).job  # no video run yet: borrows 90
    assert running.status is Status.RUNNING
    clock.advance(30)
    queued = [manager.enqueue(u, t, i).job for u, t, i in
              (("e", "upscale_image", IMG), ("f", "upscale_video", VID), ("g", "upscale_image", IMG))]
    clock.advance(5)
    now = clock.now()

    status = manager.status(window=timedelta(hours=1))
    assert [j.id for j in status.running] == [running.id]
    assert [(j.id, j.position) for j in status.queued] == [(j.id, i) for i, j in enumerate(queued, 1)]
    # The slot frees at 90s after d started (35s ago): e at +55s, f at +145s, g at +235s.
    assert [status.starts[j.id] for j in queued] == [now + timedelta(seconds=s) for s in (55, 145, 235)]
    assert status.durations.per_tool == {"upscale_image": (90.0, 3)}
    assert status.counts == {"queued": 3, "starting": 0, "running": 1, "completed": 3, "failed": 0, "cancelled": 1}
    assert status.oldest_queued_at == queued[0].created_at and status.paused is False

    data = status.to_dict()
    assert {"limit", "paused", "running", "queued", "queued_total"} <= set(data)  # the old keys stay
    assert data["oldest_queued_age_seconds"] == 5.0 and data["window"]["seconds"] == 3600
    assert data["running"][0]["running_seconds"] == 35.0
    assert [(q["waiting_seconds"], q["estimated_wait_seconds"]) for q in data["queued"]] == [
        (5.0, 55.0), (5.0, 145.0), (5.0, 235.0)]
    assert data["estimates"]["per_tool"]["upscale_image"] == {"median_seconds": 90.0, "samples": 3}
    assert data["estimates"]["overall"] == {"median_seconds": 90.0, "samples": 3}

    # A cut list estimates only the rows it shows; the total stays exact.
    cut = manager.status(limit=1)
    assert list(cut.starts) == [queued[0].id] and cut.queued_total == 3
    # The window: two hours later, nothing finished within the last hour.
    clock.advance(7200)
    later = manager.status(window=timedelta(hours=1))
    assert later.counts["completed"] == 0 and later.counts["cancelled"] == 0 and later.counts["queued"] == 3
    assert manager.status(window=timedelta(days=1)).counts["completed"] == 3
    # Paused: nothing starts, so no estimate.
    manager.pause()
    assert set(manager.status().starts.values()) == {None}


def test_user_status_answers_support(make_manager: Any, fake_hub: Any, clock: Any) -> None:
    manager = make_manager(max_concurrent=1)
    run_jobs(manager, clock, "upscale_image", IMG, [100])
    for user in ("runner", "waiter", "idle"):
        manager.grant(user, 100)
    running = manager.enqueue("runner", "upscale_image", IMG).job
    clock.advance(40)
    waiting = manager.enqueue("waiter", "upscale_image", IMG).job

    mine = manager.user_status("waiter")
    assert mine.active is not None and mine.active.id == waiting.id and mine.active.position == 1
    assert mine.estimated_start == clock.now() + timedelta(seconds=60) and not mine.approximate
    assert [j.id for j in mine.recent] == [waiting.id] and mine.recent[0].position == 1
    assert mine.balance == 95
    data = mine.to_dict()
    assert data["active"]["estimated_wait_seconds"] == 60.0 and data["known"] is True
    detail = manager.job_detail(waiting.id)  # `status JOB_ID` tells the same
    assert detail.estimated_start == mine.estimated_start and not detail.approximate
    assert detail.to_dict()["job"]["estimated_start"] == mine.estimated_start.isoformat()
    assert "estimated_start" not in manager.job_detail(running.id).to_dict()["job"]

    theirs = manager.user_status("runner")
    assert theirs.active is not None and theirs.active.status is Status.RUNNING and theirs.estimated_start is None
    idle = manager.user_status("idle")  # an account but no job: a clear answer, not an error
    assert idle.active is None and idle.recent == [] and idle.known
    # Someone who never had credits or jobs: not found (a typo, most likely).
    from aiqueue.errors import NotFoundError

    with pytest.raises(NotFoundError, match="no user 'ghost'"):
        manager.user_status("ghost")
    manager.finish(running.id, "completed")
    assert manager.user_status("runner").recent[0].status is Status.COMPLETED


def test_user_status_deep_in_a_long_queue_is_approximate(make_manager: Any, fake_hub: Any, clock: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from aiqueue import overview

    monkeypatch.setattr(overview, "AHEAD_LOADED", 2)  # load 2 of the jobs ahead, skip the rest
    manager = make_manager(max_concurrent=1)
    run_jobs(manager, clock, "upscale_image", IMG, [10])
    for i in range(6):
        manager.grant(f"q{i}", 100)
        manager.enqueue(f"q{i}", "upscale_image", IMG, start=False)
    last = manager.user_status("q5")
    assert last.active is not None and last.active.position == 6 and last.approximate
    assert last.estimated_start == clock.now() + timedelta(seconds=50)  # 5 jobs of 10s ahead, one slot
    assert not manager.user_status("q2").approximate


# --- through the CLI ------------------------------------------------------------------------------


@pytest.fixture
def cli(db_url: str, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLUMNS", "80")

    def run(*args: str) -> Run:
        return run_cli("--config", str(config_file), "--db", db_url, *args)

    assert run("db", "init").code == 0
    return run


LONG = "customer-with-a-very-long-identifier-" + "x" * 60


def test_status_table_stays_one_line_per_job_at_80_columns(cli: Any, fake_hub: Any) -> None:
    users = [LONG, "bob", "carol", "dave", LONG + "-2", "erin"]
    for user in users:
        assert cli("credits", "grant", user, "100").code == 0
        assert cli("enqueue", "--user", user, "--tool", "upscale_image", "--input", "image=a.png").code == 0
    result = cli("status")
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "\x1b" not in result.stdout
    for word in ("slot", "job", "user", "tool", "provider task", "running for", "position", "waiting for",
                 "est. start", "Finished in the last 24h", "oldest waiting"):
        assert word in result.stdout, word
    rows = [line for line in lines if re.match(r"^\s+\d+\s+\d+\s", line)]
    assert len(rows) == 6  # three slots and three queued jobs, each on exactly one line
    assert any("…" in row for row in rows)  # the long ids are cut, not wrapped
    # The queued rows say when they start: the median is unknown, so the head starts "next"
    # only when a slot is free; here every slot is busy and nothing has completed: "?".
    assert "?" in result.stdout


def test_status_views_fit_narrow_consoles() -> None:
    from rich.console import Console

    from aiqueue.cli.render_queue import jobs_table, status_view, user_view
    from aiqueue.domain import Job, QueueStatus, UserStatus

    def job(i: int, status: Status, **extra: Any) -> Job:
        return Job(id=1000 + i, user=LONG + str(i), tool="upscale_image_with_a_long_tool_name", status=status,
                   cost=5, inputs={}, provider_task_id="1990000000000000123" if status is Status.RUNNING else None,
                   error=None, outputs=[], created_at=at(-300), started_at=at(-100), finished_at=None, **extra)

    running = [job(i, Status.RUNNING, slot=i) for i in (1, 2, 3)]
    queued = [job(10 + i, Status.QUEUED, position=i) for i in (1, 2)]
    status = QueueStatus(limit=3, running=running, queued=queued, queued_total=40, now=T0,
                         oldest_queued_at=at(-300), starts={queued[0].id: at(75)})
    user = UserStatus(user=LONG, balance=5, known=True, active=queued[0], estimated_start=at(75),
                      approximate=True, recent=queued, paused=False, now=T0)
    for width in (80, 60, 50):
        console = Console(width=width, file=io.StringIO(), markup=False, emoji=False, highlight=False)
        for view in [*status_view(status, width), *user_view(user, width), jobs_table(running + queued, width)]:
            console.print(view)
        text = console.file.getvalue()  # type: ignore[attr-defined]
        lines = text.splitlines()
        assert max(len(line) for line in lines) <= width
        # Each job is one row per table it is in (slots or queue, the user's latest, the listing),
        # plus the user's "active job" line: never a second line from a wrapped cell.
        expected = {**{j.id: 2 for j in running}, queued[0].id: 4, queued[1].id: 3}
        assert {i: sum(str(i) in line for line in lines) for i in expected} == expected, (width, text)
        assert "… and 38 more" in text and "~1m15s" in text


def test_status_json_keeps_old_keys_and_adds_new_ones(cli: Any, fake_hub: Any) -> None:
    empty = cli("status", "--json").json()
    assert {k: empty[k] for k in ("limit", "paused", "running", "queued", "queued_total")} == {
        "limit": 3, "paused": False, "running": [], "queued": [], "queued_total": 0}
    assert empty["counts"] == dict.fromkeys(("queued", "starting", "running", "completed", "failed", "cancelled"), 0)
    assert empty["oldest_queued_at"] is None and empty["oldest_queued_age_seconds"] is None
    assert empty["window"]["seconds"] == 86400 and empty["estimates"]["overall"] is None
    assert cli("status", "--window", "90m", "--json").json()["window"]["seconds"] == 5400
    bad = cli("status", "--window", "soon", "--json")
    assert bad.code == 2 and "--window" in bad.error()["message"]
    both = cli("status", "1", "--user", "alice")
    assert both.code == 2 and "JOB_ID" in both.stderr and both.stdout == ""


def test_status_user_through_the_cli(cli: Any, fake_hub: Any) -> None:
    for user in ("u1", "u2", "u3", "u4", "alice"):
        assert cli("credits", "grant", user, "100").code == 0
    for user in ("u1", "u2", "u3", "u4", "alice"):
        assert cli("enqueue", "--user", user, "--tool", "upscale_image", "--input", "image=a.png").code == 0
    data = cli("status", "--user", "alice", "--json").json()
    assert data["user"] == "alice" and data["balance"] == 95
    assert data["active"]["status"] == "queued" and data["active"]["position"] == 2
    assert data["active"]["estimated_start"] is None  # nothing has completed yet: unknown, said so
    table = cli("status", "--user", "alice")
    assert table.code == 0 and "queued at position 2" in table.stdout and "start time unknown" in table.stdout
    detail = cli("status", str(data["active"]["id"]))
    assert detail.code == 0 and "est. start" in detail.stdout and "unknown" in detail.stdout
    assert cli("status", str(data["active"]["id"]), "--json").json()["job"]["estimated_start"] is None
    running = cli("status", "--user", "u1")
    assert running.code == 0 and "running in slot 1" in running.stdout
    ghost = cli("status", "--user", "ghost", "--json")
    assert ghost.code == 4 and ghost.error()["code"] == "not_found" and "ghost" in ghost.error()["message"]
    plain = cli("status", "--user", "ghost")
    assert plain.code == 4 and plain.stderr.startswith("error: no user 'ghost'") and plain.stdout == ""


# --- at scale: the reads behind status, status --user and jobs use indexes ---------------------------

STATUS_READS: dict[str, Any] = {
    "recent runs of a tool": lambda tx, last: tx.recent_durations("upscale_image", 20),
    "recent runs of a tool that never ran": lambda tx, last: tx.recent_durations("never_ran", 20),
    "recent runs of every tool": lambda tx, last: tx.recent_durations(None, 20),
    "counts finished within a window": lambda tx, last: tx.finished_counts(NOW - timedelta(hours=1)),
    "oldest queued": lambda tx, last: tx.oldest_queued_at(),
    "tools of the jobs ahead": lambda tx, last: tx.queued_tools(1000),
    "a user's latest jobs": lambda tx, last: tx.jobs_of_user("user-0000007", 10),
    "jobs by statuses": lambda tx, last: list(tx.list_jobs([Status.FAILED, Status.CANCELLED], limit=50)),
    "jobs of a tool": lambda tx, last: list(tx.list_jobs(tool="upscale_image", limit=50)),
    "jobs of a rare tool": lambda tx, last: list(tx.list_jobs(tool="never_ran", limit=50)),
    "queued jobs with positions": lambda tx, last: list(tx.list_jobs([Status.QUEUED], limit=50)),
    "jobs since": lambda tx, last: list(tx.list_jobs(since=NOW - timedelta(hours=1), limit=50)),
    "failed jobs since": lambda tx, last: list(tx.list_jobs([Status.FAILED], since=NOW - timedelta(hours=1), limit=50)),
    "jobs of a user": lambda tx, last: list(tx.list_jobs(user="user-0000007", limit=50)),
}


@pytest.mark.parametrize("name", sorted(STATUS_READS))
def test_status_reads_use_indexes(store: Any, name: str) -> None:  # noqa: F811 - the fixture
    statements = captured(store, STATUS_READS[name])
    assert statements, name
    for statement, parameters in statements:
        bad, plan = bad_steps(store, statement, parameters)
        assert bad == [], f"{name}: {bad}\n{statement}\n{plan}"


def test_window_counts_read_only_the_window(store: Any) -> None:  # noqa: F811 - the fixture
    """Counting a window walks that slice of (finished_at, status), not the whole table grouped
    by status (SQLite's own choice unless told otherwise)."""
    statements = captured(store, STATUS_READS["counts finished within a window"])
    for statement, parameters in statements:
        _, plan = bad_steps(store, statement, parameters)
        assert "ix_aiqueue_jobs_finished_status" in plan, plan


ORDERED_BY_THEIR_INDEX = ("recent runs of a tool", "recent runs of a tool that never ran", "recent runs of every tool",
                          "oldest queued", "tools of the jobs ahead", "a user's latest jobs", "jobs by statuses", "jobs of a tool",
                          "queued jobs with positions", "jobs of a user")


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_filtered_newest_first_reads_never_walk_the_primary_key(store: Any) -> None:  # noqa: F811
    """With statistics, PostgreSQL may answer `status = 'queued' ORDER BY id LIMIT n` by walking
    the primary key and filtering (cheap on paper, 200 ms past a million finished jobs): these
    reads must walk the index that leads with their filter."""
    for name in ORDERED_BY_THEIR_INDEX:
        for statement, parameters in captured(store, STATUS_READS[name]):
            if "count(" in statement or "aiqueue_jobs.id BETWEEN" in statement:
                continue  # positions: a count, and a walk bounded by the page's id span
            _, plan = bad_steps(store, statement, parameters)
            assert "aiqueue_jobs_pkey" not in plan, f"{name}\n{statement}\n{plan}"

"""Scenario 6 (issue 3): time is stored and compared in UTC on SQLite and PostgreSQL.

- The whole lifecycle runs in child processes under TZ=America/Sao_Paulo and TZ=Asia/Tokyo (on
  PostgreSQL the session TimeZone is set to yet another zone through the URL): every timestamp in
  the JSON ends in +00:00 and is within seconds of the real UTC time, the stored values are UTC,
  and cleanup measures a 90-minute-old job as 90 minutes old.
- With the injected clock: 9m59s is kept, 10m01s is expired (cleanup and process-next, running
  and starting jobs); time spent queued (also after a busy requeue) never counts; clocks in other
  zones compare correctly; a naive datetime is refused by the store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import create_engine, text

from aiqueue.clock import FrozenClock
from aiqueue.domain import Status
from tests.conftest import API_KEY
from tests.invariants import check_invariants

REPO = Path(__file__).resolve().parents[1]
IMG = {"image": "api/in.png"}
UTC = timezone.utc

# One child process runs a list of CLI commands through the real entry point (main(), with its
# catch point) and prints what each one wrote; TZ is set for the whole child.
DRIVER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from tests.cli_helpers import run_cli
plan = json.loads(sys.stdin.read())
runs = []
for step in plan:
    r = run_cli(*step["args"], input=step.get("input"))
    runs.append({"args": step["args"], "code": r.code, "stdout": r.stdout, "stderr": r.stderr})
sys.__stdout__.write(json.dumps({"utcoffset": time.strftime("%z"), "runs": runs}))
"""


def assert_clean(url: str, limit: int = 3) -> None:
    assert check_invariants(url, limit) == []


def with_session_timezone(url: str, zone: str) -> str:
    """The test's PostgreSQL URL with the session TimeZone set as well as the search_path."""
    assert "options=-csearch_path%3D" in url, url
    return url.replace("options=-csearch_path%3D", f"options=-cTimeZone%3D{zone}%20-csearch_path%3D")


# --- the lifecycle in child processes under foreign time zones ---------------------------------


def _drive(tz: str, plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    env = {**os.environ, "TZ": tz, "RUNNINGHUB_API_KEY": API_KEY}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(REPO)], input=json.dumps(plan), capture_output=True,
        text=True, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    expected = {"America/Sao_Paulo": "-0300", "Asia/Tokyo": "+0900"}[tz]
    assert payload["utcoffset"] == expected, "the child did not run in the foreign zone"
    for run in payload["runs"]:
        assert run["code"] == 0, run
    return [json.loads(run["stdout"]) if run["stdout"].strip() else None for run in payload["runs"]]


def _timestamps(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}"
            if isinstance(item, str) and (key.endswith("_at") or key == "at"):
                yield path, item
            else:
                yield from _timestamps(item, path)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _timestamps(item, f"{where}[{i}]")


def _stored_instants(url: str) -> list[datetime]:
    """created_at and started_at of every job, read without the product's types."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                rows = conn.execute(text(
                    "SELECT extract(epoch FROM created_at), extract(epoch FROM started_at) FROM aiqueue_jobs"))
                return [datetime.fromtimestamp(float(v), UTC) for row in rows for v in row if v is not None]
            rows = conn.execute(text("SELECT created_at, started_at FROM aiqueue_jobs"))
            # SQLite keeps naive text: it must be the UTC wall time, not the child's local time.
            return [datetime.fromisoformat(v).replace(tzinfo=UTC) for row in rows for v in row if v is not None]
    finally:
        engine.dispose()


def _backdate(url: str, job_id: int, minutes: int) -> datetime:
    """Move a job's start into the past behind the product's back (server time on PostgreSQL)."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text(
                    f"UPDATE aiqueue_jobs SET started_at = now() - interval '{minutes} minutes' WHERE id = :id"),
                    {"id": job_id})
                epoch = conn.execute(text("SELECT extract(epoch FROM started_at) FROM aiqueue_jobs WHERE id = :id"),
                                     {"id": job_id}).scalar_one()
                return datetime.fromtimestamp(float(epoch), UTC)
            past = datetime.now(UTC) - timedelta(minutes=minutes)
            conn.execute(text("UPDATE aiqueue_jobs SET started_at = :at WHERE id = :id"),
                         {"at": past.replace(tzinfo=None).isoformat(sep=" "), "id": job_id})
            return past
    finally:
        engine.dispose()


@pytest.mark.parametrize("tz,pg_zone", [("America/Sao_Paulo", "Asia/Tokyo"), ("Asia/Tokyo", "America/Sao_Paulo")])
def test_lifecycle_in_foreign_time_zones_is_all_utc(
    tz: str, pg_zone: str, backend: str, db_url: str, config_file: Path, fake_hub: Any
) -> None:
    url = with_session_timezone(db_url, pg_zone) if backend == "postgres" else db_url
    g = ["--config", str(config_file), "--db", url]
    img = ["--input", "image=in.png"]
    started = datetime.now(UTC)
    first = _drive(tz, [
        {"args": [*g, "db", "init", "--json"]},
        *({"args": [*g, "credits", "grant", user, "100", "--json"]} for user in ("alice", "carol", "bob")),
        {"args": [*g, "enqueue", "--user", "alice", "--tool", "upscale_image", *img, "--json"]},
        {"args": [*g, "enqueue", "--user", "carol", "--tool", "upscale_image", *img, "--json"]},
        {"args": [*g, "enqueue", "--user", "bob", "--tool", "upscale_image", *img, "--no-start", "--json"]},
        {"args": [*g, "status", "--json"]},
        {"args": [*g, "credits", "ledger", "--json"]},
    ])
    alice, carol, bob = (first[i]["job"] for i in (4, 5, 6))
    assert (alice["status"], carol["status"], bob["status"]) == ("running", "running", "queued")
    carol_start = _backdate(db_url, carol["id"], minutes=90)

    webhook = fake_hub.finish_task(alice["provider_task_id"], deliver=False).decode()
    second = _drive(tz, [
        {"args": [*g, "finish", "--webhook", "-", "--json"], "input": webhook},
        {"args": [*g, "cleanup", "--older-than", "2h", "--json"]},
        {"args": [*g, "cleanup", "--older-than", "1h", "--json"]},
        *({"args": [*g, "status", str(job["id"]), "--json"]} for job in (alice, carol, bob)),
        {"args": [*g, "credits", "ledger", "--json"]},
        {"args": [*g, "status", "--json"]},
        {"args": [*g, "refund-audit", "--json"]},
    ])
    # One real `python -m aiqueue` as well, in the same zone.
    env = {**os.environ, "TZ": tz, "RUNNINGHUB_API_KEY": API_KEY}
    real = subprocess.run([sys.executable, "-m", "aiqueue", *g, "status", str(carol["id"]), "--json"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert real.returncode == 0, real.stderr
    finished = datetime.now(UTC)

    finish, too_young, cleaned = second[0], second[1], second[2]
    assert finish["job"]["status"] == "completed" and [j["id"] for j in finish["started"]] == [bob["id"]]
    assert too_young["expired"] == []  # 90 minutes is under 2h: no zone offset crept in
    assert [j["id"] for j in cleaned["expired"]] == [carol["id"]]
    assert "timed out after 1h30m running" in cleaned["expired"][0]["error"]

    slack = timedelta(seconds=5)
    checked = 0
    for output in [*first, *second, json.loads(real.stdout)]:
        for path, stamp in _timestamps(output):
            assert stamp.endswith("+00:00"), (path, stamp)
            instant = datetime.fromisoformat(stamp)
            if abs(instant - carol_start) < slack:
                continue  # carol's backdated start (checked below)
            assert started - slack <= instant <= finished + slack, (path, stamp)
            checked += 1
    assert checked > 30
    carol_detail = second[4]["job"]
    assert abs(datetime.fromisoformat(carol_detail["started_at"]) - carol_start) < timedelta(seconds=1)

    stored = _stored_instants(db_url)
    assert len(stored) == 6  # created_at of 3 jobs and started_at of 3
    for instant in stored:
        assert started - timedelta(minutes=91) <= instant <= finished + slack, instant
    assert sum(started - slack <= i <= finished + slack for i in stored) == 5
    assert second[-1]["ok"] is True
    assert_clean(db_url)


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # TimeZone is a PostgreSQL setting
def test_postgres_session_time_zone_changes_nothing(db_url: str, config_file: Path, fake_hub: Any) -> None:
    """The same instants read back through sessions in four zones, as aware UTC datetimes."""
    from aiqueue.manager import QueueManager
    from aiqueue.settings import load_settings
    from aiqueue.store import Store

    clock = FrozenClock(datetime(2026, 12, 1, 12, 0, tzinfo=UTC))
    seen: list[tuple[Any, ...]] = []
    job_id = 0
    for zone in ("UTC", "Asia/Tokyo", "America/Sao_Paulo", "Pacific/Kiritimati"):
        url = with_session_timezone(db_url, zone)
        settings = load_settings(config_file, db_url=url, env={"RUNNINGHUB_API_KEY": API_KEY})
        store = Store(settings.database_url)
        try:
            from aiqueue.provider.runninghub import RunningHubClient

            manager = QueueManager(store, settings, RunningHubClient(fake_hub.base_url, API_KEY), clock)
            if zone == "UTC":
                manager.init_db()
                manager.grant("a", 100)
                job_id = manager.enqueue("a", "upscale_image", IMG).job.id
            job = manager.job_detail(job_id).job
            assert job.created_at.utcoffset() == timedelta(0) and job.started_at.utcoffset() == timedelta(0)
            seen.append((job.created_at, job.started_at, manager.ledger("a")[-1].created_at))
            with store.engine.connect() as conn:
                assert conn.execute(text("SHOW TimeZone")).scalar_one() == zone
            # The stale query compares in the database: 9m59s kept, 10m01s expired, in any session.
            clock.advance(timedelta(minutes=9, seconds=59))
            assert manager.cleanup().expired == []
            clock.advance(timedelta(minutes=-9, seconds=-59))
        finally:
            store.dispose()
    assert len(set(seen)) == 1 and seen[0][0] == datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert_clean(db_url)


# --- the injected clock: the staleness boundary --------------------------------------------------


@pytest.mark.parametrize("via", ["cleanup", "process_next"])
@pytest.mark.parametrize("submit", ["accept", "http500"])
def test_9m59s_is_kept_and_10m01s_is_expired(
    manager: Any, fake_hub: Any, clock: FrozenClock, via: str, submit: str
) -> None:
    """A running job (accepted) and a starting one (unknown submit outcome) alike."""
    manager.grant("a", 100)
    fake_hub.script_submits([submit])
    job = manager.enqueue("a", "upscale_image", IMG).job
    assert job.status is (Status.RUNNING if submit == "accept" else Status.STARTING)
    run = getattr(manager, via)

    clock.advance(timedelta(minutes=9, seconds=59))
    assert run().expired == []
    assert manager.job_detail(job.id).job.status is job.status
    clock.advance(timedelta(seconds=2))  # 10m01s
    result = run()
    assert [j.id for j in result.expired] == [job.id]
    ended = manager.job_detail(job.id).job
    assert ended.status is Status.FAILED and "timed out after 10m01s" in ended.error
    assert ended.finished_at == clock.now()
    assert manager.balance("a").balance == 100
    assert_clean(manager.store.url)


def test_time_spent_queued_never_counts(manager: Any, fake_hub: Any, clock: FrozenClock) -> None:
    for user in ("a", "b", "c", "d", "e"):
        manager.grant(user, 100)
    holders = [manager.enqueue(u, "upscale_image", IMG).job for u in "abc"]
    waiting = manager.enqueue("d", "upscale_image", IMG).job
    assert waiting.status is Status.QUEUED
    clock.advance(timedelta(hours=3))  # d waits three hours in the queue
    result = manager.cleanup()
    assert sorted(j.id for j in result.expired) == sorted(j.id for j in holders)
    assert [j.id for j in result.process.started] == [waiting.id]
    started = manager.job_detail(waiting.id).job
    assert started.started_at == clock.now() and started.created_at == clock.now() - timedelta(hours=3)
    clock.advance(timedelta(minutes=9, seconds=59))
    assert manager.cleanup().expired == [] and manager.process_next().expired == []
    clock.advance(timedelta(seconds=2))
    assert [j.id for j in manager.cleanup().expired] == [waiting.id]

    # A busy answer sends a job back to the queue; its wait there does not count either.
    fake_hub.script_submits(["busy"])
    requeued = manager.enqueue("e", "upscale_image", IMG).job
    assert requeued.status is Status.QUEUED and requeued.started_at is None
    clock.advance(timedelta(hours=1))
    started_again = manager.process_next().started
    assert [j.id for j in started_again] == [requeued.id]
    clock.advance(timedelta(minutes=9, seconds=59))
    assert manager.cleanup().expired == []
    clock.advance(timedelta(seconds=2))
    assert [j.id for j in manager.cleanup().expired] == [requeued.id]
    assert_clean(manager.store.url)


def test_clocks_in_other_zones_compare_as_utc(make_manager: Any, fake_hub: Any, db_url: str) -> None:
    """A job started by a Tokyo-zoned clock at 21:00+09:00 (12:00 UTC), checked by a Sao Paulo
    clock: 09:09:59-03:00 keeps it, 09:10:01-03:00 expires it. Stored and read back as UTC."""
    tokyo = make_manager()
    tokyo.clock = FrozenClock(datetime(2026, 12, 1, 21, 0, tzinfo=ZoneInfo("Asia/Tokyo")))
    tokyo.grant("a", 100)
    job = tokyo.enqueue("a", "upscale_image", IMG).job
    stored = tokyo.job_detail(job.id).job
    assert stored.started_at == datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert stored.started_at.utcoffset() == timedelta(0)
    if tokyo.store.dialect == "sqlite":
        with tokyo.store.engine.connect() as conn:
            raw = conn.execute(text("SELECT started_at FROM aiqueue_jobs WHERE id = :id"), {"id": job.id}).scalar_one()
        assert raw.startswith("2026-12-01 12:00:00"), raw  # UTC wall time, not Tokyo's

    sao_paulo = make_manager()
    sao_paulo.clock = FrozenClock(datetime(2026, 12, 1, 9, 9, 59, tzinfo=ZoneInfo("America/Sao_Paulo")))
    assert sao_paulo.cleanup().expired == []
    sao_paulo.clock.advance(timedelta(seconds=2))
    expired = sao_paulo.cleanup().expired
    assert [j.id for j in expired] == [job.id] and "10m01s" in expired[0].error
    ended = sao_paulo.job_detail(job.id).job
    assert ended.finished_at == datetime(2026, 12, 1, 12, 10, 1, tzinfo=UTC)
    assert ended.finished_at.utcoffset() == timedelta(0)
    assert ended.started_at == stored.started_at
    assert_clean(db_url)


# --- naive datetimes ------------------------------------------------------------------------------


def _dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            names = ("aiqueue_jobs", "aiqueue_job_events", "aiqueue_accounts", "aiqueue_ledger",
                     "aiqueue_webhooks", "aiqueue_queue_state")
            return {n: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {n} ORDER BY 1"))] for n in names}
    finally:
        engine.dispose()


class _NaiveClock:
    def now(self) -> datetime:
        return datetime(2026, 12, 1, 12, 0)  # no tzinfo: a bug the store must catch


def test_a_naive_datetime_is_refused_by_the_store(manager: Any, fake_hub: Any) -> None:
    from aiqueue.domain import LedgerKind

    manager.grant("a", 100)
    job = manager.enqueue("a", "upscale_image", IMG, start=False).job
    before = _dump(manager.store.url)
    naive = datetime(2026, 12, 1, 12, 0)
    attempts = [
        lambda tx: tx.insert_job("b", "upscale_image", 5, {}, naive),
        lambda tx: tx.add_ledger("a", None, LedgerKind.GRANT, 5, naive),
        lambda tx: tx.add_event(job.id, Status.QUEUED, Status.QUEUED, naive, "x"),
        lambda tx: tx.credit("a", 5, naive),
        lambda tx: tx.stale(naive),
    ]
    for attempt in attempts:
        with pytest.raises(Exception, match="naive datetime"):
            manager.store.run(attempt)
    with pytest.raises(ValueError, match="aware"):
        FrozenClock(naive)

    manager.clock = _NaiveClock()
    for call in (lambda: manager.grant("a", 5), lambda: manager.enqueue("c", "upscale_image", IMG),
                 lambda: manager.cancel(job.id), lambda: manager.cleanup()):
        with pytest.raises(Exception, match="naive datetime"):
            call()
    assert _dump(manager.store.url) == before
    assert_clean(manager.store.url)

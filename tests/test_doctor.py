"""`aiqueue doctor`: every check on SQLite and PostgreSQL, each failing on its own, with the
monitoring-plugin exit codes (0 ok, 1 warning, 2 critical) and `--json`; and the [doctor]
thresholds in the config, validated like every other key."""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from aiqueue.clock import FrozenClock
from aiqueue.errors import ConfigError
from aiqueue.monitor import CHECKS, HealthReport, doctor
from aiqueue.provider.runninghub import RunningHubClient
from aiqueue.settings import load_settings
from tests.cli_helpers import Run, run_cli
from tests.conftest import API_KEY, write_config

IMG = {"image": "api/in.png"}
THRESHOLDS = """
[doctor]
queue_age_warning = "5m"
queue_age_critical = "20m"
queue_depth_warning = 2
queue_depth_critical = 3
"""


@pytest.fixture
def config_file(tmp_path: Path, fake_hub: Any) -> Path:
    """One slot (so jobs queue up) and small thresholds; make_manager builds on this."""
    return write_config(tmp_path / "aiqueue.toml", fake_hub.base_url, max_concurrent=1, extra=THRESHOLDS)


@pytest.fixture
def cli(db_url: str, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    monkeypatch.setenv("COLUMNS", "80")

    def run(*args: str) -> Run:
        return run_cli("--config", str(config_file), "--db", db_url, *args)

    assert run("db", "init").code == 0
    return run


def client_for(base_url: str, key: str = API_KEY) -> Callable[[], RunningHubClient]:
    return lambda: RunningHubClient(base_url, key, timeout=2)


def levels(report: HealthReport | dict[str, Any]) -> dict[str, str]:
    checks = report["checks"] if isinstance(report, dict) else [c.to_dict() for c in report.checks]
    return {c["name"]: c["level"] for c in checks}


def check(report: HealthReport, name: str) -> Any:
    return next(c for c in report.checks if c.name == name)


def sql(url: str, statement: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


ALL_OK = dict.fromkeys(CHECKS, "ok")


# --- the CLI: exit codes, JSON, the table ----------------------------------------------------------


def test_a_healthy_queue_passes_every_check(cli: Callable[..., Run], fake_hub: Any) -> None:
    cli("credits", "grant", "alice", "50")
    job = cli("--json", "enqueue", "--user", "alice", "--tool", "upscale_image", "--input", "image=a.png").json()
    assert job["job"]["status"] == "running"
    assert cli("finish", str(job["job"]["id"]), "--status", "completed").code == 0

    run = cli("doctor", "--json")
    assert run.code == 0, run.stderr
    payload = json.loads(run.stdout)
    assert set(payload) == {"status", "checks"} and payload["status"] == "ok"
    assert [c["name"] for c in payload["checks"]] == list(CHECKS)
    assert all(set(c) == {"name", "level", "detail", "data"} and c["detail"] for c in payload["checks"])
    assert levels(payload) == ALL_OK
    provider = payload["checks"][2]
    assert provider["data"]["remain_coins"] == "1200" and "1200 coins" in provider["detail"]
    assert [r["path"] for r in fake_hub.requests].count("/uc/openapi/accountStatus") == 1

    table = cli("doctor")
    assert table.code == 0 and table.stderr == ""
    lines = table.stdout.splitlines()
    assert lines[0].startswith("aiqueue doctor: OK (all checks passed)")
    assert max(len(line) for line in lines) <= 80
    for name in CHECKS:
        assert any(line.split()[:2] == [name, "ok"] for line in lines if line.strip()), name


def test_exit_codes_follow_the_worst_level(cli: Callable[..., Run], db_url: str) -> None:
    assert cli("pause").code == 0
    warned = cli("doctor", "--json")
    assert warned.code == 1 and json.loads(warned.stdout)["status"] == "warning"
    assert levels(json.loads(warned.stdout)) == {**ALL_OK, "paused": "warning"}
    table = cli("doctor")
    assert table.code == 1 and table.stdout.startswith("aiqueue doctor: WARNING (1 warning)")

    cli("credits", "grant", "bob", "10")
    sql(db_url, "UPDATE aiqueue_accounts SET balance = balance + 7 WHERE user_id = 'bob'")
    critical = cli("doctor", "--json")
    assert critical.code == 2 and json.loads(critical.stdout)["status"] == "critical"
    audit = json.loads(critical.stdout)["checks"][-1]
    assert audit["level"] == "critical" and "1 balance_mismatch" in audit["detail"] and "--fix" in audit["detail"]
    assert audit["data"] == {"problems": 1, "kinds": {"balance_mismatch": 1}, "fixable": 1}
    assert max(len(line) for line in cli("doctor").stdout.splitlines()) <= 80


def test_quiet_prints_only_a_report_that_is_not_ok(cli: Callable[..., Run]) -> None:
    assert (cli("--quiet", "doctor").code, cli("--quiet", "doctor").stdout) == (0, "")
    cli("pause")
    run = cli("--quiet", "doctor", "--json")
    assert run.code == 1 and json.loads(run.stdout)["status"] == "warning"


def test_skip_leaves_checks_out(cli: Callable[..., Run], db_url: str, fake_hub: Any) -> None:
    cli("credits", "grant", "bob", "10")
    sql(db_url, "UPDATE aiqueue_accounts SET balance = balance + 7 WHERE user_id = 'bob'")
    cli("pause")
    run = cli("doctor", "--skip", "refund_audit", "--skip", "paused", "--skip", "provider", "--json")
    assert run.code == 0, run.stdout
    payload = json.loads(run.stdout)
    assert levels(payload) == ALL_OK
    skipped = [c for c in payload["checks"] if c["data"] == {"skipped": True}]
    assert [c["name"] for c in skipped] == ["provider", "paused", "refund_audit"]
    assert all(c["detail"] == "skipped (--skip)" for c in skipped)
    assert fake_hub.requests == []  # a skipped provider check sends nothing
    for bad in ("database", "schema", "audit"):
        refused = cli("doctor", "--skip", bad)
        # A usage error: 3 (UNKNOWN), as monitoring plugins do, since 2 means CRITICAL.
        assert (refused.code, refused.stdout) == (3, "") and "--skip" in refused.stderr and bad in refused.stderr


def test_without_an_api_key_the_provider_is_a_warning(cli: Callable[..., Run], monkeypatch: pytest.MonkeyPatch,
                                                     fake_hub: Any) -> None:
    monkeypatch.delenv("RUNNINGHUB_API_KEY")
    run = cli("doctor", "--json")
    assert run.code == 1
    payload = json.loads(run.stdout)
    assert levels(payload) == {**ALL_OK, "provider": "warning"}
    assert "RUNNINGHUB_API_KEY" in payload["checks"][2]["detail"]
    assert fake_hub.requests == []


def test_an_invalid_config_is_exit_3_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[doctor]\nqueue_age_warning = "soon"\n', encoding="utf-8")
    run = run_cli("--config", str(bad), "doctor")
    assert (run.code, run.stdout) == (3, "")
    assert run.stderr.count("\n") == 1 and "doctor.queue_age_warning" in run.stderr


# --- checks, one by one, at the manager level (time moves with the frozen clock) -------------------


def test_stuck_jobs_warn_with_their_count_and_the_oldest_age(
    make_manager: Callable[..., Any], clock: FrozenClock, fake_hub: Any
) -> None:
    manager = make_manager(max_concurrent=2)
    provider = client_for(fake_hub.base_url)
    for user in "ab":
        manager.grant(user, 50)
    assert manager.enqueue("a", "upscale_image", IMG).job.status == "running"
    clock.advance(timedelta(minutes=4))
    assert manager.enqueue("b", "upscale_image", IMG).job.status == "running"

    clock.advance(timedelta(minutes=6))  # a has held its slot exactly stale_after (10m): not yet
    assert check(doctor(manager, provider), "stuck_jobs").level == "ok"

    clock.advance(timedelta(seconds=1))
    report = doctor(manager, provider)
    stuck = check(report, "stuck_jobs")
    assert stuck.level == "warning" and report.exit_code == 1
    assert stuck.data["count"] == 1 and stuck.data["oldest_age_seconds"] == 601
    assert "1 job has held a slot past 10m (oldest for 10m01s)" in stuck.detail and "cleanup" in stuck.detail

    clock.advance(timedelta(minutes=9))
    stuck = check(doctor(manager, provider), "stuck_jobs")
    assert (stuck.data["count"], stuck.data["oldest_age_seconds"]) == (2, 1141)
    assert stuck.detail.startswith("2 jobs have held a slot past 10m (oldest for 19m01s)")

    manager.cleanup()
    assert levels(doctor(manager, provider))["stuck_jobs"] == "ok"


def test_queue_age_and_depth_against_the_configured_thresholds(
    make_manager: Callable[..., Any], clock: FrozenClock, fake_hub: Any
) -> None:
    manager = make_manager()  # one slot; warning/critical: age 5m/20m, depth 2/3
    provider = client_for(fake_hub.base_url)
    for user in "abcde":
        manager.grant(user, 50)
    manager.enqueue("a", "upscale_image", IMG)  # takes the one slot
    report = doctor(manager, provider)
    assert check(report, "queue_age").detail == "nothing is queued"
    assert (check(report, "queue_depth").level, check(report, "queue_depth").data["depth"]) == ("ok", 0)

    manager.enqueue("b", "upscale_image", IMG)  # the head of the queue from here on
    clock.advance(timedelta(minutes=1))
    manager.enqueue("c", "upscale_image", IMG)
    clock.advance(timedelta(minutes=4))  # b has waited exactly 5m: not over
    report = doctor(manager, provider)
    assert [check(report, n).level for n in ("queue_age", "queue_depth")] == ["ok", "ok"]
    assert check(report, "queue_age").data == {"age_seconds": 300.0, "warning_seconds": 300.0,
                                               "critical_seconds": 1200.0}

    clock.advance(timedelta(seconds=1))
    manager.enqueue("d", "upscale_image", IMG)  # 3 queued: over the warning level of 2
    report = doctor(manager, provider)
    age, depth = check(report, "queue_age"), check(report, "queue_depth")
    assert (age.level, depth.level, report.exit_code) == ("warning", "warning", 1)
    assert age.detail == "the oldest queued job has waited 5m01s (over 5m)"
    assert depth.detail == "3 jobs queued (over 2)" and depth.data == {"depth": 3, "warning": 2, "critical": 3}

    clock.advance(timedelta(minutes=15))
    manager.enqueue("e", "upscale_image", IMG)
    report = doctor(manager, provider)
    assert (check(report, "queue_age").level, check(report, "queue_depth").level) == ("critical", "critical")
    assert report.exit_code == 2 and report.status == "critical"

    manager.cancel(manager.status().queued[0].id)  # b leaves: c (waited 19m01s) is the head now
    age = check(doctor(manager, provider), "queue_age")
    assert (age.level, age.data["age_seconds"]) == ("warning", 1141.0)


def test_the_provider_check_reads_the_account_status(make_manager: Callable[..., Any], fake_hub: Any) -> None:
    manager = make_manager()
    ok = check(doctor(manager, client_for(fake_hub.base_url)), "provider")
    assert ok.level == "ok" and ok.data == {"remain_coins": "1200", "current_task_counts": "0", "api_type": "NORMAL"}

    refused = doctor(manager, client_for(fake_hub.base_url, key="another-key-0123456789abcdef"))
    provider = check(refused, "provider")
    assert provider.level == "critical" and provider.data == {"code": 802}
    assert "802 APIKEY_UNAUTHORIZED" in provider.detail and "another-key" not in provider.detail
    assert levels(refused) == {**ALL_OK, "provider": "critical"}  # the database checks still ran
    assert refused.exit_code == 2

    down = doctor(manager, client_for(f"http://127.0.0.1:{free_port()}"))
    provider = check(down, "provider")
    assert provider.level == "critical" and provider.detail.startswith("RunningHub unreachable: connection failed")
    assert levels(down) == {**ALL_OK, "provider": "critical"}


@pytest.mark.parametrize(("code", "level"), [(1003, "warning"), (421, "warning"), (806, "critical"),
                                             (1005, "critical"), (None, "critical")])
def test_provider_answers_map_to_levels(make_manager: Callable[..., Any], code: int | None, level: str) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if code is None:
            return httpx.Response(502, text="<html>bad gateway</html>")
        return httpx.Response(200, json={"code": code, "msg": "no", "data": None})

    http = httpx.Client(transport=httpx.MockTransport(answer))
    report = doctor(make_manager(), lambda: RunningHubClient("http://hub.test", API_KEY, http=http))
    provider = check(report, "provider")
    assert provider.level == level and provider.data == {"code": code}
    assert (str(code) if code else "HTTP 502") in provider.detail


def test_a_broken_check_does_not_hide_the_others(make_manager: Callable[..., Any]) -> None:
    def broken() -> Any:
        raise RuntimeError(f"boom with {API_KEY} inside")

    report = doctor(make_manager(), broken)
    provider = check(report, "provider")
    assert provider.level == "critical" and provider.detail == "unexpected RuntimeError: boom with *** inside"
    assert levels(report) == {**ALL_OK, "provider": "critical"}


# --- the database and the schema ---------------------------------------------------------------------


def test_a_dead_postgresql_is_critical_and_the_provider_is_still_checked(
    tmp_path: Path, fake_hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    config = write_config(tmp_path / "aiqueue.toml", fake_hub.base_url)
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{free_port()}/test"
    run = run_cli("--config", str(config), "--db", url, "doctor", "--json")
    assert run.code == 2
    payload = json.loads(run.stdout)
    assert payload["status"] == "critical"
    assert levels(payload) == {**dict.fromkeys(CHECKS, "critical"), "provider": "ok"}
    database = payload["checks"][0]
    assert "cannot use database" in database["detail"] and "s3cret-pw" not in run.stdout
    assert all(c["detail"] == "not checked: the database is unreachable"
               for c in payload["checks"] if c["name"] not in ("database", "provider"))
    assert "s3cret-pw" not in run_cli("--config", str(config), "--db", url, "doctor").stdout


@pytest.mark.parametrize("content", [None, b"this is not a database file, just text" * 100])
def test_a_missing_or_broken_sqlite_file_is_critical(
    tmp_path: Path, fake_hub: Any, monkeypatch: pytest.MonkeyPatch, content: bytes | None
) -> None:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    config = write_config(tmp_path / "aiqueue.toml", fake_hub.base_url)
    database = tmp_path / "queue.db"
    if content is not None:
        database.write_bytes(content)
    run = run_cli("--config", str(config), "--db", f"sqlite:///{database}", "doctor", "--json")
    payload = json.loads(run.stdout)
    assert run.code == 2 and levels(payload)["database"] == "critical" and levels(payload)["provider"] == "ok"
    assert ("does not exist" if content is None else "not a database") in payload["checks"][0]["detail"]
    assert database.exists() == (content is not None)  # the doctor never creates the file


def test_a_database_without_the_schema(tmp_path: Path, backend: str, db_url: str, fake_hub: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    config = write_config(tmp_path / "aiqueue.toml", fake_hub.base_url)
    if backend == "sqlite":
        sqlite3.connect(db_url.removeprefix("sqlite:///")).close()  # an empty database file
    run = run_cli("--config", str(config), "--db", db_url, "doctor", "--json")
    payload = json.loads(run.stdout)
    assert run.code == 2
    assert levels(payload)["database"] == "ok" and levels(payload)["provider"] == "ok"
    schema = payload["checks"][1]
    assert schema["level"] == "critical" and "missing tables" in schema["detail"] and "db init" in schema["detail"]
    assert "aiqueue_jobs" in schema["data"]["missing_tables"]
    assert payload["checks"][3]["detail"] == "not checked: the schema is missing or not current"


def test_a_schema_behind_or_ahead_of_the_code(cli: Callable[..., Run], db_url: str) -> None:
    head = json.loads(cli("doctor", "--json").stdout)["checks"][1]["data"]["head"]
    sql(db_url, f"UPDATE aiqueue_queue_state SET schema_version = {head - 1}")
    schema = json.loads(cli("doctor", "--json").stdout)["checks"][1]
    assert schema["level"] == "critical" and "db upgrade" in schema["detail"]
    assert (schema["data"]["current"], schema["data"]["head"]) == (head - 1, head)
    sql(db_url, f"UPDATE aiqueue_queue_state SET schema_version = {head + 1}")
    run = cli("doctor", "--json")
    assert run.code == 2 and "newer than this aiqueue" in json.loads(run.stdout)["checks"][1]["detail"]


# --- the [doctor] settings -----------------------------------------------------------------------------


def _load(tmp_path: Path, body: str) -> Any:
    path = tmp_path / "doctor.toml"
    path.write_text(body, encoding="utf-8")
    return load_settings(path, env={"HOME": str(tmp_path)})


def test_doctor_thresholds_have_defaults_and_come_from_the_file(tmp_path: Path) -> None:
    defaults = _load(tmp_path, "")
    assert (defaults.queue_age_warning, defaults.queue_age_critical) == (timedelta(minutes=30), timedelta(hours=2))
    assert (defaults.queue_depth_warning, defaults.queue_depth_critical) == (1000, 10000)
    assert defaults.sources["doctor.queue_age_warning"] == "default"
    loaded = _load(tmp_path, THRESHOLDS)
    assert (loaded.queue_age_warning, loaded.queue_depth_critical) == (timedelta(minutes=5), 3)
    assert loaded.sources["doctor.queue_depth_warning"] == "file"


@pytest.mark.parametrize(("body", "key", "words"), [
    ('queue_age_warning = "soon"', "doctor.queue_age_warning", "must be a duration"),
    ("queue_age_critical = -5", "doctor.queue_age_critical", "must be a duration"),
    ("queue_depth_warning = 0", "doctor.queue_depth_warning", "positive integer"),
    ('queue_depth_critical = "10"', "doctor.queue_depth_critical", "positive integer"),
    ("queue_depth_warning = true", "doctor.queue_depth_warning", "positive integer"),
    ("max_queue_age = 5", "doctor.max_queue_age", "not a known key"),
    ('queue_age_warning = "3h"', "doctor.queue_age_warning", "must not exceed doctor.queue_age_critical (10800s > 7200s)"),
    ("queue_depth_critical = 10", "doctor.queue_depth_critical", "must not be below doctor.queue_depth_warning (10 < 1000)"),
])
def test_bad_doctor_thresholds_name_the_key(tmp_path: Path, body: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f"[doctor]\n{body}\n")
    assert caught.value.key == key and words in caught.value.message and "\n" not in caught.value.message

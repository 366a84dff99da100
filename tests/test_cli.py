"""The command-line contract (issue 2): JSON shapes, exit codes, one-line errors on stderr with an
empty stdout, tables without ANSI codes. Through the real entry point on SQLite and PostgreSQL,
with the fake RunningHub on 127.0.0.1; a few subprocess runs for what only a real process shows."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from aiqueue.cli.app import app
from tests.cli_helpers import Run, run_cli
from tests.conftest import API_KEY, write_config

IMG = "image=in.png"
CLI = Callable[..., Run]
EXPECTED_COMMANDS = {
    "db init", "credits grant", "credits balance", "credits ledger", "enqueue", "status",
    "process-next", "finish", "cancel", "cleanup", "refund-audit", "fake-runninghub",
}


@pytest.fixture
def global_options(db_url: str, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, ...]:
    """--config (tools on the fake hub) and --db (the test database), with the hub's API key set and
    nothing in the environment that would force colours or a width."""
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    return ("--config", str(config_file), "--db", db_url)


@pytest.fixture
def cli(global_options: tuple[str, ...]) -> CLI:
    """`aiqueue --config ... --db ... ARGS`, on a database whose schema exists."""

    def run(*args: str, input: bytes | str | None = None) -> Run:
        return run_cli(*global_options, *args, input=input)

    assert run("db", "init").code == 0
    return run


def ok(run: Run) -> Any:
    assert run.code == 0, f"{run.args}: exit {run.code}, stderr {run.stderr!r}"
    return run.json() if "--json" in run.args else run.stdout


STATUS_STATE = ("limit", "paused", "running", "queued", "queued_total", "counts", "oldest_queued_at")


def snapshot(cli: CLI) -> tuple[Any, Any]:
    """The stored state as the CLI shows it (status without its clock-driven fields: ages, now)."""
    status = ok(cli("status", "--json"))
    for job in status["running"] + status["queued"]:
        for key in ("running_seconds", "waiting_seconds", "estimated_start", "estimated_wait_seconds"):
            job.pop(key, None)
    return ok(cli("credits", "ledger", "--json")), {key: status[key] for key in STATUS_STATE}


def fund(cli: CLI, *users: str, amount: int = 100) -> None:
    for user in users:
        ok(cli("credits", "grant", user, str(amount)))


def enqueue(cli: CLI, user: str, *extra: str) -> dict[str, Any]:
    return ok(cli("enqueue", "--user", user, "--tool", "upscale_image", "--input", IMG, *extra, "--json"))["job"]


# --- meta: help, --json, import cost ------------------------------------------------------------


def _leaf_commands() -> dict[str, Any]:
    from typer.main import get_command

    leaves: dict[str, Any] = {}

    def walk(command: Any, path: tuple[str, ...]) -> None:
        children = getattr(command, "commands", None)
        if children:
            for name, child in children.items():
                walk(child, (*path, name))
        else:
            leaves[" ".join(path)] = command

    walk(get_command(app), ())
    return leaves


def test_every_command_has_help_and_json() -> None:
    leaves = _leaf_commands()
    assert EXPECTED_COMMANDS <= set(leaves)
    for path, command in leaves.items():
        assert any("--json" in p.opts for p in command.params), f"{path} has no --json"
        result = run_cli(*path.split(), "--help")
        assert result.code == 0 and result.stderr == "", (path, result)
        assert "--json" in result.stdout and "Usage" in result.stdout


def test_bare_groups_show_help() -> None:
    for args in ([], ["credits"], ["db"]):
        result = run_cli(*args)
        assert result.code == 0 and "Usage" in result.stdout


def _modules_after(*args: str) -> set[str]:
    code = (
        "import sys\nfrom aiqueue.cli.app import main\n"
        f"try:\n    main({list(args)!r})\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write(' '.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "AIQUEUE_DATABASE_URL": "sqlite:////nonexistent/x.db"})
    return set(done.stderr.split())


@pytest.mark.parametrize("args", [["--help"], ["enqueue", "--help"], ["credits", "grant", "alice", "-5"]])
def test_help_and_usage_errors_import_no_database_or_http(args: list[str]) -> None:
    loaded = {m.split(".")[0] for m in _modules_after(*args)}
    assert "aiqueue" in loaded
    assert not loaded & {"sqlmodel", "sqlalchemy", "httpx", "psycopg"}, loaded & {"sqlmodel", "sqlalchemy", "httpx", "psycopg"}


def test_python_m_aiqueue_help_importtime() -> None:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "aiqueue", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Usage" in done.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert not imported & {"sqlmodel", "sqlalchemy", "httpx", "psycopg"}


def test_status_and_balance_do_not_import_httpx(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'q.db'}"
    assert run_cli("--db", db, "db", "init").code == 0
    loaded = {m.split(".")[0] for m in _modules_after("--db", db, "status", "--json")}
    assert "sqlalchemy" in loaded and "httpx" not in loaded


# --- db init and credits ------------------------------------------------------------------------


def test_db_init_is_idempotent(cli: CLI) -> None:
    # The fixture created it; a second time says it was already there.
    again = ok(cli("db", "init", "--json"))
    assert again["created"] is False
    assert "already present" in ok(cli("db", "init"))


def test_grant_balance_ledger_json(cli: CLI) -> None:
    grant = ok(cli("credits", "grant", "alice", "30", "--note", "welcome", "--json"))
    assert grant["user"] == "alice" and grant["balance"] == 30
    assert grant["entry"]["kind"] == "grant" and grant["entry"]["amount"] == 30 and grant["entry"]["note"] == "welcome"
    ok(cli("credits", "grant", "alice", "+12"))
    ok(cli("credits", "grant", "bob", "5"))
    assert ok(cli("credits", "balance", "alice", "--json")) == {"user": "alice", "balance": 42}
    assert ok(cli("credits", "balance", "nobody", "--json")) == {"user": "nobody", "balance": 0}
    entries = ok(cli("credits", "ledger", "--user", "alice", "--json"))["entries"]
    assert [(e["kind"], e["amount"], e["note"]) for e in entries] == [("grant", 30, "welcome"), ("grant", 12, None)]
    first = entries[0]
    assert set(first) == {"id", "user", "job_id", "kind", "amount", "created_at", "note"}
    assert isinstance(first["id"], int) and first["job_id"] is None
    assert datetime.fromisoformat(first["created_at"]).utcoffset() == timedelta(0)
    assert len(ok(cli("credits", "ledger", "--limit", "2", "--json"))["entries"]) == 2
    assert ok(cli("credits", "ledger", "--user", "nobody", "--json")) == {"entries": []}
    table = ok(cli("credits", "ledger"))
    assert "alice" in table and "+30" in table and "welcome" in table


@pytest.mark.parametrize("amount", ["-5", "0", "1.5", "nan", "1e30", "abc", "", "٣", "99999999999999999999"])
def test_bad_grant_amounts_are_usage_errors_and_change_nothing(cli: CLI, amount: str) -> None:
    before = snapshot(cli)
    plain = cli("credits", "grant", "alice", amount)
    assert plain.code == 2 and plain.stdout == ""
    assert plain.stderr.startswith("error: ") and plain.stderr.count("\n") == 1
    error = cli("credits", "grant", "alice", amount, "--json").error()
    assert error["code"] == "usage" and error["exit_code"] == 2
    assert snapshot(cli) == before


# --- enqueue, slots and the FIFO -----------------------------------------------------------------


def test_enqueue_starts_at_once_then_queues_with_exact_positions(cli: CLI, fake_hub: Any) -> None:
    users = ["u1", "u2", "u3", "u4", "u5"]
    fund(cli, *users)
    jobs = [enqueue(cli, user) for user in users]
    for job in jobs[:3]:
        assert job["status"] == "running" and job["position"] is None
        assert isinstance(job["provider_task_id"], str) and job["provider_task_id"].isdigit()
        assert len(job["provider_task_id"]) == 19 and job["provider_task_id"] in fake_hub.tasks
    assert [(j["status"], j["position"]) for j in jobs[3:]] == [("queued", 1), ("queued", 2)]
    assert all(j["provider_task_id"] is None for j in jobs[3:])

    status = ok(cli("status", "--json"))
    assert set(status) >= {"limit", "paused", "running", "queued", "queued_total"}  # issue 4 added keys
    assert status["limit"] == 3 and status["paused"] is False and status["queued_total"] == 2
    assert [j["id"] for j in status["running"]] == [j["id"] for j in jobs[:3]]
    assert [(j["id"], j["position"]) for j in status["queued"]] == [(jobs[3]["id"], 1), (jobs[4]["id"], 2)]
    cut = ok(cli("status", "--limit", "1", "--json"))
    assert len(cut["queued"]) == 1 and cut["queued_total"] == 2
    assert "and 1 more" in ok(cli("status", "--limit", "1"))

    # A full house: process-next has nothing to start.
    nothing = ok(cli("process-next", "--json"))
    assert nothing == {"halted": None, "started": [], "requeued": [], "failed": [], "unknown": [], "expired": [],
                       "finished": []}
    assert len(fake_hub.tasks) == 3


def test_enqueue_json_shape_and_inputs(cli: CLI) -> None:
    fund(cli, "alice")
    result = ok(cli("enqueue", "--user", "alice", "--tool", "upscale_image", "--input", "image=a=b.png",
                    "--input", "scale=4", "--json"))
    job = result["job"]
    assert set(job) >= {"id", "user", "tool", "status", "position", "cost", "inputs", "provider_task_id",
                        "error", "outputs", "created_at", "started_at", "finished_at"}
    assert job["inputs"] == {"image": "a=b.png", "scale": "4"} and job["cost"] == 5 and job["outputs"] == []
    assert [j["id"] for j in result["process"]["started"]] == [job["id"]]
    assert ok(cli("credits", "balance", "alice", "--json"))["balance"] == 95


def test_enqueue_no_start_only_queues(cli: CLI, fake_hub: Any) -> None:
    fund(cli, "alice")
    job = enqueue(cli, "alice", "--no-start")
    assert (job["status"], job["position"]) == ("queued", 1) and fake_hub.tasks == {}
    started = ok(cli("process-next", "--json"))["started"]
    assert [j["id"] for j in started] == [job["id"]] and started[0]["status"] == "running"


# --- refusals: one line, exit code, empty stdout, nothing changed --------------------------------


REFUSALS = [
    # (name, args with {queued}/{running} placeholders, exit code, error code)
    ("unknown tool", ["enqueue", "--user", "alice", "--tool", "nope", "--input", IMG], 4, "unknown_tool"),
    ("missing input", ["enqueue", "--user", "alice", "--tool", "upscale_image"], 2, "bad_input"),
    ("unknown input", ["enqueue", "--user", "alice", "--tool", "upscale_image", "--input", IMG,
                       "--input", "colour=red"], 2, "bad_input"),
    ("malformed input", ["enqueue", "--user", "alice", "--tool", "upscale_image", "--input", "image"], 2, "usage"),
    ("no credits", ["enqueue", "--user", "poor", "--tool", "upscale_image", "--input", IMG], 6, "insufficient_credits"),
    ("active job", ["enqueue", "--user", "busy", "--tool", "upscale_image", "--input", IMG], 5, "active_job"),
    ("negative credits", ["credits", "grant", "alice", "-5"], 2, "usage"),
    ("unknown job", ["status", "999999"], 4, "unknown_job"),
    ("bad job id", ["status", "abc"], 2, "usage"),
    ("cancel unknown job", ["cancel", "999999"], 4, "unknown_job"),
    ("finish unknown job", ["finish", "999999", "--status", "completed"], 4, "unknown_job"),
    ("finish queued job", ["finish", "{queued}", "--status", "completed"], 5, "wrong_state"),
    ("finish failed without error", ["finish", "{running}", "--status", "failed"], 2, "usage"),
    ("finish bad status", ["finish", "{running}", "--status", "done"], 2, "usage"),
    ("finish without job or webhook", ["finish", "--status", "completed"], 2, "usage"),
    ("finish with job and webhook", ["finish", "{running}", "--webhook", "-"], 2, "usage"),
    ("malformed webhook", ["finish", "--webhook", "-"], 9, "invalid_webhook"),
    ("missing webhook file", ["finish", "--webhook", "/nonexistent/body.json"], 2, "usage"),
    ("bad duration", ["cleanup", "--older-than", "soon"], 2, "usage"),
    ("unknown option", ["status", "--colour"], 2, "usage"),
]


@pytest.mark.parametrize("args, code, slug", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_are_one_line_and_change_nothing(cli: CLI, args: list[str], code: int, slug: str) -> None:
    fund(cli, "alice", "busy", "waiting")
    fund(cli, "poor", amount=2)
    running = enqueue(cli, "busy")
    queued = enqueue(cli, "waiting", "--no-start")
    args = [a.format(queued=queued["id"], running=running["id"]) for a in args]
    body = b'{"event": "TASK_END", "taskId": 12'  # cut short: not JSON
    before = snapshot(cli)

    plain = cli(*args, input=body)
    assert plain.code == code, plain
    assert plain.stdout == ""
    assert plain.stderr.startswith("error: ") and plain.stderr.count("\n") == 1, plain.stderr
    assert "Traceback" not in plain.stderr

    error = cli(*args, "--json", input=body).error()
    assert error["code"] == slug and error["exit_code"] == code and error["message"]
    assert snapshot(cli) == before


def test_json_also_works_as_a_global_option(global_options: tuple[str, ...]) -> None:
    assert run_cli("--json", *global_options, "db", "init").json()["created"] is True
    status = run_cli("--json", *global_options, "status")
    assert status.json()["running"] == []
    missing = run_cli("--json", *global_options, "status", "999")
    assert missing.code == 4 and missing.error()["code"] == "unknown_job"


def test_missing_api_key_refuses_before_charging(cli: CLI, monkeypatch: pytest.MonkeyPatch) -> None:
    fund(cli, "alice")
    monkeypatch.delenv("RUNNINGHUB_API_KEY")
    before = snapshot(cli)
    refused = cli("enqueue", "--user", "alice", "--tool", "upscale_image", "--input", IMG)
    assert refused.code == 3 and refused.stdout == ""
    assert refused.stderr == "error: provider.api_key is not set: export RUNNINGHUB_API_KEY or set it in the config\n"
    assert snapshot(cli) == before  # and status/ledger still work without a key


def test_missing_schema_says_run_db_init(tmp_path: Path) -> None:
    result = run_cli("--db", f"sqlite:///{tmp_path / 'empty.db'}", "status", "--json")
    error = result.error()
    assert result.code == 8 and error["code"] == "schema_missing" and "aiqueue db init" in error["message"]


def test_database_password_is_never_printed() -> None:
    result = run_cli("--db", "postgresql://aiq:hunter2secret@127.0.0.1:1/aiq", "status")
    assert result.code == 8 and result.stdout == ""
    assert "hunter2secret" not in result.stderr and result.stderr.startswith("error: ")


def test_bad_config_is_exit_3(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue]\nmax_concurent = 3\n")
    result = run_cli("--config", str(bad), "status")
    assert result.code == 3 and result.stdout == "" and "queue.max_concurent" in result.stderr


def test_unexpected_errors_are_one_line_exit_1_traceback_only_with_debug(
    cli: CLI, global_options: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiqueue.manager import QueueManager

    def boom(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("lost postgresql://aiq:s3cr3t@db.example/aiq\nsecond line")

    monkeypatch.setattr(QueueManager, "status", boom)
    plain = cli("status")
    assert plain.code == 1 and plain.stdout == "" and plain.stderr.count("\n") == 1
    assert "RuntimeError" in plain.stderr and "s3cr3t" not in plain.stderr and "--debug" in plain.stderr
    assert cli("status", "--json").error()["exit_code"] == 1
    traced = run_cli("--debug", *global_options, "status")
    assert traced.code == 1 and "Traceback" in traced.stderr and traced.stdout == ""


def test_config_and_database_from_the_environment(
    global_options: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, config, _, db = global_options
    monkeypatch.setenv("AIQUEUE_CONFIG", config)
    monkeypatch.setenv("AIQUEUE_DATABASE_URL", db)
    assert run_cli("db", "init", "--json").json()["created"] is True
    assert run_cli("credits", "grant", "alice", "7", "--json").json()["balance"] == 7
    job = run_cli("enqueue", "--user", "alice", "--tool", "upscale_image", "--input", IMG, "--json").json()["job"]
    assert job["status"] == "running"  # the tools and the provider came from the config file


def test_process_next_reports_busy_rejected_and_unknown_submits(cli: CLI, fake_hub: Any) -> None:
    fund(cli, "u1", "u2", "u3")
    jobs = [enqueue(cli, user, "--no-start") for user in ("u1", "u2", "u3")]
    fake_hub.script_submits(["busy"])
    busy = ok(cli("process-next", "--json"))
    assert [(j["id"], j["status"], j["position"]) for j in busy["requeued"]] == [(jobs[0]["id"], "queued", 1)]
    assert busy["started"] == [] and busy["failed"] == []
    fake_hub.script_submits(["reject:803", "http500", "accept"])
    mixed = ok(cli("process-next", "--json"))
    assert [j["id"] for j in mixed["failed"]] == [jobs[0]["id"]]
    assert "803" in mixed["failed"][0]["error"]
    assert [(j["id"], j["status"]) for j in mixed["unknown"]] == [(jobs[1]["id"], "starting")]
    assert [j["id"] for j in mixed["started"]] == [jobs[2]["id"]]
    assert ok(cli("credits", "balance", "u1", "--json"))["balance"] == 100  # rejected: refunded
    assert ok(cli("credits", "balance", "u2", "--json"))["balance"] == 95  # unknown: may have run
    table = ok(cli("status"))
    assert "(starting)" in table


# --- finishing: webhooks, operator finish, cancel, cleanup ---------------------------------------


def test_finish_webhooks_from_file_and_stdin(cli: CLI, fake_hub: Any, tmp_path: Path) -> None:
    fund(cli, "alice", "bob")
    done, broken = enqueue(cli, "alice"), enqueue(cli, "bob")

    success = fake_hub.finish_task(done["provider_task_id"], success=True, deliver=False)
    body_file = tmp_path / "success.json"
    body_file.write_bytes(success)
    result = ok(cli("finish", "--webhook", str(body_file), "--json"))
    assert set(result) >= {"job", "changed", "refunded", "message", "started"}
    assert result["changed"] is True and result["refunded"] == 0
    assert result["job"]["status"] == "completed" and result["job"]["outputs"]
    assert all(url.startswith("http") for url in result["job"]["outputs"])

    failure = fake_hub.finish_task(broken["provider_task_id"], success=False, error="CUDA out of memory",
                                   deliver=False)
    result = ok(cli("finish", "--webhook", "-", "--json", input=failure))
    assert result["changed"] is True and result["refunded"] == 5
    assert result["job"]["status"] == "failed" and "CUDA out of memory" in result["job"]["error"]
    assert ok(cli("credits", "balance", "bob", "--json"))["balance"] == 100
    kinds = [e["kind"] for e in ok(cli("credits", "ledger", "--job", str(broken["id"]), "--json"))["entries"]]
    assert kinds == ["charge", "refund"]

    before = snapshot(cli)
    duplicate = ok(cli("finish", "--webhook", "-", "--json", input=failure))
    assert duplicate["changed"] is False and duplicate["refunded"] == 0 and duplicate["job"]["status"] == "failed"
    assert "nothing changed" in ok(cli("finish", "--webhook", str(body_file)))

    stranger = success.replace(done["provider_task_id"].encode(), b"1990000000000009999")
    unknown = ok(cli("finish", "--webhook", "-", "--json", input=stranger))
    assert unknown["job"] is None and unknown["changed"] is False
    assert snapshot(cli) == before


def test_finish_webhook_stdin_through_a_real_process(config_file: Path, fake_hub: Any, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'process.db'}"
    env = {**os.environ, "RUNNINGHUB_API_KEY": API_KEY}
    base = [sys.executable, "-m", "aiqueue", "--config", str(config_file), "--db", db_url]

    def run(*args: str, input: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*base, *args], input=input, capture_output=True, env=env, timeout=60)

    assert run("db", "init").returncode == 0
    assert run("credits", "grant", "alice", "10").returncode == 0
    job = json.loads(run("enqueue", "--user", "alice", "--tool", "upscale_image", "--input", IMG, "--json").stdout)["job"]
    body = fake_hub.finish_task(job["provider_task_id"], success=True, deliver=False)
    finished = run("finish", "--webhook", "-", "--json", input=body)
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout)["job"]["status"] == "completed"
    garbage = run("finish", "--webhook", "-", input=b"\xff\xfe not json")
    assert garbage.returncode == 9 and garbage.stdout == b""
    assert garbage.stderr.decode().startswith("error: ") and garbage.stderr.count(b"\n") == 1


def test_operator_finish(cli: CLI) -> None:
    fund(cli, "alice", "bob")
    done, broken = enqueue(cli, "alice"), enqueue(cli, "bob")
    completed = ok(cli("finish", str(done["id"]), "--status", "completed", "--output", "https://cdn.example/a.png",
                       "--json"))
    assert completed["job"]["status"] == "completed" and completed["job"]["outputs"] == ["https://cdn.example/a.png"]
    failed = ok(cli("finish", str(broken["id"]), "--status", "failed", "--error", "node 7: bad input", "--json"))
    assert failed["job"]["error"] == "node 7: bad input" and failed["refunded"] == 5
    again = ok(cli("finish", str(done["id"]), "--status", "completed", "--json"))
    assert again["changed"] is False


def test_finish_frees_the_slot_for_the_next_job(cli: CLI, fake_hub: Any) -> None:
    users = ["u1", "u2", "u3", "u4"]
    fund(cli, *users)
    jobs = [enqueue(cli, user) for user in users]
    assert jobs[3]["status"] == "queued"
    body = fake_hub.finish_task(jobs[0]["provider_task_id"], success=True, deliver=False)
    result = ok(cli("finish", "--webhook", "-", "--json", input=body))
    assert [j["id"] for j in result["started"]] == [jobs[3]["id"]]


def test_cancel_refunds(cli: CLI, fake_hub: Any) -> None:
    fund(cli, "alice", "bob")
    running, queued = enqueue(cli, "alice"), enqueue(cli, "bob", "--no-start")
    result = ok(cli("cancel", str(running["id"]), "--reason", "user asked", "--json"))
    assert result["changed"] is True and result["refunded"] == 5 and result["job"]["status"] == "cancelled"
    assert fake_hub.tasks[running["provider_task_id"]].cancelled
    assert ok(cli("credits", "balance", "alice", "--json"))["balance"] == 100
    # The freed slot went to bob's queued job.
    assert [j["id"] for j in result["started"]] == [queued["id"]]
    again = ok(cli("cancel", str(running["id"]), "--json"))
    assert again["changed"] is False and again["refunded"] == 0
    assert ok(cli("credits", "balance", "alice", "--json"))["balance"] == 100
    assert "nothing changed" in ok(cli("cancel", str(running["id"])))


def test_cancel_a_queued_job(cli: CLI) -> None:
    fund(cli, "alice")
    queued = enqueue(cli, "alice", "--no-start")
    result = ok(cli("cancel", str(queued["id"]), "--json"))
    assert result["job"]["status"] == "cancelled" and result["refunded"] == 5
    assert ok(cli("status", "--json"))["queued"] == []


def _start_in_the_past(db_url: str, job_id: int, minutes: int) -> None:
    from sqlalchemy import update

    from aiqueue.store import Store
    from aiqueue.store.tables import jobs

    store = Store(db_url)
    past = datetime.now(timezone.utc) - timedelta(minutes=minutes)
    try:
        store.run(lambda tx: tx.conn.execute(update(jobs).where(jobs.c.id == job_id).values(started_at=past)))
    finally:
        store.dispose()


def test_cleanup_older_than(cli: CLI, db_url: str) -> None:
    fund(cli, "alice", "bob")
    old, fresh = enqueue(cli, "alice"), enqueue(cli, "bob")
    _start_in_the_past(db_url, old["id"], minutes=30)
    assert ok(cli("cleanup", "--older-than", "1h", "--json"))["expired"] == []
    result = ok(cli("cleanup", "--older-than", "20m", "--json"))
    assert set(result) >= {"expired", "completed", "failed", "started"}
    assert [j["id"] for j in result["expired"]] == [old["id"]]
    ended = result["expired"][0]
    assert ended["status"] == "failed" and "timed out after" in ended["error"]
    assert ok(cli("credits", "balance", "alice", "--json"))["balance"] == 100
    status = ok(cli("status", "--json"))
    assert [j["id"] for j in status["running"]] == [fresh["id"]]
    assert "nothing to clean up" in ok(cli("cleanup"))


def test_refund_audit_clean_exit_0_problems_exit_10(cli: CLI, db_url: str) -> None:
    fund(cli, "alice")
    job = enqueue(cli, "alice")
    ok(cli("cancel", str(job["id"])))
    assert ok(cli("refund-audit", "--json")) == {"ok": True, "problems": [], "fixed": [], "dry_run": False, "would_fix": []}
    assert "clean" in ok(cli("refund-audit"))

    from sqlalchemy import delete

    from aiqueue.store import Store
    from aiqueue.store.tables import ledger

    store = Store(db_url)
    try:
        store.run(lambda tx: tx.conn.execute(delete(ledger).where(ledger.c.job_id == job["id"], ledger.c.kind == "refund")))
    finally:
        store.dispose()
    found = cli("refund-audit", "--json")
    assert found.code == 10
    report = json.loads(found.stdout)
    assert report["ok"] is False and {p["kind"] for p in report["problems"]} >= {"missing_refund"}
    assert cli("refund-audit").code == 10
    fixed = cli("refund-audit", "--fix", "--json")
    assert fixed.code == 0 and json.loads(fixed.stdout)["ok"] is True and json.loads(fixed.stdout)["fixed"]
    assert ok(cli("refund-audit", "--fix", "--json"))["fixed"] == []


# --- tables ---------------------------------------------------------------------------------------


def test_empty_queue_status(cli: CLI) -> None:
    empty = ok(cli("status", "--json"))
    assert {k: empty[k] for k in ("limit", "paused", "running", "queued", "queued_total")} == {
        "limit": 3, "paused": False, "running": [], "queued": [], "queued_total": 0}
    table = ok(cli("status"))
    assert "Running slots" in table and "Queue" in table
    assert ok(cli("process-next", "--json"))["started"] == []
    assert ok(cli("credits", "ledger", "--json")) == {"entries": []}


def test_tables_are_plain_text_at_80_columns(cli: CLI, fake_hub: Any) -> None:
    fund(cli, "alice", "[bold]mallory[/bold]", "carol", "dave")
    job = enqueue(cli, "alice")
    odd = ok(cli("enqueue", "--user", "[bold]mallory[/bold]", "--tool", "upscale_image", "--input",
                 "image=[red]red[/red]", "--json"))["job"]
    enqueue(cli, "carol")
    enqueue(cli, "dave")
    outputs = [ok(cli(*args)) for args in (
        ["status"], ["status", str(job["id"])], ["credits", "ledger"], ["credits", "balance", "alice"],
        ["process-next"], ["refund-audit"], ["status", str(odd["id"])],
    )]
    for text in outputs:
        assert "\x1b" not in text
        assert max(len(line) for line in text.splitlines()) <= 80
    assert "[bold]mallory[/bold]" in outputs[-1]  # shown as typed, not as markup
    assert "[red]red[/red]" in outputs[-1]  # markup in an input is shown, not applied
    refused = cli("enqueue", "--user", "erin", "--tool", "upscale_image", "--input", "image=\x1b[31mred")
    assert refused.code == 2 and "control characters" in refused.stderr  # never stored
    for word in ("slot", "job", "user", "tool", "provider task", "running for", "position", "waiting for"):
        assert word in outputs[0]


# --- fake-runninghub --------------------------------------------------------------------------------


def test_fake_runninghub_serves_until_ctrl_c() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "aiqueue", "fake-runninghub", "--json", "--api-key", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "no base URL within 30 s"
        assert proc.stdout is not None
        base_url = json.loads(proc.stdout.readline())["base_url"]
        assert base_url.startswith("http://127.0.0.1:")
        request = urllib.request.Request(base_url + "/task/openapi/status", data=b'{"apiKey": "k", "taskId": "1"}',
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert "code" in json.loads(answer.read())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_fake_runninghub_port_in_use_is_a_usage_error(fake_hub: Any) -> None:
    result = run_cli("fake-runninghub", "--port", str(fake_hub.port))
    assert result.code == 2 and result.stdout == "" and result.stderr.startswith("error: cannot listen")


def test_config_written_by_tests_is_usable(tmp_path: Path) -> None:
    # The helper the fixtures use writes a config the CLI accepts (guards the fixtures themselves).
    path = write_config(tmp_path / "c.toml", "http://127.0.0.1:9")
    result = run_cli("--config", str(path), "--db", f"sqlite:///{tmp_path / 'c.db'}", "db", "init", "--json")
    assert result.json()["created"] is True

"""What a fresh user met at the command line: a closed pipe, doctor's usage errors, numbers cut on
narrow terminals, duration and --status messages, `config init` onto a file, completion of
--status, flags shown as taking a value, plurals, the doctor thresholds in `config show`, an
enqueue that could not reach RunningHub, the SQLite file's mode, the demo's deleted database,
a watch over a deleted file, and user ids that only look alike. Real CLI runs, both backends where
a database is involved."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.main import get_command

from aiqueue.cli.app import app
from aiqueue.domain import Status
from tests.cli_helpers import Run, run_cli
from tests.conftest import API_KEY, write_config

IMG = ["--input", "image=api/in.png"]


@pytest.fixture
def cli(db_url: str, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    monkeypatch.setenv("COLUMNS", "80")
    assert run_cli("--config", str(config_file), "--db", db_url, "db", "init").code == 0

    def run(*args: str) -> Run:
        return run_cli("--config", str(config_file), "--db", db_url, *args)

    return run


def aiqueue(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiqueue", *args], text=True, timeout=60, check=False,
                          env={**os.environ, **(env or {})}, **kwargs)


# --- 1. a reader that went away: exit 141, silently ----------------------------------------------


def test_a_closed_pipe_exits_141_silently(cli: Any, db_url: str, config_file: Path) -> None:
    assert cli("credits", "grant", "alice", "100").code == 0
    assert cli("enqueue", "--user", "alice", "--tool", "upscale_image", *IMG, "--no-start").code == 0
    read, write = os.pipe()
    os.close(read)  # `| head` that has already gone: the first write meets EPIPE
    try:
        for args in (["jobs", "--jsonl"], ["jobs"], ["status", "--json"], ["--help"]):
            run = aiqueue("--config", str(config_file), "--db", db_url, *args, stdout=write,
                          stderr=subprocess.PIPE, env={"RUNNINGHUB_API_KEY": API_KEY})
            assert (run.returncode, run.stderr) == (141, ""), args
    finally:
        os.close(write)


# --- 2. doctor: usage errors are UNKNOWN (3), not CRITICAL (2) -------------------------------------


@pytest.mark.parametrize("args", [["--skip", "bogus"], ["--skip"], ["--bogus"], ["extra"], ["--json=1"]])
def test_doctor_usage_errors_exit_3(args: list[str], tmp_path: Path) -> None:
    run = run_cli("--db", f"sqlite:///{tmp_path / 'none.db'}", "doctor", *args)
    assert run.code == 3 and run.stdout == "" and run.stderr.startswith("error: ")
    assert "aiqueue doctor --help" in run.stderr
    as_json = run_cli("--db", f"sqlite:///{tmp_path / 'none.db'}", "doctor", *args, "--json")
    assert as_json.code == 3 and as_json.error()["exit_code"] == 3 and as_json.error()["code"] == "usage"
    assert not (tmp_path / "none.db").exists()  # refused before any connection
    assert run_cli("jobs", *args).code == 2  # every other command: usage errors stay 2


# --- 3. ids and numbers are never cut on a narrow terminal ---------------------------------------


def first_cells(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def test_narrow_terminals_never_show_a_wrong_number(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(13):
        assert cli("credits", "grant", f"u{n}", "100").code == 0
        assert cli("enqueue", "--user", f"u{n}", "--tool", "upscale_image", *IMG, "--no-start").code == 0
    monkeypatch.setenv("COLUMNS", "10")
    listed = cli("jobs", "--limit", "2")
    assert listed.code == 0
    cells = first_cells(listed.stdout)
    assert "13" in cells and "12" in cells and "1" not in cells, listed.stdout
    monkeypatch.setenv("COLUMNS", "30")
    status = cli("status", "--limit", "12")
    rows = [line.split() for line in status.stdout.splitlines() if re.match(r"^\s+\d+\s+\d+\s", line)]
    assert [(r[0], r[1]) for r in rows] == [(str(n), str(n)) for n in range(1, 13)], status.stdout  # position, job
    monkeypatch.setenv("COLUMNS", "20")
    ledger = cli("credits", "ledger", "--user", "u12")
    assert "+100" in ledger.stdout.split() and "-5" in ledger.stdout.split(), ledger.stdout
    assert "13" in ledger.stdout.split()  # the charge's job id


# --- 4. durations too long, --status naming nothing ----------------------------------------------


def test_duration_overflow_says_too_long_and_empty_status_is_refused(cli: Any) -> None:
    long = cli("cleanup", "--older-than", "99999999999d")
    assert long.code == 2 and "too long" in long.stderr and "positive" not in long.stderr
    assert "too long" in cli("cleanup", "--older-than", "3651d").stderr
    zero = cli("cleanup", "--older-than", "0s")
    assert zero.code == 2 and "must be positive" in zero.stderr
    assert cli("cleanup", "--older-than", "3650d", "--dry-run").code == 0  # ten years is still fine
    for empty in ("", ",", " , "):
        run = cli("jobs", "--status", empty)
        assert run.code == 2 and run.stdout == "" and "names no status" in run.stderr, empty
    assert cli("jobs", "--status", "queued,", "--json").code == 0  # a trailing comma still names one


# --- 5. config init onto a file: a conflict -----------------------------------------------------


def test_config_init_onto_an_existing_file_is_a_conflict(tmp_path: Path) -> None:
    target = tmp_path / "aiqueue.toml"
    assert run_cli("config", "init", str(target)).code == 0
    again = run_cli("config", "init", str(target), "--json")
    assert again.code == 5 and again.error()["code"] == "conflict" and "--force" in again.error()["message"]


# --- 6. completion of --status and doctor --skip -------------------------------------------------


def complete(*words: str) -> list[str]:
    line = ["aiqueue", *words]
    run = aiqueue(env={"_AIQUEUE_COMPLETE": "complete_bash", "COMP_WORDS": " ".join(line),
                       "COMP_CWORD": str(len(line) - 1)}, capture_output=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_status_and_skip_complete_their_values() -> None:
    from aiqueue.cli.completions import STATUSES

    assert STATUSES == tuple(s.value for s in Status)
    assert complete("jobs", "--status", "") == list(STATUSES)
    assert complete("jobs", "--status", "c") == ["completed", "cancelled"]
    assert complete("jobs", "--status", "queued,r") == ["queued,running"]
    assert complete("doctor", "--skip", "queue") == ["queue_age", "queue_depth"]


# --- 7. help: flags take no value, arguments read as typed ---------------------------------------


def leaves(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        return [path]
    return [p for name, sub in sorted(subcommands.items()) for p in leaves(sub, (*path, name))]


def test_help_shows_flags_without_a_type_and_arguments_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    paths = [(), ("db",), ("credits",), ("config",), *leaves(get_command(app))]
    for path in paths:
        run = run_cli(*path, "--help")
        usage = next(line for line in run.stdout.splitlines() if "Usage:" in line)
        assert run.code == 0 and "<bool>" not in run.stdout and "{" not in usage and "[[" not in usage, path
    top = run_cli("--help").stdout
    assert re.search(r"--json\s+Print the result as JSON", top) and "--quiet" in top
    status = run_cli("status", "--help").stdout
    assert re.search(r"--watch\s+Refresh live", status) and re.search(r"--limit\s+N \[1<=x<=1000000\]", status)
    assert "Usage: aiqueue cancel [OPTIONS] JOB_ID" in run_cli("cancel", "--help").stdout
    assert re.search(r"Usage: aiqueue config init \[OPTIONS\] \[PATH\]\s", run_cli("config", "init", "--help").stdout)
    assert "status [OPTIONS] [JOB_ID]" in status


# --- 8. config check's plural, config show's doctor thresholds -----------------------------------


def test_config_check_plural_and_show_lists_the_doctor_thresholds(tmp_path: Path) -> None:
    two = write_config(tmp_path / "two.toml", "http://127.0.0.1:9",
                       extra='\n[doctor]\nqueue_depth_warning = 7\nqueue_age_critical = "3h"\n')
    assert "; 2 tools;" in run_cli("--config", str(two), "config", "check").stdout
    one = tmp_path / "one.toml"
    one.write_text(two.read_text().split("[tools.upscale_video]")[0])
    one.chmod(0o600)
    assert "; 1 tool;" in run_cli("--config", str(one), "config", "check").stdout
    shown = run_cli("--config", str(two), "config", "show").stdout
    rows = {line.split()[0]: line.split()[1:] for line in shown.splitlines() if line.strip().startswith("doctor.")}
    assert rows == {"doctor.queue_age_warning": ["1800s", "default"], "doctor.queue_age_critical": ["10800s", "file"],
                    "doctor.queue_depth_warning": ["7", "file"], "doctor.queue_depth_critical": ["10000", "default"]}


# --- 9. an enqueue that could not reach RunningHub says so ---------------------------------------


def test_enqueue_warns_when_runninghub_is_not_reached(db_url: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    config = str(write_config(tmp_path / "down.toml", "http://127.0.0.1:1"))

    def run(*args: str) -> Run:
        return run_cli("--config", config, "--db", db_url, *args)

    assert run("db", "init").code == 0 and run("credits", "grant", "alice", "100").code == 0
    enqueued = run("enqueue", "--user", "alice", "--tool", "upscale_image", *IMG)
    assert enqueued.code == 0 and "queued at position 1" in enqueued.stdout
    warning = [line for line in enqueued.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "RunningHub did not start" in warning[0] and "onnection" in warning[0]
    assert "job 1 stays queued at position 1" in warning[0] and "aiqueue process-next" in warning[0]
    assert run("credits", "grant", "bob", "100").code == 0
    quiet = run("-q", "enqueue", "--user", "bob", "--tool", "upscale_image", *IMG, "--json")
    assert quiet.code == 0 and json.loads(quiet.stdout)["job"]["status"] == "queued"
    # The fill stops at the first job RunningHub did not take: bob's job 2 waits behind job 1.
    assert "warning: RunningHub did not start" in quiet.stderr and "job 1 stays queued" in quiet.stderr
    processed = run("-q", "process-next")
    assert processed.code == 0 and "warning: RunningHub did not start" in processed.stderr
    assert run("--json", "status").json()["queued_total"] == 2
    from aiqueue.cli.common import requeued_warning

    two = [SimpleNamespace(id=3, position=1, error="not started yet: busy"), SimpleNamespace(id=4, position=2, error=None)]
    assert requeued_warning(two) == ("warning: RunningHub did not start a job (busy): jobs 3, 4 stay queued in their "
                                     "places; `aiqueue process-next` retries")


# --- 10. the SQLite file is private; the demo's deleted database is null -------------------------


def test_db_init_creates_the_sqlite_file_0600(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "q.db"
    assert run_cli("--db", f"sqlite:///{db}", "db", "init").code == 0
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert run_cli("--db", f"sqlite:///{db}", "credits", "grant", "alice", "5").code == 0
    import sqlite3

    conn = sqlite3.connect(db)  # WAL (persistent in the file): a write while open keeps -wal/-shm
    try:
        conn.execute("CREATE TABLE probe (x)")
        conn.commit()
        for sidecar in (Path(f"{db}-wal"), Path(f"{db}-shm")):
            assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600, sidecar  # SQLite copies the file's mode
    finally:
        conn.close()
    db.chmod(0o640)  # an existing database keeps the mode its owner chose
    assert run_cli("--db", f"sqlite:///{db}", "db", "init").code == 0
    assert stat.S_IMODE(db.stat().st_mode) == 0o640


def test_demo_json_reports_no_deleted_database() -> None:
    run = aiqueue("demo", "--json", capture_output=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["database"] is None


# --- 11. a watch over a deleted SQLite file stops with exit 8 --------------------------------------


def test_watch_stops_when_the_sqlite_file_is_deleted(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    assert run_cli("--db", f"sqlite:///{db}", "db", "init").code == 0
    proc = subprocess.Popen([sys.executable, "-m", "aiqueue", "--db", f"sqlite:///{db}", "status", "--watch",
                             "--json", "--interval", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["queued_total"] == 0  # watching
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            path.unlink(missing_ok=True)
        _out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 8
    assert json.loads(err)["error"]["message"] == f"database file {db} does not exist: run `aiqueue db init`"
    one_shot = run_cli("--db", f"sqlite:///{db}", "status", "--json")
    assert one_shot.code == 8 and one_shot.error()["message"] == json.loads(err)["error"]["message"]


# --- user ids that only look alike ---------------------------------------------------------------


def test_user_ids_must_be_nfkc(cli: Any) -> None:
    refused = cli("credits", "grant", "\uff35\uff53\uff45\uff52", "10")  # full-width "User"
    assert refused.code == 2 and refused.stdout == "" and "NFKC" in refused.stderr and "'User'" in refused.stderr
    assert cli("credits", "ledger", "--json").json() == {"entries": []}  # nothing changed
    assert cli("credits", "grant", "User", "10").code == 0
    assert cli("credits", "grant", "café", "10").code == 0  # composed é is NFKC already
    assert cli("credits", "grant", "cafe\u0301", "10").code == 2  # e + combining accent is not

"""What cron and an operator in a hurry rely on (issue 4, "Control"), on SQLite and PostgreSQL:

- `--quiet` prints nothing when nothing changed (the exit code tells), and still prints a
  change, a problem or an error;
- `refund-audit --fix --dry-run` names what `--fix` would repair and changes no row;
- the progress bar of a long operation is drawn on a terminal's stderr only.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import Run, run_cli
from tests.conftest import API_KEY
from tests.test_cli import _start_in_the_past as start_in_the_past
from tests.test_tampering import dump, named, sql

CLI = Callable[..., Run]


@pytest.fixture
def cli(db_url: str, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> CLI:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)

    def run(*args: str) -> Run:
        return run_cli("--config", str(config_file), "--db", db_url, *args)

    assert run("db", "init").code == 0
    return run


def test_quiet_says_nothing_when_nothing_changed(cli: CLI) -> None:
    for args in (["cleanup"], ["process-next"], ["refund-audit"], ["refund-audit", "--fix"], ["status"],
                 ["cleanup", "--json"], ["pause"]):
        run = cli("-q", *args)
        assert run.code == 0, (args, run.stderr)
        if args == ["pause"]:  # pausing changed something: said even under --quiet
            assert "paused" in run.stdout
            assert cli("-q", "pause").stdout == ""  # already paused: nothing changed
            assert cli("-q", "resume").code == 0
            continue
        assert (run.stdout, run.stderr) == ("", ""), args


def test_quiet_still_says_what_changed_and_what_failed(cli: CLI, db_url: str) -> None:
    assert cli("-q", "credits", "grant", "alice", "50").stdout != ""
    run = cli("-q", "enqueue", "--user", "alice", "--tool", "upscale_image", "--input", "image=a.png", "--json")
    job = run.json()["job"]
    start_in_the_past(db_url, job["id"], minutes=30)
    cleaned = cli("-q", "cleanup", "--json")
    assert [j["id"] for j in cleaned.json()["expired"]] == [job["id"]]
    # A problem is said, with its exit code.
    sql(db_url, "DELETE FROM aiqueue_ledger WHERE job_id = :id AND kind = 'refund'", id=job["id"])
    audit = cli("-q", "refund-audit")
    assert audit.code == 10 and "missing_refund" in audit.stdout
    # An error is always said.
    bad = cli("-q", "cancel", "999999")
    assert bad.code == 4 and bad.stderr.startswith("error: ")


def test_fix_dry_run_names_the_repairs_and_changes_nothing(cli: CLI, manager: Any, db_url: str) -> None:
    manager.grant("alice", 100)
    manager.grant("bob", 100)
    alice = manager.enqueue("alice", "upscale_image", {"image": "a.png"}).job.id
    bob = manager.enqueue("bob", "upscale_image", {"image": "b.png"}).job.id
    manager.cancel(alice)
    manager.finish(bob, "completed")
    sql(db_url, "DELETE FROM aiqueue_ledger WHERE job_id = :id AND kind = 'refund'", id=alice)
    sql(db_url, "UPDATE aiqueue_accounts SET balance = balance + 7 WHERE user_id = 'bob'")
    before = dump(db_url)

    run = cli("refund-audit", "--fix", "--dry-run", "--json")
    assert run.code == 10  # the problems are still there
    report = json.loads(run.stdout)
    assert report["dry_run"] is True and report["fixed"] == []
    # The deleted refund also leaves alice's cached balance above her ledger's sum.
    assert named(report, "would_fix") == {("missing_refund", alice, "alice"), ("balance_mismatch", None, "alice"),
                                          ("balance_mismatch", None, "bob")}
    assert dump(db_url) == before  # not one row changed
    table = cli("refund-audit", "--fix", "--dry-run")
    assert "would repair" in table.stdout and "nothing changed" in table.stdout

    fixed = cli("refund-audit", "--fix", "--json")
    assert fixed.code == 0
    assert named(fixed.json(), "fixed") == named(report, "would_fix")


def test_dry_run_without_fix_is_a_usage_error(cli: CLI) -> None:
    run = cli("refund-audit", "--dry-run")
    assert run.code == 2 and "--dry-run goes with --fix" in run.stderr


PROGRESS_SCRIPT = """
import sys, time
from aiqueue.cli.common import progress
with progress("refund audit") as tick:
    for done in range(1, 6):
        tick(done, 5)
        time.sleep(0.15)
print("done", file=sys.stdout)
"""


def test_progress_is_drawn_on_a_terminal_only() -> None:
    # On a pseudo-terminal: the bar shows its count.
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "80", "TERM": "xterm"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-c", PROGRESS_SCRIPT], stdin=slave, stdout=subprocess.PIPE,
                            stderr=slave, env=env)
    os.close(slave)
    drawn = b""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
        elif proc.poll() is not None:
            break
    out, _ = proc.communicate(timeout=20)
    os.close(master)
    assert proc.returncode == 0 and out == b"done\n"
    assert b"refund audit" in drawn and b"/5" in drawn

    # Not a terminal (cron, a pipe): not one byte on stderr.
    piped = subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT], capture_output=True, env=env, timeout=20)
    assert piped.returncode == 0 and piped.stderr == b"" and piped.stdout == b"done\n"

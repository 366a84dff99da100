"""pause / resume: stored in the database; while paused nothing new is submitted, queued jobs
keep their places, running ones finish normally; status shows it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from aiqueue.domain import Status
from tests.conftest import API_KEY
from tests.invariants import check_invariants

IMG = {"image": "api/in.png"}


def test_pause_keeps_places_and_lets_running_jobs_finish(make_manager: Any, fake_hub: Any) -> None:
    operator, other_machine = make_manager(), make_manager()
    for user in "abcd":
        operator.grant(user, 50)
    running = operator.enqueue("a", "upscale_image", IMG).job
    assert running.status is Status.RUNNING
    paused = operator.pause()
    assert paused.paused and paused.changed and not operator.pause().changed
    assert other_machine.status().paused  # in the database, for every machine
    queued = [other_machine.enqueue(u, "upscale_image", IMG).job for u in "bcd"]
    assert [j.status for j in queued] == [Status.QUEUED] * 3  # nothing new is submitted
    assert other_machine.process_next().started == []
    done = other_machine.finish(running.id, "completed")  # running jobs finish normally
    assert done.changed and done.process.started == []
    assert [(j.id, j.position) for j in operator.status().queued] == [(j.id, i) for i, j in enumerate(queued, 1)]
    submits = [r for r in fake_hub.requests if r["path"] == "/task/openapi/ai-app/run"]
    assert len(submits) == 1
    resumed = other_machine.resume()
    assert not resumed.paused and resumed.changed
    assert [j.id for j in resumed.process.started] == [j.id for j in queued]  # FIFO, at once
    assert not operator.status().paused
    assert check_invariants(operator.store.url, 3) == []


def test_pause_and_resume_through_the_cli(db_url: str, config_file: Any) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "aiqueue", "--config", str(config_file), "--db", db_url, *args],
                              capture_output=True, text=True, timeout=60,
                              env={"RUNNINGHUB_API_KEY": API_KEY, "PATH": "/usr/bin:/bin"})

    assert cli("db", "init").returncode == 0
    first = cli("pause", "--json")
    assert first.returncode == 0 and json.loads(first.stdout) == {"paused": True, "changed": True, "started": []}
    assert json.loads(cli("status", "--json").stdout)["paused"] is True
    assert "paused" in cli("status").stdout
    again = cli("pause")
    assert again.returncode == 0 and "already" in again.stdout
    back = cli("resume", "--json")
    assert back.returncode == 0 and json.loads(back.stdout)["paused"] is False
    assert json.loads(cli("status", "--json").stdout)["paused"] is False

"""`status --watch`: wakes on LISTEN/NOTIFY on PostgreSQL (every state change notifies in its own
transaction), polls on SQLite, and ends on Ctrl-C with exit 0. Through real `python -m aiqueue`
processes, with the changes made by this (other) process."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, make_pg_schema_url

IMG = {"image": "api/in.png"}


class Watcher:
    """A running `aiqueue status --watch ...` whose stdout is read line by line with a timeout."""

    def __init__(self, config: Path, db_url: str, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIQUEUE_", "RUNNINGHUB_"))}
        env.update({"RUNNINGHUB_API_KEY": API_KEY, "COLUMNS": "80"})
        for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aiqueue", "--config", str(config), "--db", db_url, "status", "--watch", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.buffer = b""

    def line(self, timeout: float) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)  # type: ignore[no-any-return]

    def interrupt(self) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=20)
        return self.proc.returncode, (self.buffer + out).decode(), err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def watcher(config_file: Path, db_url: str, make_manager: Any) -> Any:
    started: list[Watcher] = []
    make_manager()  # the schema exists before the watcher starts

    def start(*args: str) -> Watcher:
        started.append(Watcher(config_file, db_url, *args))
        return started[-1]

    yield start
    for one in started:
        one.kill()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_postgres_watch_wakes_on_notify_well_before_its_interval(watcher: Any, make_manager: Any) -> None:
    manager = make_manager()
    for user in ("alice", "bob"):
        manager.grant(user, 100)
    watch = watcher("--json", "--interval", "30", "--window", "30d")  # our clock is frozen days ago
    first = watch.line(timeout=30)
    assert first is not None and first["queued_total"] == 0 and first["paused"] is False

    began = time.monotonic()
    job = manager.enqueue("alice", "upscale_image", IMG, start=False).job
    seen = watch.line(timeout=10)
    took = time.monotonic() - began
    assert seen is not None and [j["id"] for j in seen["queued"]] == [job.id], seen
    assert took < 3, f"the change took {took:.2f}s to show (interval 30s): NOTIFY did not wake the watcher"

    manager.pause()
    paused = watch.line(timeout=3)
    assert paused is not None and paused["paused"] is True
    manager.cancel(job.id)
    cancelled = watch.line(timeout=3)
    assert cancelled is not None and cancelled["queued"] == [] and cancelled["counts"]["cancelled"] == 1
    assert watch.line(timeout=1) is None  # no change, no line

    code, rest, err = watch.interrupt()
    assert code == 0 and err == "" and rest.strip() == ""


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_postgres_live_table_redraws_on_notify_and_ctrl_c_exits_0(watcher: Any, make_manager: Any) -> None:
    manager = make_manager()
    manager.grant("carol", 100)
    watch = watcher("--interval", "30")
    time.sleep(4)  # let it start and draw its first frame (an empty queue)
    manager.enqueue("carol", "upscale_image", IMG, start=False)
    time.sleep(2)
    code, out, err = watch.interrupt()
    # Off a terminal, rich Live prints only its last frame when it stops: carol is in it only if
    # the NOTIFY woke the watcher (its interval of 30s never came).
    assert code == 0 and err == "", err
    assert "carol" in out and "Queue: 1 waiting" in out and "Ctrl-C to quit" in out
    assert max(len(line) for line in out.splitlines()) <= 80


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_sqlite_watch_polls_at_its_interval(watcher: Any, make_manager: Any) -> None:
    manager = make_manager()
    manager.grant("dave", 100)
    watch = watcher("--json", "--interval", "0.3")
    assert watch.line(timeout=30) is not None
    manager.enqueue("dave", "upscale_image", IMG, start=False)
    seen = watch.line(timeout=5)
    assert seen is not None and seen["queued_total"] == 1
    code, _, err = watch.interrupt()
    assert code == 0 and err == ""


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_watch_a_user(watcher: Any, make_manager: Any) -> None:
    manager = make_manager()
    manager.grant("erin", 100)
    watch = watcher("--user", "erin", "--json", "--interval", "0.3")
    first = watch.line(timeout=30)
    assert first is not None and first["user"] == "erin" and first["active"] is None
    job = manager.enqueue("erin", "upscale_image", IMG, start=False).job
    seen = watch.line(timeout=5)
    assert seen is not None and seen["active"]["id"] == job.id and seen["active"]["position"] == 1
    assert watch.interrupt()[0] == 0


def test_watch_refuses_what_it_cannot_watch(db_url: str, config_file: Path) -> None:
    from tests.cli_helpers import run_cli

    for args in (["status", "1", "--watch"], ["status", "--unmatched", "--watch"]):
        result = run_cli("--config", str(config_file), "--db", db_url, *args)
        assert result.code == 2 and result.stdout == "" and "--watch" in result.stderr


# --- NOTIFY itself -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_every_state_change_notifies_once_committed(make_manager: Any, db_url: str) -> None:
    manager = make_manager()
    listener = manager.listen()
    other_url, drop = make_pg_schema_url()  # another aiqueue in another schema of the same database
    try:
        assert listener.wait(0.2) is False
        manager.grant("frank", 100)
        assert listener.wait(0.3) is False  # credits are not a queue state change
        job = manager.enqueue("frank", "upscale_image", IMG, start=False).job
        assert listener.wait(2) is True
        manager.pause()
        assert listener.wait(2) is True
        manager.pause()  # already paused: nothing changed, nothing said
        assert listener.wait(0.3) is False
        manager.cancel(job.id)
        assert listener.wait(2) is True

        def rolled_back(tx: Any) -> None:
            from datetime import datetime

            tx.insert_job("ghost", "upscale_image", 5, {}, datetime.now(UTC))
            raise RuntimeError("roll back")

        with pytest.raises(RuntimeError):
            manager.store.run(rolled_back)
        assert listener.wait(0.5) is False  # a change that never committed is never heard

        from aiqueue.settings import load_settings
        from aiqueue.store import Store

        other = Store(load_settings(None, db_url=other_url, env={}).database_url)
        try:
            other.init_schema()
            other.run(lambda tx: tx.set_paused(True))
            assert listener.wait(0.5) is False  # the other schema's queue is not ours
        finally:
            other.dispose()
    finally:
        listener.close()
        drop()

"""Long-running processes survive a dropped PostgreSQL connection: `status --watch` reconnects (its
LISTEN connection and its engine) with a backoff and redraws at once; `webhook serve` checks a pooled
connection before use, so the first webhook after a drop is applied, not refused. Real processes.

Only this test's own backends are terminated: every process under test connects with a unique
application_name, and pg_terminate_backend picks those alone (others share this server)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from aiqueue.domain import Status
from aiqueue.manager import QueueManager
from aiqueue.settings import load_settings
from aiqueue.store import Store
from tests.conftest import API_KEY, PG_URL
from tests.invariants import check_invariants
from tests.test_receiver import TOKEN, Rig
from tests.test_watch import IMG, Watcher

POSTGRES = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


def tagged(db_url: str) -> tuple[str, str]:
    """The URL with a unique application_name, and that name."""
    name = f"aq_reconnect_{uuid.uuid4().hex[:10]}"
    return f"{db_url}&application_name={name}", name


def backends(name: str) -> int:
    with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                           "AND datname = current_database()", (name,)).fetchone()
    return int(row[0]) if row else 0


def terminate(name: str) -> int:
    """pg_terminate_backend on this test's backends only; how many it ended."""
    with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
        rows = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s "
                            "AND datname = current_database() AND pid <> pg_backend_pid()", (name,)).fetchall()
    return sum(1 for (ended,) in rows if ended)


def line_until(watch: Watcher, predicate: Any, seconds: float) -> dict[str, Any] | None:
    """The first JSON line that satisfies predicate. A refresh racing a commit may print a line in
    between (status reads its counts and its lists in separate transactions); the next wake fixes it."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        line = watch.line(timeout=left)
        if line is None or predicate(line):
            return line
    return None


def wait_for(predicate: Any, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


class Proxy:
    """A TCP relay to PostgreSQL that can go away (the database "down") and come back on its port."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", port))
        self.server.listen(16)
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopped.set()
        self.server.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture
def watching(config_file: Path, make_manager: Any) -> Iterator[Any]:
    started: list[Watcher] = []
    make_manager()  # the schema exists before the watcher starts

    def start(url: str, *args: str) -> Watcher:
        started.append(Watcher(config_file, url, *args))
        return started[-1]

    yield start
    for one in started:
        one.kill()


@POSTGRES
def test_watch_json_survives_terminated_backends_and_hears_changes_after(
    watching: Any, make_manager: Any, db_url: str
) -> None:
    manager = make_manager()
    manager.grant("alice", 100)
    url, name = tagged(db_url)
    watch = watching(url, "--json", "--interval", "30", "--window", "30d")
    first = watch.line(timeout=30)
    assert first is not None and first["queued_total"] == 0
    wait_for(lambda: backends(name) >= 2)  # the LISTEN connection and the engine's pooled one

    assert terminate(name) >= 2
    job = manager.enqueue("alice", "upscale_image", IMG, start=False).job  # while it is away
    seen = line_until(watch, lambda line: [j["id"] for j in line["queued"]] == [job.id], 15)
    assert seen is not None and watch.proc.poll() is None

    # LISTENing again: the next change wakes it well before its 30 s interval.
    wait_for(lambda: backends(name) >= 2)
    began = time.monotonic()
    manager.cancel(job.id)
    cancelled = line_until(watch, lambda line: line["queued"] == [] and line["counts"]["cancelled"] == 1, 10)
    assert cancelled is not None
    assert time.monotonic() - began < 3, "no NOTIFY after the reconnect: it did not LISTEN again"

    code, rest, err = watch.interrupt()
    assert code == 0 and rest.strip() == "", rest  # stdout: JSON lines only
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("reconnecting to the database"), err


@POSTGRES
def test_live_watch_keeps_trying_while_the_database_is_gone_and_redraws_when_back(
    watching: Any, make_manager: Any, db_url: str
) -> None:
    manager = make_manager()
    manager.grant("carol", 100)
    real = make_url(db_url)
    proxy = Proxy((real.host or "127.0.0.1", real.port or 5432))
    try:
        url = real.set(port=proxy.port).render_as_string(hide_password=False)
        watch = watching(url, "--json", "--interval", "30", "--window", "30d")
        assert watch.line(timeout=30) is not None
        proxy.stop()  # the database is gone: the watcher retries, 0.5 s doubling to 5 s
        time.sleep(3)
        assert watch.proc.poll() is None
        job = manager.enqueue("carol", "upscale_image", IMG, start=False).job
        proxy = Proxy(proxy.target, proxy.port)  # back, on the same address
        seen = line_until(watch, lambda line: [j["id"] for j in line["queued"]] == [job.id], 15)
        assert seen is not None
        code, _, err = watch.interrupt()
        assert code == 0 and len(err.strip().splitlines()) == 1, err

        live = watching(url, "--interval", "30")
        time.sleep(4)  # its first frame
        proxy.stop()
        time.sleep(2)
        assert live.proc.poll() is None
        code, out, err = live.interrupt()  # Ctrl-C while reconnecting: exit 0
    finally:
        proxy.stop()
    # Off a terminal, rich Live prints its last frame when it stops: the queue, and the footer.
    assert code == 0 and err == "", err
    assert "carol" in out and "reconnecting to the database" in out, out
    lines = out.splitlines()
    at = max(i for i, line in enumerate(lines) if "reconnecting to the database" in line)
    assert lines[at + 1].startswith("last error: cannot ") and "***" not in lines[at + 1], out
    assert max(len(line) for line in lines) <= 80


@POSTGRES
def test_webhook_serve_applies_the_first_webhook_after_its_connections_were_terminated(
    db_url: str, fake_hub: Any, tmp_path: Path, clock: Any
) -> None:
    rig = Rig(db_url, fake_hub, tmp_path, clock)  # the schema, two running jobs and their bodies
    try:
        first, second = rig.running_job("alice"), rig.running_job("bob")
        bodies = [rig.body(first, success=True), rig.body(second, success=True)]
    finally:
        rig.close()
    url, name = tagged(db_url)
    env = {**os.environ, "AIQUEUE_WEBHOOK_TOKEN": TOKEN, "RUNNINGHUB_API_KEY": API_KEY}
    command = [sys.executable, "-m", "aiqueue", "--config", str(tmp_path / "aiqueue.toml"), "--db", url,
               "webhook", "serve", "--port", "0", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert process.stdout is not None
        started = json.loads(process.stdout.readline())
        with httpx.Client(base_url=started["listening"], timeout=20) as client:
            path = f"/runninghub/webhook/{TOKEN}"
            assert client.post(f"{path}?job={first.id}", content=bodies[0]).status_code == 200
            wait_for(lambda: backends(name) >= 1)
            assert terminate(name) >= 1  # its pooled connection(s) are now dead
            answer = client.post(f"{path}?job={second.id}", content=bodies[1])
            assert answer.status_code == 200, answer.text
            assert client.post(f"{path}?job={second.id}", content=bodies[1]).status_code == 200  # duplicate
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err
    assert [line.split()[4] for line in err.decode().splitlines() if " POST " in line] == ["200", "200", "200"]

    settings = load_settings(tmp_path / "aiqueue.toml", db_url=db_url, env={"AIQUEUE_WEBHOOK_TOKEN": TOKEN})
    manager = QueueManager(Store(settings.database_url), settings)
    try:
        for job, user in ((first, "alice"), (second, "bob")):
            detail = manager.job_detail(job.id)
            assert detail.job.status is Status.COMPLETED
            assert [e.to_status for e in detail.events].count(Status.COMPLETED) == 1  # applied once
            assert manager.balance(user).balance == 95  # charged once, never refunded
        assert check_invariants(settings.database_url, 3) == []
    finally:
        manager.store.dispose()


def test_only_long_lived_processes_ping_pooled_connections(
    backend: str, db_url: str, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiqueue.cli import wiring
    from aiqueue.store import engine as store_engine
    from tests.cli_helpers import run_cli

    with wiring.managed(config_file, db_url) as manager:
        manager.init_db()
        assert manager.store.engine.pool._pre_ping is False  # a one-shot command: a fresh pool
    with wiring.managed(config_file, db_url, long_lived=True) as manager:
        # SQLite has no connection to lose: its engine is as it was.
        assert manager.store.engine.pool._pre_ping is (backend == "postgres")

    asked: list[bool] = []
    real = store_engine.make_engine

    def spy(url: str, **kwargs: Any) -> Any:
        asked.append(kwargs.get("pre_ping", False))
        return real(url, **kwargs)

    monkeypatch.setattr(store_engine, "make_engine", spy)
    for args in (["status", "--json"], ["credits", "balance", "alice", "--json"], ["jobs", "--json"]):
        result = run_cli("--config", str(config_file), "--db", db_url, *args)
        assert result.code == 0, result.stderr
    assert asked and not any(asked)


def test_a_watch_still_ends_on_errors_that_are_not_a_lost_connection(
    backend: str, watching: Any, db_url: str
) -> None:
    """SQLite has no connection to lose (any error ends the watch, exit 8, as before); a schema gone
    from PostgreSQL is not retried either."""
    watch = watching(db_url, "--json", "--interval", "0.3")
    assert watch.line(timeout=30) is not None
    if backend == "postgres":
        schema = make_url(db_url).query["options"].rpartition("=")[2]
        with psycopg.connect(PG_URL.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    else:
        import sqlite3

        path = make_url(db_url).database
        assert path is not None
        with sqlite3.connect(path) as conn:
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                conn.execute(f"DROP TABLE {table}")
    _, err = watch.proc.communicate(timeout=20)
    assert watch.proc.returncode == 8, err
    assert "no aiqueue schema" in err.decode() and "reconnecting" not in err.decode()

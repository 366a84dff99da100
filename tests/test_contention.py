"""Contention (issue 3, scenario 5).

SQLite: twenty drivers, released by one barrier, run every command through the real CLI
(`python -m aiqueue`, one OS process per command) against one SQLite file for fifteen seconds,
while two manager-level processes keep writing to the same file. No command may fail with
"database is locked", a busy or snapshot error, or anything unexpected: the only failures allowed
are the documented refusals (exit 4, 5, 6 with their messages). Then the invariants hold and the
refund audit is clean.

PostgreSQL: the same mix through QueueManager in spawned processes; deadlocks and serialization
failures must never reach the caller (the store retries the whole transaction). The manager's own
paths take their locks in one order (job rows, then accounts), so the mix does not deadlock by
itself; a deadlock is provoked on purpose instead (two processes, each in one transaction ending a
job of one user and then a job of the other's, in opposite orders) and shown to be retried.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import re
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import API_KEY, make_pg_schema_url, require_postgres, write_config
from tests.invariants import check_invariants

pytestmark = pytest.mark.slow

LIMIT = 3
USERS = 24
CREDITS = 30  # six upscale_image jobs each: credits run out during the run, so exit 6 happens
CLI_DRIVERS = 20
CLI_SECONDS = 15.0
PG_PROCESSES = 6
HAMMERS = 2  # manager-level processes writing to the SQLite file under the CLI drivers' feet
PG_SECONDS = 12.0

# Words that must never reach an operator from a database under contention.
FORBIDDEN = re.compile(r"database is locked|locked|busy|snapshot|deadlock|serializ|Traceback|unexpected", re.I)
# The documented refusals: exit code -> error slugs and what their messages say.
REFUSALS: dict[int, tuple[set[str], re.Pattern[str]]] = {
    4: ({"unknown_job", "not_found"}, re.compile(r"^no job with id \d+$")),
    5: ({"active_job", "wrong_state", "conflict"}, re.compile(
        r"already has an active job|is already (completed|failed|cancelled)"
        r"|is queued and was never started|kept changing"
        r"|is starting \(.*\): RunningHub may be running it")),  # a cancel waits for the task id
    6: ({"insufficient_credits"}, re.compile(r"has \d+ credits; \w+ costs \d+")),
}


def _manager(url: str, config: str) -> Any:
    from aiqueue.manager import QueueManager
    from aiqueue.provider.runninghub import RunningHubClient
    from aiqueue.settings import load_settings
    from aiqueue.store import Store

    settings = load_settings(config, db_url=url, env={"RUNNINGHUB_API_KEY": API_KEY})
    return QueueManager(Store(settings.database_url), settings,
                        RunningHubClient(settings.base_url, API_KEY, timeout=5))


def _seed(manager: Any) -> list[str]:
    manager.init_db()
    users = [f"user-{i}" for i in range(USERS)]
    for i, user in enumerate(users):
        manager.grant(user, CREDITS)
        if i % 3 == 0:  # the first three start at once (the limit), the rest wait in the queue
            manager.enqueue(user, "upscale_image", {"image": f"seed-{i}.png"})
    return users


# --- SQLite: twenty drivers through the real CLI ---------------------------------------------


@dataclass
class Run:
    argv: list[str]
    code: int
    stdout: str
    stderr: str
    seconds: float


@dataclass
class Known:
    """What the drivers have learnt about jobs from the CLI's own JSON output."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    running: dict[int, str | None] = field(default_factory=dict)  # job id -> provider task id
    queued: set[int] = field(default_factory=set)

    def learn_status(self, payload: dict[str, Any]) -> None:
        with self.lock:
            self.running = {j["id"]: j["provider_task_id"] for j in payload["running"]}
            self.queued = {j["id"] for j in payload["queued"]}

    def learn_job(self, job: dict[str, Any]) -> None:
        with self.lock:
            self.running.pop(job["id"], None)
            self.queued.discard(job["id"])
            if job["status"] in ("starting", "running"):
                self.running[job["id"]] = job["provider_task_id"]
            elif job["status"] == "queued":
                self.queued.add(job["id"])

    def pick(self, rng: random.Random, running: bool, queued: bool) -> tuple[int, str | None] | None:
        with self.lock:
            pool = ([(i, t) for i, t in self.running.items()] if running else []) + (
                [(i, None) for i in self.queued] if queued else [])
        return rng.choice(pool) if pool else None


class CliDriver:
    def __init__(self, n: int, db: str, config: Path, hub: Any, users: list[str], known: Known,
                 workdir: Path, env: dict[str, str]) -> None:
        self.n = n
        self.rng = random.Random(n)
        self.db = db
        self.config = config
        self.hub = hub
        self.users = users
        self.known = known
        self.workdir = workdir
        self.env = env
        self.runs: list[Run] = []
        self.calls = 0

    def cli(self, *args: str) -> Run:
        argv = [sys.executable, "-m", "aiqueue", "--config", str(self.config), "--db", self.db, *args, "--json"]
        began = time.monotonic()
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=self.workdir, timeout=120)
        run = Run(list(args), done.returncode, done.stdout, done.stderr, time.monotonic() - began)
        self.runs.append(run)
        if run.code == 0 and args[0] == "status" and len(args) == 1:
            self.known.learn_status(json.loads(run.stdout))
        elif run.code == 0 and args[0] in ("enqueue", "cancel", "finish") and json.loads(run.stdout).get("job"):
            self.known.learn_job(json.loads(run.stdout)["job"])
        return run

    def step(self, roll: float | None = None) -> None:
        self.calls += 1
        rng = self.rng
        roll = rng.random() if roll is None else roll
        user = rng.choice(self.users)
        if roll < 0.22:
            extra = ["--no-start"] if rng.random() < 0.2 else []
            self.cli("enqueue", "--user", user, "--tool", "upscale_image",
                     "--input", f"image=d{self.n}-{self.calls}.png", *extra)
        elif roll < 0.32:
            self.cli("process-next")
        elif roll < 0.50:
            target = self.known.pick(rng, running=True, queued=False)
            if target is None or target[1] is None:
                self.cli("status")
                return
            body = self.hub.finish_task(target[1], success=rng.random() < 0.7, deliver=False)
            path = self.workdir / f"hook-{self.n}-{self.calls}.json"
            path.write_bytes(body)
            self.cli("finish", "--webhook", str(path))
        elif roll < 0.54:
            target = self.known.pick(rng, running=True, queued=True)
            if target is not None:
                self.cli("finish", str(target[0]), "--status", "completed", "--output", "https://example.invalid/o.png")
        elif roll < 0.62:
            target = self.known.pick(rng, running=True, queued=True)
            if target is not None:
                self.cli("cancel", str(target[0]), "--reason", "contention test")
        elif roll < 0.66:
            self.cli("cleanup", "--older-than", "2s")
        elif roll < 0.76:
            self.cli("status")
        elif roll < 0.79:
            target = self.known.pick(rng, running=True, queued=True)
            self.cli("status", str(target[0])) if target else self.cli("status", "--unmatched")
        elif roll < 0.84:
            self.cli("credits", "balance", user)
        elif roll < 0.89:
            self.cli("credits", "ledger", "--user", user, "--limit", "50")
        elif roll < 0.91:
            self.cli("credits", "grant", user, "5", "--note", "top-up under load")
        elif roll < 0.97:
            self.cli("refund-audit")
        else:
            self.cli("db", "init")


# One roll inside each branch of CliDriver.step: enqueue, process-next, finish --webhook,
# finish --status, cancel, cleanup, status, status JOB, balance, ledger, grant, refund-audit, db init.
FIRST_ROLLS = [0.1, 0.3, 0.4, 0.52, 0.6, 0.64, 0.7, 0.78, 0.8, 0.85, 0.9, 0.95, 0.99]


def _problems(runs: list[Run]) -> list[str]:
    problems = []
    for run in runs:
        what = f"`aiqueue {' '.join(run.argv)}` exit {run.code} after {run.seconds:.1f}s: {run.stderr.strip()[:300]}"
        if FORBIDDEN.search(run.stderr):
            problems.append(what)
            continue
        if run.code == 0:
            continue
        refusal = REFUSALS.get(run.code)
        try:
            error = json.loads(run.stderr)["error"]
        except (ValueError, KeyError, TypeError):
            problems.append(what)
            continue
        if refusal is None or error["code"] not in refusal[0] or not refusal[1].search(error["message"]) \
                or run.stdout != "":
            problems.append(what)
    return problems


def test_twenty_cli_processes_on_one_sqlite_file(tmp_path: Path, fake_hub: Any, pool: Pool) -> None:
    db = f"sqlite:///{tmp_path / 'contention.db'}"
    config = write_config(tmp_path / "contention.toml", fake_hub.base_url, max_concurrent=LIMIT)
    setup = _manager(db, str(config))
    users = _seed(setup)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIQUEUE_", "RUNNINGHUB_"))}
    env["RUNNINGHUB_API_KEY"] = API_KEY
    known = Known()
    known.learn_status(setup.status().to_dict())
    drivers = [CliDriver(n, db, config, fake_hub, users, known, tmp_path, env) for n in range(CLI_DRIVERS)]
    barrier = threading.Barrier(CLI_DRIVERS)
    crashes: list[str] = []

    def drive(driver: CliDriver) -> None:
        try:
            barrier.wait(timeout=60)
            stop = time.monotonic() + CLI_SECONDS
            # The first command of each driver walks the table, so every command runs even on a
            # machine so busy that a driver only gets through a few.
            driver.step(FIRST_ROLLS[driver.n % len(FIRST_ROLLS)])
            while time.monotonic() < stop:
                driver.step()
        except BaseException:  # noqa: BLE001 - the test reports it
            crashes.append(traceback.format_exc())

    # Python start-up dominates a CLI command, so twenty drivers run only a few dozen commands:
    # a few processes keep writing through the manager meanwhile, so that every CLI transaction
    # meets a busy database.
    pool.submit([("mixer", (db, str(config), fake_hub.base_url, users, 100 + i, HAMMERS, CLI_SECONDS + 5, 0.03))
                 for i in range(HAMMERS)])
    threads = [threading.Thread(target=drive, args=(d,)) for d in drivers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=CLI_SECONDS + 180)
    hammered = pool.collect(HAMMERS)
    assert crashes == []
    assert [bad for _, _, bad in hammered] == [[]] * HAMMERS

    runs = [r for d in drivers for r in d.runs]
    commands = Counter(" ".join(r.argv[:2]) if r.argv[0] in ("credits", "db") else r.argv[0] for r in runs)
    assert set(commands) >= {"enqueue", "process-next", "finish", "cancel", "cleanup", "status",
                             "credits balance", "credits ledger", "credits grant", "refund-audit", "db init"}, commands
    assert _problems(runs) == []
    beside = sum((Counter(t) for _, t, _ in hammered), Counter())
    print(f"\nSQLite CLI mix, {CLI_DRIVERS} drivers: {len(runs)} commands {dict(commands)}, "
          f"exit codes {dict(Counter(r.code for r in runs))}; beside them, {HAMMERS} manager processes: "
          f"{sum(v for k, v in beside.items() if not k.startswith('driver'))} calls")
    codes = Counter(r.code for r in runs)
    assert codes[0] > len(runs) // 2, codes
    assert check_invariants(db, LIMIT) == []
    audit = setup.refund_audit()
    assert audit.ok, audit.problems
    setup.store.dispose()


# --- spawned processes for the manager-level tests -------------------------------------------


def _serve(inbox: Any, out: Any, barriers: dict[int, Any]) -> None:
    tasks = {"mixer": _mixer, "cross_finisher": _cross_finisher}
    while True:
        task = inbox.get()
        if task is None:
            out.close()
            out.join_thread()
            os._exit(0)  # skip the interpreter's slow teardown
        index, name, args = task
        try:
            result = tasks[name](*args, barriers)
        except BaseException:  # noqa: BLE001 - the parent fails the test with it
            result = {"crash": traceback.format_exc()}
        out.put((index, result))


class Pool:
    """PG_PROCESSES spawned processes, started once for the module. Barriers cannot travel
    through queues, so each process inherits one barrier per party count it may need."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.inboxes = [ctx.Queue() for _ in range(PG_PROCESSES)]
        self.out = ctx.Queue()
        # Kept on self: the children unpickle them after start() returns.
        self.barriers = {n: ctx.Barrier(n) for n in {PG_PROCESSES, HAMMERS, 2}}
        self.procs = [ctx.Process(target=_serve, args=(inbox, self.out, self.barriers), daemon=True)
                      for inbox in self.inboxes]
        for proc in self.procs:
            proc.start()

    def run(self, tasks: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """Run tasks[i] in process i; the task's own barrier releases them together."""
        self.submit(tasks)
        return self.collect(len(tasks))

    def submit(self, tasks: list[tuple[str, tuple[Any, ...]]]) -> None:
        for i, (name, args) in enumerate(tasks):
            self.inboxes[i].put((i, name, args))

    def collect(self, count: int) -> list[Any]:
        import queue

        answers: dict[int, Any] = {}
        deadline = time.monotonic() + PG_SECONDS + 180
        while len(answers) < count:
            try:
                index, result = self.out.get(timeout=1)
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if not p.is_alive()]
                assert not dead and time.monotonic() < deadline, f"pool stuck or dead: {dead}"
                continue
            assert not (isinstance(result, dict) and set(result) == {"crash"}), result["crash"]
            answers[index] = result
        return [answers[i] for i in range(count)]

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


@pytest.fixture(scope="module")
def pool() -> Any:
    processes = Pool()
    try:
        yield processes
    finally:
        processes.close()


# --- PostgreSQL: the same mix through the manager in processes --------------------------------


def _finish_body(hub_url: str, task_id: str, success: bool) -> bytes:
    request = urllib.request.Request(
        f"{hub_url}/__fake__/finish",
        data=json.dumps({"taskId": task_id, "success": success, "deliver": False}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        return json.loads(answer.read())["webhook"].encode()


def _mixer(url: str, config: str, hub_url: str, users: list[str], seed: int, parties: int, seconds: float,
           pause: float, barriers: Any) -> Any:
    from datetime import timedelta

    from aiqueue.errors import (
        ActiveJobError,
        AiqueueError,
        ConflictError,
        InsufficientCreditsError,
        UnknownJobError,
    )

    tally: Counter[str] = Counter()
    bad: list[str] = []
    try:
        from sqlalchemy import event

        manager = _manager(url, config)
        event.listen(manager.store.engine, "handle_error",  # what the store saw (and retried)
                     lambda ctx: tally.update([f"driver error {getattr(ctx.original_exception, 'sqlstate', '?')}"]))
        rng = random.Random(seed)
        barriers[parties].wait(timeout=60)
        stop = time.monotonic() + seconds
        n = 0
        while time.monotonic() < stop:
            n += 1
            time.sleep(pause)
            status = manager.status()
            pool = status.running + status.queued
            roll = rng.random()
            user = rng.choice(users)
            op = "status"
            try:
                if roll < 0.25:
                    op = "enqueue"
                    manager.enqueue(user, "upscale_image", {"image": f"m{seed}-{n}.png"}, start=rng.random() < 0.8)
                elif roll < 0.35:
                    op = "process_next"
                    manager.process_next()
                elif roll < 0.55 and status.running:
                    op = "finish_webhook"
                    job = rng.choice(status.running)
                    if job.provider_task_id:
                        manager.finish_webhook(_finish_body(hub_url, job.provider_task_id, rng.random() < 0.7))
                elif roll < 0.60 and pool:
                    op = "finish"
                    manager.finish(rng.choice(pool).id, "completed", outputs=["https://example.invalid/o.png"])
                elif roll < 0.70 and pool:
                    op = "cancel"
                    manager.cancel(rng.choice(pool).id, reason="contention test")
                elif roll < 0.74:
                    op = "cleanup"
                    manager.cleanup(older_than=timedelta(seconds=2))
                elif roll < 0.80:
                    op = "balance"
                    manager.balance(user)
                elif roll < 0.86:
                    op = "ledger"
                    manager.ledger(user=user, limit=50)
                elif roll < 0.88:
                    op = "grant"
                    manager.grant(user, 5)
                elif roll < 0.95:
                    op = "refund_audit"
                    audit = manager.refund_audit()
                    if not audit.ok:
                        bad.append(f"refund-audit under load: {audit.problems}")
                elif pool:
                    op = "job_detail"
                    manager.job_detail(rng.choice(pool).id)
                tally[f"{op}: ok"] += 1
            except (ActiveJobError, InsufficientCreditsError, ConflictError, UnknownJobError) as exc:
                tally[f"{op}: {type(exc).__name__}"] += 1
            except AiqueueError as exc:  # DatabaseError above all: it must never get here
                bad.append(f"{op}: {type(exc).__name__}: {exc}")
        manager.store.dispose()
    except BaseException:  # noqa: BLE001
        bad.append(traceback.format_exc())
    return seed, dict(tally), bad


def _pg_url() -> tuple[str, Any]:
    require_postgres()
    return make_pg_schema_url()


def test_postgres_mix_through_the_manager(tmp_path: Path, fake_hub: Any, pool: Pool) -> None:
    url, drop = _pg_url()
    try:
        config = str(write_config(tmp_path / "mix.toml", fake_hub.base_url, max_concurrent=LIMIT))
        setup = _manager(url, config)
        users = _seed(setup)
        results = pool.run([("mixer", (url, config, fake_hub.base_url, users, seed, PG_PROCESSES, PG_SECONDS, 0.0))
                            for seed in range(PG_PROCESSES)])
        assert [bad for _, _, bad in results] == [[]] * PG_PROCESSES
        tally = sum((Counter(t) for _, t, _ in results), Counter())
        print(f"\nPostgreSQL mix, {PG_PROCESSES} processes, {PG_SECONDS:g} s: {dict(sorted(tally.items()))}")
        for op in ("enqueue", "process_next", "finish_webhook", "cancel", "cleanup", "refund_audit", "grant"):
            assert tally[f"{op}: ok"] > 0, tally
        assert check_invariants(url, LIMIT) == []
        audit = setup.refund_audit()
        assert audit.ok, audit.problems
        setup.store.dispose()
    finally:
        drop()


# --- a deadlock on purpose --------------------------------------------------------------------


def _cross_finisher(url: str, config: str, first: int, second: int, inside: bool, barriers: Any) -> Any:
    """In ONE transaction, end job `first` and then job `second` (each ending locks the job row
    and then its user's account, and refunds). When `inside`, wait for the other process after
    the first ending, inside the transaction: with opposite orders, that is a deadlock."""
    from sqlalchemy import event

    from aiqueue.domain import HOLDS_SLOT, Status

    try:
        manager = _manager(url, config)
        errors: list[str | None] = []
        event.listen(manager.store.engine, "handle_error",
                     lambda ctx: errors.append(getattr(ctx.original_exception, "sqlstate", None)))
        attempts = 0

        def tx_fn(tx: Any) -> list[int]:
            nonlocal attempts
            attempts += 1
            ended = []
            for n, job_id in enumerate((first, second)):
                job = tx.get_job(job_id)
                if job.status in HOLDS_SLOT and manager._end(tx, job, Status.FAILED, "cross finish",
                                                              error="cross finish"):
                    ended.append(job_id)
                if n == 0 and attempts == 1 and inside:
                    barriers[2].wait(timeout=30)
            return ended

        if not inside:
            barriers[2].wait(timeout=30)
        ended = manager.store.run(tx_fn)
        manager.store.dispose()
        return {"first": first, "ended": ended, "attempts": attempts, "errors": errors}
    except BaseException as exc:  # noqa: BLE001
        return {"first": first, "crash": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}


def _cross_finish(url: str, config: str, pool: Pool, inside: bool) -> list[dict[str, Any]]:
    setup = _manager(url, config)
    setup.init_db()
    for user in ("alice", "bob"):
        setup.grant(user, 10)
    a = setup.enqueue("alice", "upscale_image", {"image": "a.png"}).job
    b = setup.enqueue("bob", "upscale_image", {"image": "b.png"}).job
    assert str(a.status) == str(b.status) == "running"
    results = pool.run([("cross_finisher", (url, config, x, y, inside)) for x, y in ((a.id, b.id), (b.id, a.id))])
    assert all("crash" not in r for r in results), results
    # Each job ended once, by one transaction, with one refund.
    assert sorted(i for r in results for i in r["ended"]) == sorted([a.id, b.id]), results
    for job in (a, b):
        assert str(setup.job_detail(job.id).job.status) == "failed"
        assert sorted(str(e.kind) for e in setup.ledger(job_id=job.id)) == ["charge", "refund"]
    assert setup.balance("alice").balance == setup.balance("bob").balance == 10
    assert check_invariants(url, LIMIT) == []
    assert setup.refund_audit().ok
    setup.store.dispose()
    return results


def test_postgres_deadlock_is_retried_inside_the_store(tmp_path: Path, fake_hub: Any, pool: Pool) -> None:
    url, drop = _pg_url()
    try:
        config = str(write_config(tmp_path / "deadlock.toml", fake_hub.base_url, max_concurrent=LIMIT))
        results = _cross_finish(url, config, pool, inside=True)
        # PostgreSQL chose one victim (40P01); the store ran its transaction again, which then
        # found both jobs already ended and changed nothing. No error reached either caller.
        victims = [r for r in results if "40P01" in r["errors"]]
        assert len(victims) == 1, results
        assert victims[0]["attempts"] == 2 and victims[0]["ended"] == [], results
        (winner,) = [r for r in results if r is not victims[0]]
        assert winner["attempts"] == 1 and len(winner["ended"]) == 2, results
    finally:
        drop()


def test_sqlite_opposite_order_finishes_serialise(tmp_path: Path, fake_hub: Any, pool: Pool) -> None:
    """The same two transactions on SQLite: BEGIN IMMEDIATE serialises them, so there is no
    deadlock to retry; the second waits (within busy_timeout) and then finds both jobs ended."""
    url = f"sqlite:///{tmp_path / 'cross.db'}"
    config = str(write_config(tmp_path / "cross.toml", fake_hub.base_url, max_concurrent=LIMIT))
    results = _cross_finish(url, config, pool, inside=False)
    assert sorted(r["attempts"] for r in results) == [1, 1] and all(r["errors"] == [] for r in results)


def test_switching_a_fresh_file_to_wal_waits_for_a_writer(tmp_path: Path) -> None:
    """SQLite answers 'database is locked' at once, without its busy handler, to the WAL switch of
    a fresh (rollback-journal) file while another connection is writing it: the store waits and
    retries (found when two `db upgrade` raced on a new file under load)."""
    import sqlite3
    import threading
    import time

    from aiqueue.store import Store

    path = tmp_path / "fresh.db"
    path.touch()
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE t (x INTEGER)")
    release = threading.Timer(0.5, lambda: writer.execute("COMMIT"))
    release.start()
    store = Store(f"sqlite:///{path}", busy_timeout=10)
    try:
        started = time.monotonic()
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert time.monotonic() - started >= 0.3  # it waited for the writer, it did not fail
    finally:
        release.join()
        store.dispose()
        writer.close()

"""Crash points (issue 3, scenario 2): kill -9 the real CLI at each named point, on SQLite and on
PostgreSQL, then restart with the normal CLI (late webhooks, cleanup, process-next, a retry of the
interrupted command) and prove that nothing is lost, charged or refunded twice, that a crash
inside a transaction left no partial effect, and that no slot stays held forever.

The crash is a real SIGKILL of a `python -m tests.crash_runner POINT -- ...` process (see
tests/crash_runner.py). Everything else goes through the shipped entry point `main()` with the
same argv a shell would pass (in this process, as tests/cli_helpers.py does: each command builds
and disposes its own engine, so the database sees a fresh client, and the suite stays within its
time budget where a Python start-up costs one to two seconds). The recovery command right after
each crash in the fill:after-accept and cleanup:between-jobs tests runs as a fresh
`python -m aiqueue` process, as an operator's restart or the webhook receiver would.

Staleness is reached by moving the crashed job's started_at eleven minutes back (the configured
stale_after is 10m) instead of sleeping: the job then looks exactly as it would ten minutes after
a real crash.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import Run, run_cli
from tests.conftest import API_KEY, write_config
from tests.crash_runner import POINTS, run as crash_runner_run
from tests.invariants import check_invariants

REPO = Path(__file__).resolve().parents[1]
RUN_PATH = "/task/openapi/ai-app/run"
CANCEL_PATH = "/task/openapi/cancel"
TIMEOUT = 60


@dataclass
class Queue:
    """One database, one config pointing at the fake RunningHub, and ways to drive the CLI."""

    db: str
    config: Path
    hub: Any
    limit: int
    log: list[str] = field(default_factory=list)

    # --- driving the CLI ------------------------------------------------------------------

    def _argv(self, args: tuple[str, ...]) -> list[str]:
        return ["--config", str(self.config), "--db", self.db, *args]

    def cli(self, *args: str, input: bytes | None = None) -> Run:
        """The shipped main() with this argv, in this process."""
        run = run_cli(*self._argv(args), input=input)
        self.log.append(f"{' '.join(args)} -> {run.code}")
        return run

    def json(self, *args: str, input: bytes | None = None) -> Any:
        return self.cli(*args, "--json", input=input).json()

    def process(self, *args: str, input: bytes | None = None) -> Any:
        """A fresh `python -m aiqueue` process (exit 0 expected); its JSON answer."""
        done = subprocess.run(
            [sys.executable, "-m", "aiqueue", *self._argv(args), "--json"],
            input=input, capture_output=True, timeout=TIMEOUT, cwd=REPO, env=_env(),
        )
        self.log.append(f"process {' '.join(args)} -> {done.returncode}")
        assert done.returncode == 0, f"{args} exited {done.returncode}: {done.stderr.decode()}"
        return json.loads(done.stdout)

    def crash(self, point: str, *args: str, input: bytes | None = None) -> None:
        """Run the CLI under the crash runner; it must die by SIGKILL at `point`."""
        done = subprocess.run(
            [sys.executable, "-m", "tests.crash_runner", point, "--", *self._argv(args), "--json"],
            input=input, capture_output=True, timeout=TIMEOUT, cwd=REPO, env=_env(),
        )
        self.log.append(f"crash at {point}: {' '.join(args)} -> {done.returncode}")
        assert done.returncode == -signal.SIGKILL, (
            f"expected kill -9 at {point}, got exit {done.returncode}\n"
            f"stdout: {done.stdout.decode()}\nstderr: {done.stderr.decode()}"
        )
        assert done.stdout == b"", "a process killed mid-command must not have answered"

    # --- looking at the state -------------------------------------------------------------

    def enqueue(self, user: str, *, start: bool = True) -> dict[str, Any]:
        args = ["enqueue", "--user", user, "--tool", "upscale_image", "--input", f"image=in/{user}.png"]
        return self.json(*args, *([] if start else ["--no-start"]))["job"]  # type: ignore[no-any-return]

    def job(self, job_id: int) -> dict[str, Any]:
        return self.json("status", str(job_id))["job"]  # type: ignore[no-any-return]

    def ledger_kinds(self, job_id: int) -> list[str]:
        return [e["kind"] for e in self.json("credits", "ledger", "--job", str(job_id))["entries"]]

    def balance(self, user: str) -> int:
        return self.json("credits", "balance", user)["balance"]  # type: ignore[no-any-return]

    def submitted_images(self) -> list[str]:
        """The image input of every submit the fake RunningHub received, in order."""
        images = []
        for request in self.hub.requests:
            if request["path"] == RUN_PATH:
                nodes = request["body"]["nodeInfoList"]
                images += [n["fieldValue"] for n in nodes if n["fieldName"] == "image"]
        return images

    def cancels(self) -> list[str]:
        return [str(r["body"]["taskId"]) for r in self.hub.requests if r["path"] == CANCEL_PATH]

    def unmatched(self) -> list[str]:
        return [w["task_id"] for w in self.json("status", "--unmatched")["webhooks"]]

    def assert_healthy(self) -> None:
        """I1-I7 from the one checker, and refund-audit clean."""
        assert check_invariants(self.db, self.limit) == [], self.log
        audit = self.json("refund-audit")
        assert audit["ok"] is True and audit["problems"] == [], audit

    # --- moving time ----------------------------------------------------------------------

    def age(self, *job_ids: int, minutes: int = 11) -> None:
        """Move started_at back, as if the crash happened `minutes` ago (stale_after is 10m)."""
        from sqlalchemy import create_engine, update

        from aiqueue.store.tables import jobs

        engine = create_engine(self.db)
        try:
            with engine.begin() as conn:
                then = datetime.now(timezone.utc) - timedelta(minutes=minutes)
                conn.execute(update(jobs).where(jobs.c.id.in_(job_ids)).values(started_at=then))
        finally:
            engine.dispose()

    def count(self, table: str) -> int:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.db)
        try:
            with engine.connect() as conn:
                return int(conn.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one())
        finally:
            engine.dispose()


def _env() -> dict[str, str]:
    # conftest's autouse fixture already removed stray AIQUEUE_*/RUNNINGHUB_* variables.
    return {**os.environ, "RUNNINGHUB_API_KEY": API_KEY}


@pytest.fixture
def make_queue(db_url: str, fake_hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)  # for the in-process main()

    def build(limit: int, users: tuple[str, ...] = ("alice", "bob", "carol")) -> Queue:
        config = write_config(tmp_path / "aiqueue.toml", fake_hub.base_url, max_concurrent=limit)
        queue = Queue(db=db_url, config=config, hub=fake_hub, limit=limit)
        assert queue.cli("db", "init").code == 0
        for user in users:
            queue.json("credits", "grant", user, "50")
        return queue

    return build


# --- enqueue:after-charge ------------------------------------------------------------------------


def test_crash_after_the_charge_before_commit_leaves_no_job_and_no_charge(make_queue: Any) -> None:
    q = make_queue(limit=1)
    q.crash("enqueue:after-charge", "enqueue", "--user", "alice", "--tool", "upscale_image",
            "--input", "image=in/alice.png")

    # The whole transaction died with the process: no job, no charge, no event, nothing submitted.
    assert q.count("aiqueue_jobs") == 0 and q.count("aiqueue_job_events") == 0
    assert [e["kind"] for e in q.json("credits", "ledger", "--user", "alice")["entries"]] == ["grant"]
    assert q.balance("alice") == 50
    status = q.json("status")
    assert status["running"] == [] and status["queued"] == []
    assert q.submitted_images() == []
    q.assert_healthy()

    # Restart: the user can enqueue again (no phantom active job) and pays exactly once.
    job = q.json("enqueue", "--user", "alice", "--tool", "upscale_image", "--input", "image=in/alice.png")["job"]
    assert job["status"] == "running" and job["provider_task_id"]
    assert q.ledger_kinds(job["id"]) == ["charge"]
    assert q.balance("alice") == 45
    assert q.submitted_images() == ["in/alice.png"]
    q.assert_healthy()


# --- fill:after-claim ----------------------------------------------------------------------------


def test_crash_after_claiming_a_slot_before_submitting(make_queue: Any) -> None:
    q = make_queue(limit=1)
    enqueue = ("enqueue", "--user", "alice", "--tool", "upscale_image", "--input", "image=in/alice.png")
    q.crash("fill:after-claim", *enqueue)  # the enqueue committed, then its fill claimed the slot

    # The claim was committed: the job holds the only slot, was never submitted, paid once.
    [alice] = q.json("status")["running"]
    job = q.job(alice["id"])
    assert job["status"] == "starting" and job["slot"] == 1 and job["provider_task_id"] is None
    assert q.submitted_images() == [] and q.hub.tasks == {}
    assert q.ledger_kinds(alice["id"]) == ["charge"] and q.balance("alice") == 45
    q.assert_healthy()

    # The operator, who never saw an answer, retries the enqueue: refused, not charged twice.
    retry = q.cli(*enqueue, "--json")
    assert retry.code == 5 and retry.error()["code"] == "active_job"
    assert q.balance("alice") == 45 and q.count("aiqueue_jobs") == 1

    # Restart before the job is stale: it keeps its slot and is never submitted blindly.
    assert q.json("process-next")["started"] == []
    bob = q.enqueue("bob")
    assert bob["status"] == "queued" and bob["position"] == 1
    assert q.submitted_images() == []
    q.assert_healthy()

    # Ten minutes later, even with no cleanup cron, process-next ends it failed and refunded,
    # frees the slot, and bob starts.
    q.age(alice["id"])
    processed = q.json("process-next")
    assert [j["id"] for j in processed["expired"]] == [alice["id"]]
    assert [j["id"] for j in processed["started"]] == [bob["id"]]
    job = q.job(alice["id"])
    assert job["status"] == "failed" and job["slot"] is None and "timed out" in job["error"]
    assert q.ledger_kinds(alice["id"]) == ["charge", "refund"]
    assert q.balance("alice") == 50
    assert q.job(bob["id"])["status"] == "running"
    assert q.submitted_images() == ["in/bob.png"]  # alice's job was never sent

    # A second cleanup and process-next change nothing: no second refund.
    assert q.json("cleanup")["expired"] == []
    q.json("process-next")
    assert q.ledger_kinds(alice["id"]) == ["charge", "refund"] and q.balance("alice") == 50
    q.assert_healthy()


# --- fill:after-accept ---------------------------------------------------------------------------


def test_crash_after_the_provider_accepted_before_the_task_id_is_stored(make_queue: Any) -> None:
    q = make_queue(limit=1)
    alice = q.enqueue("alice", start=False)
    q.crash("fill:after-accept", "process-next")

    # The provider created the task; we never stored its id. The job holds its slot, unknown.
    [task_id] = list(q.hub.tasks)
    job = q.job(alice["id"])
    assert job["status"] == "starting" and job["provider_task_id"] is None and job["slot"] == 1
    assert q.submitted_images() == ["in/alice.png"]
    assert q.ledger_kinds(alice["id"]) == ["charge"]
    q.assert_healthy()

    # Its webhook arrives: kept in the inbox as unmatched, changes nothing, twice over.
    body = q.hub.finish_task(task_id, success=True, deliver=False)
    answer = q.process("finish", "--webhook", "-", input=body)
    assert answer["changed"] is False and answer["job"] is None and "unmatched" in answer["message"]
    assert q.json("finish", "--webhook", "-", input=body)["changed"] is False
    assert q.unmatched() == [task_id]
    assert q.job(alice["id"])["status"] == "starting"

    # process-next never resubmits it, and the slot stays held until it is stale.
    assert q.json("process-next")["started"] == []
    bob = q.enqueue("bob")
    assert bob["status"] == "queued"
    assert q.submitted_images() == ["in/alice.png"]
    q.assert_healthy()

    # Cleanup ends it failed and refunded (the outcome is unknown to us), bob gets the slot.
    q.age(alice["id"])
    cleaned = q.json("cleanup")
    assert [j["id"] for j in cleaned["expired"]] == [alice["id"]]
    assert [j["id"] for j in cleaned["started"]] == [bob["id"]]
    job = q.job(alice["id"])
    assert job["status"] == "failed" and job["slot"] is None and job["provider_task_id"] is None
    assert q.ledger_kinds(alice["id"]) == ["charge", "refund"] and q.balance("alice") == 50
    assert q.submitted_images() == ["in/alice.png", "in/bob.png"]  # alice's job sent exactly once

    # The webhook is still kept for the operator and still changes nothing.
    assert q.json("finish", "--webhook", "-", input=body)["changed"] is False
    assert q.unmatched() == [task_id]
    assert q.ledger_kinds(alice["id"]) == ["charge", "refund"]
    q.assert_healthy()


# --- end:in-refund -------------------------------------------------------------------------------


def test_crash_in_the_middle_of_a_refund_then_the_retry_refunds_once(make_queue: Any) -> None:
    q = make_queue(limit=1)
    alice = q.enqueue("alice")
    bob = q.enqueue("bob")
    assert alice["status"] == "running" and bob["status"] == "queued"

    # An operator's finish --status failed, killed after the refund row, before commit.
    finish = ("finish", str(alice["id"]), "--status", "failed", "--error", "CUDA out of memory")
    q.crash("end:in-refund", *finish)
    job = q.job(alice["id"])
    assert job["status"] == "running" and job["slot"] == 1 and job["error"] is None
    assert q.ledger_kinds(alice["id"]) == ["charge"] and q.balance("alice") == 45
    assert q.job(bob["id"])["status"] == "queued"
    q.assert_healthy()
    retried = q.json(*finish)
    assert retried["changed"] is True and retried["refunded"] == 5
    assert [j["id"] for j in retried["started"]] == [bob["id"]]
    repeated = q.json(*finish)
    assert repeated["changed"] is False and repeated["refunded"] == 0
    assert q.ledger_kinds(alice["id"]) == ["charge", "refund"] and q.balance("alice") == 50
    q.assert_healthy()

    # A cancel of the running job, killed in the refund: the provider was told, our row was not.
    bob_task = q.job(bob["id"])["provider_task_id"]
    q.crash("end:in-refund", "cancel", str(bob["id"]))
    assert q.hub.tasks[bob_task].cancelled
    assert q.job(bob["id"])["status"] == "running"
    assert q.ledger_kinds(bob["id"]) == ["charge"] and q.balance("bob") == 45
    q.assert_healthy()
    retried = q.json("cancel", str(bob["id"]))
    assert retried["changed"] is True and retried["refunded"] == 5
    assert q.json("cancel", str(bob["id"]))["changed"] is False
    assert q.ledger_kinds(bob["id"]) == ["charge", "refund"] and q.balance("bob") == 50
    q.assert_healthy()

    # A failure webhook, killed in the refund: the body was not kept either (same transaction);
    # the provider's redelivery applies it once.
    carol = q.enqueue("carol")
    assert carol["status"] == "running"
    body = q.hub.finish_task(carol["provider_task_id"], success=False, error="bad input image", deliver=False)
    q.crash("end:in-refund", "finish", "--webhook", "-", input=body)
    assert q.job(carol["id"])["status"] == "running"
    assert q.ledger_kinds(carol["id"]) == ["charge"] and q.unmatched() == []
    q.assert_healthy()
    applied = q.json("finish", "--webhook", "-", input=body)
    assert applied["changed"] is True and applied["refunded"] == 5
    assert "bad input image" in q.job(carol["id"])["error"]
    assert q.json("finish", "--webhook", "-", input=body)["changed"] is False
    assert q.ledger_kinds(carol["id"]) == ["charge", "refund"] and q.balance("carol") == 50
    assert q.json("status")["running"] == []
    q.assert_healthy()


# --- cleanup:between-jobs ------------------------------------------------------------------------


def test_crash_in_the_middle_of_cleanup(make_queue: Any) -> None:
    q = make_queue(limit=2)
    alice, bob, carol = q.enqueue("alice"), q.enqueue("bob"), q.enqueue("carol")
    assert [alice["status"], bob["status"], carol["status"]] == ["running", "running", "queued"]
    # bob's task finished at the provider but its webhook never came; alice's is still running.
    q.hub.set_running(alice["provider_task_id"])
    bob_hook = q.hub.finish_task(bob["provider_task_id"], success=True, deliver=False)
    q.age(alice["id"], bob["id"])

    q.crash("cleanup:between-jobs", "cleanup")
    # The first stale job was ended (committed) before the kill; the second was not reached.
    job = q.job(alice["id"])
    assert job["status"] == "failed" and job["slot"] is None and "timed out" in job["error"]
    assert q.ledger_kinds(alice["id"]) == ["charge", "refund"] and q.balance("alice") == 50
    assert q.cancels() == [alice["provider_task_id"]]
    assert q.job(bob["id"])["status"] == "running" and q.ledger_kinds(bob["id"]) == ["charge"]
    assert q.job(carol["id"])["status"] == "queued"  # the kill came before the fill
    q.assert_healthy()

    # Restart: cleanup finds bob completed at the provider (no refund) and starts carol.
    cleaned = q.process("cleanup")
    assert cleaned["expired"] == []
    assert [j["id"] for j in cleaned["completed"]] == [bob["id"]]
    assert [j["id"] for j in cleaned["started"]] == [carol["id"]]
    assert q.job(bob["id"])["status"] == "completed" and q.job(bob["id"])["outputs"]
    assert q.ledger_kinds(bob["id"]) == ["charge"] and q.balance("bob") == 45
    assert q.ledger_kinds(alice["id"]) == ["charge", "refund"] and q.balance("alice") == 50
    assert q.cancels() == [alice["provider_task_id"]]  # nothing asked twice

    # bob's late webhook, another cleanup and process-next: all duplicates.
    assert q.json("finish", "--webhook", "-", input=bob_hook)["changed"] is False
    assert q.json("cleanup")["expired"] == []
    assert q.json("process-next")["started"] == []
    assert q.ledger_kinds(alice["id"]) == ["charge", "refund"] and q.ledger_kinds(bob["id"]) == ["charge"]
    assert q.submitted_images() == ["in/alice.png", "in/bob.png", "in/carol.png"]
    q.assert_healthy()


# --- the hook is the test suite's, not the product's ---------------------------------------------

_FAULTY = re.compile(r"(^|_)faults?$|crash|kill", re.IGNORECASE)  # fault, _no_fault, crash_at, ...


def _package_trees() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(encoding="utf-8")) for p in sorted((REPO / "aiqueue").rglob("*.py"))}


def _identifiers(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and node.attr != "kill":  # Popen.kill, os.kill: process control
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def test_the_crash_points_exist_only_as_the_inert_documented_hook() -> None:
    trees = _package_trees()
    manager_path = REPO / "aiqueue" / "manager.py"
    # Code, not prose: identifiers only, so a docstring about provider faults does not count.
    faulty = {p.relative_to(REPO).as_posix(): sorted(n for n in _identifiers(t) if _FAULTY.search(n))
              for p, t in trees.items()}
    assert {p: n for p, n in faulty.items() if n} == {"aiqueue/manager.py": ["_no_fault", "fault"]}

    tree = trees[manager_path]
    called: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "fault":
            [arg] = node.args
            assert isinstance(arg, ast.Constant) and isinstance(arg.value, str)
            called.append(arg.value)
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                # Only the class body may bind `fault` (to the no-op); nothing rebinds it.
                assert not (isinstance(target, ast.Attribute) and target.attr == "fault"), ast.unparse(node)
    assert sorted(called) == sorted(POINTS), "every named point is called exactly once and tested"

    [manager_class] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "QueueManager"]
    [binding] = [n for n in manager_class.body
                 if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == "fault"]
    assert ast.unparse(binding.value) == "staticmethod(_no_fault)"
    [no_fault] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_no_fault"]
    assert len(no_fault.body) == 1 and isinstance(no_fault.body[0], ast.Expr)  # a docstring, no code

    # No setting or environment variable could switch anything like it on.
    constants = {n.value for t in trees.values() for n in ast.walk(t)
                 if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    names = {m for c in constants for m in re.findall(r"\b(?:AIQUEUE|RUNNINGHUB)_[A-Z0-9_]+", c)}
    assert not [n for n in names if re.search("FAULT|CRASH|KILL|INJECT|CHAOS", n)], names


def test_fault_looking_variables_do_nothing_to_the_shipped_cli(tmp_path: Path, fake_hub: Any) -> None:
    from aiqueue.manager import QueueManager, _no_fault

    config = write_config(tmp_path / "aiqueue.toml", fake_hub.base_url, max_concurrent=1)
    db = f"sqlite:///{tmp_path / 'q.db'}"
    names = ["AIQUEUE_FAULT", "AIQUEUE_FAULT_POINT", "AIQUEUE_FAULTS", "AIQUEUE_CRASH", "AIQUEUE_CRASH_POINT",
             "AIQUEUE_CRASH_AT", "AIQUEUE_KILL_AT", "FAULT", "CRASH_POINT"]
    env = {**_env(), **{n: POINTS[i % len(POINTS)] for i, n in enumerate(names)}, "AIQUEUE_FAULT": ",".join(POINTS)}

    def aiqueue(*args: str) -> Any:
        done = subprocess.run([sys.executable, "-m", "aiqueue", "--config", str(config), "--db", db, *args, "--json"],
                              capture_output=True, timeout=TIMEOUT, cwd=REPO, env=env)
        assert done.returncode == 0, (args, done.returncode, done.stderr.decode())
        return json.loads(done.stdout)

    assert run_cli("--db", db, "db", "init").code == 0
    assert run_cli("--db", db, "credits", "grant", "alice", "50").code == 0
    # One enqueue passes enqueue:after-charge, fill:after-claim and fill:after-accept ...
    job = aiqueue("enqueue", "--user", "alice", "--tool", "upscale_image", "--input", "image=x.png")["job"]
    assert job["status"] == "running"
    # ... and one cleanup of a stale job passes end:in-refund and cleanup:between-jobs.
    Queue(db=db, config=config, hub=fake_hub, limit=1).age(job["id"])
    cleaned = aiqueue("cleanup")
    assert [j["id"] for j in cleaned["expired"]] == [job["id"]]
    assert check_invariants(db, 1) == []
    assert QueueManager.fault is _no_fault  # and this process was never switched either


def test_the_runner_refuses_an_unknown_point() -> None:
    with pytest.raises(SystemExit) as exc:
        crash_runner_run(["enqueue:before-anything", "--", "status"])
    assert "unknown crash point" in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        crash_runner_run(["enqueue:after-charge", "status"])
    assert "usage" in str(exc.value.code)

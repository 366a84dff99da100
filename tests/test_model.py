"""Model-based test (issue 3, scenario 1): a Hypothesis state machine drives QueueManager against
the fake RunningHub server over real HTTP, on SQLite and on PostgreSQL, and compares it after
every step with a small pure-Python model of the rules.

The model knows the limit, balances, each job's status, slot and start time, the FIFO (queued
jobs by id), refunds, pause, the provider's view of every task, the scripted submit answers
still to come and the webhook inbox. It predicts every step exactly: which call is refused and
why, who is started, requeued, failed or left unknown, what cleanup ends and how. After every
manager call: the invariant checker finds nothing, status(), balance(), job_detail() and
unmatched_webhooks() say what the model says, and refund-audit is clean (run whenever the model
says the database changed; otherwise the same rows give the same answer).

Webhooks come duplicated, reordered (a failure after a success), late (after cleanup or cancel),
for unknown tasks, and early: a provider wrapper finishes the task and delivers its webhook to
a second manager after the provider accepted the submit and before the submitting manager has
stored the task id (deterministic; tests/test_inbox.py covers the same window with real timing).

Crashes are modelled as the process dying at one of the manager's named fault points: the fault
raises a BaseException (nothing in the manager catches it, the open transaction rolls back, as a
kill -9 would) and the machine then drops the manager and builds a new one over the same database.

Reproduce a failure with AIQUEUE_MODEL_SEED=<the printed seed>; without it each run draws a seed.
AIQUEUE_MODEL_EXAMPLES and AIQUEUE_MODEL_STEPS run a longer hunt; AIQUEUE_MODEL_NO_SHRINK=1 skips
shrinking (which can take Hypothesis's full five minutes).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    get_state_machine_test,
    initialize,
    invariant,
    rule,
)
from sqlalchemy import create_engine, text

from aiqueue.clock import FrozenClock
from aiqueue.errors import (
    ActiveJobError,
    AiqueueError,
    ConflictError,
    InsufficientCreditsError,
    UnknownJobError,
    WrongStateError,
)
from aiqueue.manager import QueueManager
from aiqueue.provider.base import CancelOutcome, SubmitOutcome, TaskOutcome
from aiqueue.provider.runninghub import RUN_PATH, RunningHubClient
from aiqueue.settings import load_settings
from aiqueue.store import Store
from aiqueue.store.tables import metadata
from tests.conftest import API_KEY, make_pg_schema_url, write_config
from tests.invariants import check_invariants_on

LIMITS = (1, 2, 3)  # queue.max_concurrent, drawn per example
STALE = timedelta(minutes=10)  # queue.stale_after in tests/conftest.py's config
USERS = ("ann", "bob", "cy", "dee")
COSTS = {"upscale_image": 5, "upscale_video": 20}
INPUTS = {"upscale_image": {"image": "api/in.png"}, "upscale_video": {"video": "api/in.mp4"}}
HOLDING = ("starting", "running")
ACTIVE = ("queued", "starting", "running")
TERMINAL = ("completed", "failed", "cancelled")
REFUNDED = ("failed", "cancelled")
CRASH_POINTS = (
    "enqueue:after-charge",
    "fill:after-claim",
    "fill:after-accept",
    "end:in-refund",
    "cleanup:between-jobs",
)
EARLY = st.sampled_from([None, None, None, "success", "failed"])  # an early webhook for the next accepted submit
# reject:803 fails that job; reject:802 (our API key) halts the queue: every job would get it.
SUBMIT_ANSWERS = ("accept", "busy", "reject:803", "reject:802", "http500", "lost")
ACCOUNT_CODES = ("802",)
STEPS = (
    timedelta(seconds=1),
    timedelta(seconds=59),
    timedelta(minutes=4),
    timedelta(minutes=5),
    timedelta(minutes=10),
    timedelta(minutes=11),
)
MAX_EXAMPLES = int(os.environ.get("AIQUEUE_MODEL_EXAMPLES", "25"))
STEP_COUNT = int(os.environ.get("AIQUEUE_MODEL_STEPS", "40"))
# Read at import: the suite's autouse fixture clears AIQUEUE_* variables before each test runs.
CHOSEN_SEED = os.environ.get("AIQUEUE_MODEL_SEED")
NO_SHRINK = bool(os.environ.get("AIQUEUE_MODEL_NO_SHRINK"))


class Crash(BaseException):
    """The process died at a fault point (BaseException: no `except Exception` may swallow it)."""


class ModelCrash(Exception):
    """The model's prediction that the armed fault point is reached now."""


# --- the model -------------------------------------------------------------------------------


@dataclass
class MJob:
    id: int
    user: str
    tool: str
    cost: int
    status: str = "queued"
    slot: int | None = None
    started_at: datetime | None = None
    task_id: str | None = None
    unknown: bool = False  # the submit's outcome is unknown: keeps its slot, never resubmitted
    refunded: bool = False
    timeout_noted: bool = False  # a cleanup wrote its timeout reason, then cancelled at the provider


@dataclass
class NewTask:
    """A task the provider created during this step: a job's (recorded) or an orphan's."""

    job_id: int | None
    early: str | None = None  # the outcome an early webhook reported for it


@dataclass
class InboxRow:
    task_id: str
    applied: bool


class Model:
    """The rules, in plain Python. Mutations happen in the order the manager commits them; a
    fault point inside a transaction raises before the model mutates anything of it."""

    def __init__(self, clock: FrozenClock, limit: int) -> None:
        self.clock = clock
        self.limit = limit
        self.balances = dict.fromkeys(USERS, 0)
        self.jobs: dict[int, MJob] = {}
        self.script: deque[str] = deque()
        self.tasks: dict[str, str] = {}  # provider task id -> pending, success, failed, cancel
        self.inbox: dict[str, InboxRow] = {}  # body sha256 -> row
        self.armed: str | None = None
        self.paused = False
        self.submits = 0
        self.early: str | None = None  # outcome of an early webhook for the next accepted submit
        self.new_tasks: list[NewTask] = []
        self.touched: set[int] = set()  # jobs this step changed or asked about
        self.users: set[str] = set()  # users whose balance this step may have changed
        self.expired: list[str] = []  # statuses of the stale jobs this step ended
        # What this step's fill and expiry did, job ids by the result lists the manager returns.
        self.results: dict[str, list[int]] = {}

    @property
    def now(self) -> datetime:
        return self.clock.now()

    def holders(self) -> list[MJob]:
        return sorted((j for j in self.jobs.values() if j.status in HOLDING), key=lambda j: j.slot or 0)

    def queued(self) -> list[MJob]:
        return [self.jobs[i] for i in sorted(self.jobs) if self.jobs[i].status == "queued"]

    def job_of_task(self, task_id: str) -> MJob | None:
        return next((j for j in self.jobs.values() if j.task_id == task_id), None)

    def fingerprint(self) -> tuple[Any, ...]:
        """Everything the database holds about the queue, as the model sees it."""
        return (
            tuple(sorted(self.balances.items())),
            tuple((j.id, j.status, j.slot, j.started_at, j.unknown, j.task_id) for j in self.jobs.values()),
            tuple(sorted((d, r.applied) for d, r in self.inbox.items())),
            self.paused,
        )

    def crash_if(self, point: str) -> None:
        if self.armed == point:
            self.armed = None
            raise ModelCrash(point)

    # -- the rules -----------------------------------------------------------------------

    def grant(self, user: str, amount: int) -> None:
        self.users.add(user)
        self.balances[user] += amount

    def enqueue(self, user: str, tool: str, start: bool, new_id: Callable[[], int]) -> MJob:
        self.users.add(user)
        if any(j.user == user and j.status in ACTIVE for j in self.jobs.values()):
            raise ActiveJobError("model: one active job per user")
        cost = COSTS[tool]
        if self.balances[user] < cost:
            raise InsufficientCreditsError("model: not enough credits")
        self.crash_if("enqueue:after-charge")  # inside the transaction: nothing was kept
        job = MJob(id=new_id(), user=user, tool=tool, cost=cost)
        self.jobs[job.id] = job
        self.balances[user] -= cost
        self.touched.add(job.id)
        if start:
            self.fill()
        return job

    def process_next(self) -> None:
        self.expire()
        self.fill()

    def cleanup(self) -> None:
        self.expire()
        self.fill()

    def end(self, job: MJob, target: str) -> None:
        """The one way to a terminal status: frees the slot, refunds failed and cancelled."""
        assert job.status in HOLDING or (job.status == "queued" and target == "cancelled"), (job, target)
        if target in REFUNDED:
            self.crash_if("end:in-refund")  # inside the transaction: the ending is rolled back
        job.status, job.slot = target, None
        if target in REFUNDED:
            assert not job.refunded
            job.refunded = True
            self.balances[job.user] += job.cost
        self.touched.add(job.id)
        self.users.add(job.user)

    def fill(self) -> None:
        """Claim the oldest queued job for the lowest free slot, submit, record; until no slot
        is free, nothing is queued, or the provider is busy."""
        while True:
            holders = self.holders()
            queued = self.queued()
            if self.paused or len(holders) >= self.limit or not queued:
                break
            job = queued[0]
            used = {h.slot for h in holders}
            job.status, job.started_at, job.unknown = "starting", self.now, False
            job.slot = min(s for s in range(1, self.limit + 1) if s not in used)
            self.touched.add(job.id)
            self.crash_if("fill:after-claim")
            bucket = "unknown"
            answer = self.script.popleft() if self.script else "accept"
            self.submits += 1
            name, _, code = answer.partition(":")
            if name == "reject" and code in ACCOUNT_CODES:
                name = "halt"
            if name == "accept":
                early, self.early = self.early, None
                # The record's transaction applies an early failure with a refund: a fault there
                # rolls the record back, so the task id is never stored (an orphan task).
                lost = self.armed == "fill:after-accept" or (early == "failed" and self.armed == "end:in-refund")
                self.new_tasks.append(NewTask(None if lost else job.id, early))
                if lost:
                    self.armed = None
                    raise ModelCrash("after accept")
                job.status, bucket = "running", "started"
                if early is not None:
                    self.end(job, "completed" if early == "success" else "failed")
            elif name in ("busy", "halt"):
                job.status, job.slot, job.started_at = "queued", None, None
                self.results.setdefault("requeued", []).append(job.id)
                if name == "halt":
                    self.results["halted"] = [job.id]
                return  # stops the fill: the job keeps its place in the FIFO
            elif name == "reject":
                self.end(job, "failed")
                bucket = "failed"
            else:  # http500 or lost: the outcome is unknown
                job.unknown = True
                if name == "lost":
                    self.new_tasks.append(NewTask(None))
            self.results.setdefault(bucket, []).append(job.id)
        # A completed fill leaves no free slot next to a queued job (unless paused).
        assert self.paused or len(self.holders()) == self.limit or not self.queued()

    def expire(self) -> None:
        cutoff = self.now - STALE
        stale = [j for j in sorted(self.jobs.values(), key=lambda j: j.id)
                 if j.status in HOLDING and j.started_at is not None and j.started_at < cutoff]
        for job in stale:
            target, bucket = "failed", "timed_out"
            self.expired.append(job.status)
            if job.status == "running":
                assert job.task_id is not None
                state = self.tasks[job.task_id]
                if state == "success":
                    target, bucket = "completed", "provider_completed"
                elif state == "pending":
                    job.timeout_noted = True  # the reason is written first, in its own transaction
                    self.tasks[job.task_id] = "cancel"  # then the task is cancelled at the provider
                elif not job.timeout_noted:
                    bucket = "provider_failed"
                # else: an earlier cleanup timed it out and cancelled it (and died before the end):
                # the provider's "failed" is that cancel's echo; the timeout is the reason.
            self.end(job, target)
            self.results.setdefault(bucket, []).append(job.id)
            self.crash_if("cleanup:between-jobs")

    def pause(self) -> bool:
        changed, self.paused = not self.paused, True
        return changed

    def resume(self) -> bool:
        changed, self.paused = self.paused, False
        self.fill()
        return changed

    def cancel(self, job_id: int) -> bool:
        job = self.jobs.get(job_id)
        if job is None:
            raise UnknownJobError("model: no such job")
        self.touched.add(job_id)
        if job.status in TERMINAL:
            if job.status == "cancelled":
                return False
            raise WrongStateError("model: terminal jobs never change")
        if job.status == "starting":
            # Only a submit whose answer never came leaves a job starting between steps: RunningHub
            # may be running it, so a plain cancel is refused (its webhook or cleanup settles it).
            raise ConflictError("model: the submit's outcome is unknown")
        if job.status == "running":
            assert job.task_id is not None
            if self.tasks[job.task_id] == "pending":
                self.tasks[job.task_id] = "cancel"
        was = job.status
        self.end(job, "cancelled")
        if was != "queued":
            self.fill()
        return True

    def finish(self, job_id: int, target: str) -> bool:
        job = self.jobs.get(job_id)
        if job is None:
            raise UnknownJobError("model: no such job")
        self.touched.add(job_id)
        if job.status == target:
            return False
        if job.status not in HOLDING:
            raise WrongStateError("model: queued or terminal")
        self.end(job, target)
        self.fill()
        return True

    def webhook(self, body: bytes, task_id: str, outcome: str) -> bool | None:
        """None when no job has the task (kept unmatched); else whether the job changed."""
        digest = hashlib.sha256(body).hexdigest()
        job = self.job_of_task(task_id)
        if job is None:
            self.inbox.setdefault(digest, InboxRow(task_id, applied=False))
            return None
        changed = job.status == "running"
        if changed:
            self.end(job, "completed" if outcome == "success" else "failed")
        self.inbox.setdefault(digest, InboxRow(task_id, applied=True)).applied = True
        self.touched.add(job.id)
        if changed:
            self.fill()
        return changed


# --- the machinery around the real manager ----------------------------------------------------


class HookedProvider:
    """The real RunningHub client with a one-shot hook that runs after the provider accepted a
    submit and before the manager has the answer: the window an early webhook arrives in."""

    def __init__(self, client: RunningHubClient) -> None:
        self.client = client
        self.on_accept: Callable[[str], None] | None = None

    def submit(self, webapp_id: str, node_info_list: list[dict[str, Any]], webhook_url: str | None) -> SubmitOutcome:
        outcome = self.client.submit(webapp_id, node_info_list, webhook_url)
        if outcome.kind == "accepted" and self.on_accept is not None and outcome.task_id:
            hook, self.on_accept = self.on_accept, None
            hook(outcome.task_id)
        return outcome

    def outputs(self, task_id: str) -> TaskOutcome:
        return self.client.outputs(task_id)

    def cancel(self, task_id: str) -> CancelOutcome:
        return self.client.cancel(task_id)


def unknown_task_body(task_id: str, success: bool) -> bytes:
    """A v1 TASK_END body for a task no job has (the shape RunningHub sends)."""
    if success:
        data: Any = {"code": 0, "msg": "success", "data": [{"fileUrl": f"https://cdn.example.com/{task_id}.png"}]}
    else:
        data = {"code": 805, "msg": "APIKEY_TASK_STATUS_ERROR",
                "data": {"failedReason": {"exception_message": "out of memory", "node_name": "KSampler"}}}
    return json.dumps({"event": "TASK_END", "taskId": task_id,
                       "eventData": json.dumps(data, separators=(",", ":"))}).encode("utf-8")


_FAKE_STATES = {"QUEUED": "pending", "RUNNING": "pending", "SUCCESS": "success", "FAILED": "failed",
                "CANCEL": "cancel"}


class Database:
    """A fresh database per example: a new SQLite file, or the test's PostgreSQL schema emptied."""

    def __init__(self, backend: str, tmp_path: Path) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        self.examples = 0
        self.pg_url: str | None = None
        self._drop: Callable[[], None] | None = None
        self._ready = False
        if backend == "postgres":
            self.pg_url, self._drop = make_pg_schema_url()

    def fresh(self) -> str:
        self.examples += 1
        if self.backend == "sqlite":
            return f"sqlite:///{self.tmp_path / f'model-{self.examples}.db'}"
        assert self.pg_url is not None
        if self._ready:
            # DELETE, children first: on a few rows it takes a millisecond where TRUNCATE takes
            # a few hundred. Ids go on from where they were; nothing here depends on them.
            engine = create_engine(self.pg_url)
            try:
                with engine.begin() as conn:
                    for table in reversed(metadata.sorted_tables):
                        if table.name != "aiqueue_queue_state":
                            conn.execute(table.delete())
                    conn.execute(text("UPDATE aiqueue_queue_state SET paused = false"))
            finally:
                engine.dispose()
        return self.pg_url

    def created(self) -> None:
        self._ready = True

    def forget(self, url: str) -> None:
        if self.backend == "sqlite":
            path = Path(url.removeprefix("sqlite:///"))
            for extra in ("", "-wal", "-shm"):
                Path(f"{path}{extra}").unlink(missing_ok=True)

    def close(self) -> None:
        if self._drop is not None:
            self._drop()


def build_machine(db: Database, hub: Any, config: Path, http: httpx.Client) -> type[RuleBasedStateMachine]:
    class QueueModelMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            hub.reset()
            self.url = db.fresh()
            self.clock = FrozenClock(datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc))
            self.limit = LIMITS[1]
            self.settings = self.load_settings()
            self.stores: list[Store] = []
            self.manager, self.provider = self._build()
            self.manager.init_db()
            db.created()
            self.receiver, _ = self._build()  # another process, where webhooks arrive
            self.checker = create_engine(self.url)
            self.model = Model(self.clock, self.limit)
            self.bodies: list[tuple[str, bytes, str]] = []  # task id, webhook body, outcome
            self.unknown_tasks = 0
            self.early_log: list[tuple[str, bytes, Any]] = []
            self.dirty = True  # the manager was used since the last full check
            self.changed = True  # ... and the model says the database changed

        def load_settings(self) -> Any:
            env = {"RUNNINGHUB_API_KEY": API_KEY, "AIQUEUE_MAX_CONCURRENT": str(self.limit)}
            settings = load_settings(config, db_url=self.url, env=env)
            assert settings.max_concurrent == self.limit and settings.stale_after == STALE
            return settings

        def _build(self) -> tuple[QueueManager, HookedProvider]:
            store = Store(self.url)
            self.stores.append(store)
            # A generous timeout: the fake answers at once, and a timeout under a loaded CI
            # machine would turn an accept into an unknown outcome the model did not script.
            client = RunningHubClient(self.settings.base_url, API_KEY, http=http, timeout=30)
            provider = HookedProvider(client)
            return QueueManager(store, self.settings, provider, self.clock), provider

        def teardown(self) -> None:
            for store in self.stores:
                store.dispose()
            self.checker.dispose()
            db.forget(self.url)

        # -- one step: the real call, the model's prediction, then the two compared ----------

        def step(
            self, real: Callable[[], Any], model: Callable[[], Any], early: str | None = None
        ) -> tuple[Any, Any]:
            """Run one manager call and the model's prediction of it, and compare how each ended.
            With `early`, the first submit the provider accepts in this call finishes at once
            and its webhook reaches another process before the task id is stored."""
            self.model.touched.clear()
            self.model.users.clear()
            self.dirty = True
            before = self.model.fingerprint()
            self.model.new_tasks.clear()
            self.model.expired.clear()
            self.model.results.clear()
            self.early_log.clear()
            got: Any = None
            got_error: type[BaseException] | None = None
            if early is not None:
                self.provider.on_accept = self.early_webhook(early)
            try:
                got = real()
            except Crash as exc:
                got_error = Crash
                event(f"crashed at {exc}")
            except AiqueueError as exc:
                got_error = type(exc)
                event(f"refused: {type(exc).__name__}")
            finally:
                self.provider.on_accept = None
            want: Any = None
            want_error: type[BaseException] | None = None
            self.model.early = early
            try:
                want = model()
            except ModelCrash:
                want_error = Crash
            except AiqueueError as exc:
                want_error = type(exc)
            finally:
                self.model.early = None
            assert got_error is want_error, f"manager raised {got_error}, the model expected {want_error}"
            if got_error is Crash:
                self.restart_process()
            self.reconcile_tasks()
            self.changed = self.changed or self.model.fingerprint() != before
            for status in self.model.expired:
                event(f"expired a {status} job")
            return got, want

        def same_fill(self, process: Any) -> None:
            """The manager's account of its fill is the model's: who started, went back to the
            queue (busy), failed at submit, or was left with an unknown outcome."""
            said = {name: [j.id for j in getattr(process, name)] for name in ("started", "requeued", "failed", "unknown")}
            assert said == {name: self.model.results.get(name, []) for name in said}, (said, self.model.results)
            assert (process.halted is not None) == ("halted" in self.model.results), process.halted

        def same_expiry(self, result: Any) -> None:
            buckets = {"timed_out": "expired", "provider_completed": "completed", "provider_failed": "failed"}
            said = {mine: [j.id for j in getattr(result, theirs)] for mine, theirs in buckets.items()}
            assert said == {name: self.model.results.get(name, []) for name in said}, (said, self.model.results)

        def early_webhook(self, outcome: str) -> Callable[[str], None]:
            def deliver_early(task_id: str) -> None:
                body = hub.finish_task(task_id, success=outcome == "success", error="early: bad input", deliver=False)
                self.early_log.append((task_id, body, self.receiver.finish_webhook(body)))

            return deliver_early

        def reconcile_tasks(self) -> None:
            """Tasks the provider created in this step: each recorded job's task id, and orphans
            (a lost answer, a crash after the accept) that no job will ever have."""
            new = set(hub.tasks) - set(self.model.tasks)
            assert len(new) == len(self.model.new_tasks), (sorted(new), self.model.new_tasks)
            assert bool(self.early_log) == any(m.early for m in self.model.new_tasks)
            if not new:
                return
            stored = dict(self._db_jobs_field("provider_task_id"))
            for task_id in new:
                self.model.tasks[task_id] = "pending"
            for made in self.model.new_tasks:
                if made.job_id is not None:
                    task_id = stored[made.job_id]
                    assert task_id in new, (made, task_id)
                    self.model.jobs[made.job_id].task_id = task_id
                if made.early is not None:
                    event("early webhook " + ("applied on record" if made.job_id else "left unmatched by a crash"))
                    [(early_task, body, result)] = self.early_log
                    assert result.job is None and not result.changed and "unmatched" in (result.message or "")
                    if made.job_id is not None:
                        assert self.model.jobs[made.job_id].task_id == early_task
                    digest = hashlib.sha256(body).hexdigest()
                    self.model.inbox[digest] = InboxRow(early_task, applied=made.job_id is not None)
                    self.model.tasks[early_task] = made.early
                    self.bodies.append((early_task, body, made.early))

        def _db_jobs_field(self, column: str) -> list[tuple[int, Any]]:
            with self.checker.connect() as conn:
                return [tuple(r) for r in conn.execute(text(f"SELECT id, {column} FROM aiqueue_jobs"))]

        def restart_process(self) -> None:
            """The process died: drop the manager (its connections) and start a new one."""
            self.manager.store.dispose()
            self.manager, self.provider = self._build()
            self.dirty = True

        def new_job_id(self) -> int:
            ids = {i for i, _ in self._db_jobs_field("status")} - set(self.model.jobs)
            assert len(ids) == 1, ids
            return ids.pop()

        # -- rules --------------------------------------------------------------------------

        @rule(user=st.sampled_from(USERS), amount=st.sampled_from([1, 5, 20, 50]))
        def grant(self, user: str, amount: int) -> None:
            got, _ = self.step(lambda: self.manager.grant(user, amount), lambda: self.model.grant(user, amount))
            assert got.balance == self.model.balances[user]

        @initialize(
            limit=st.sampled_from(LIMITS),
            amounts=st.lists(st.sampled_from([0, 5, 25, 100, 100]), min_size=len(USERS), max_size=len(USERS)),
        )
        def opening(self, limit: int, amounts: list[int]) -> None:
            """The concurrency limit this example runs with (1 makes a queue at once, 3 leaves
            room), and the users' opening balances."""
            if limit != self.limit:
                self.limit = self.model.limit = limit
                self.settings = self.load_settings()
                self.manager.store.dispose()
                self.receiver.store.dispose()
                self.manager, self.provider = self._build()
                self.receiver, _ = self._build()
            for user, amount in zip(USERS, amounts):
                if amount:
                    self.grant(user, amount)

        @rule(user=st.sampled_from(USERS), tool=st.sampled_from(sorted(COSTS)), early=EARLY)
        def enqueue_and_start(self, user: str, tool: str, early: str | None) -> None:
            self.enqueue(user, tool, start=True, early=early)

        @rule(jobs=st.lists(st.tuples(st.sampled_from(USERS), st.sampled_from(sorted(COSTS))), min_size=2, max_size=4),
              start=st.booleans())
        def enqueue_burst(self, jobs: list[tuple[str, str]], start: bool) -> None:
            """Several enqueues in a row (a queue forms; a user may try a second job), each
            checked against the model as a step of its own."""
            for n, (user, tool) in enumerate(jobs):
                if n:
                    self.agrees_with_the_model()
                self.enqueue(user, tool, start)

        @rule(user=st.sampled_from(USERS), tool=st.sampled_from(sorted(COSTS)), start=st.booleans())
        def enqueue(self, user: str, tool: str, start: bool, early: str | None = None) -> None:
            got, want = self.step(
                lambda: self.manager.enqueue(user, tool, INPUTS[tool], start=start),
                lambda: self.model.enqueue(user, tool, start, self.new_job_id),
                early,
            )
            if got is not None:
                self.same_fill(got.process)
                assert got.job.id == want.id and str(got.job.status) == want.status
                if want.status == "queued":
                    assert got.job.position == [j.id for j in self.model.queued()].index(want.id) + 1

        @rule(early=EARLY)
        def process_next(self, early: str | None) -> None:
            got, _ = self.step(self.manager.process_next, self.model.process_next, early)
            if got is not None:
                self.same_fill(got)
                ended = [self.model.results.get(b, []) for b in ("timed_out", "provider_completed", "provider_failed")]
                assert [j.id for j in got.expired] == [i for ids in ended for i in ids]

        @rule(answers=st.lists(st.sampled_from(SUBMIT_ANSWERS), min_size=1, max_size=3))
        def script_provider(self, answers: list[str]) -> None:
            """The next submits get these answers (then accept), as scripted at the fake."""
            hub.script_submits(answers)
            self.model.script = deque(answers)

        @rule(data=st.data(), how=st.sampled_from(["success", "failed", "running"]),
              deliver=st.sampled_from([True, True, False]), any_task=st.booleans())
        def provider_finishes(self, data: st.DataObject, how: str, deliver: bool, any_task: bool) -> None:
            """A running job's task ends at the provider (or any task: an orphan's, or one that
            ended before, maybe differently); its webhook arrives now, or is kept for later
            (maybe never: then cleanup asks the provider)."""
            if not self.model.tasks:
                return
            running = sorted(j.task_id for j in self.model.jobs.values() if j.status == "running" and j.task_id)
            pool = sorted(self.model.tasks) if any_task or not running else running
            task_id = data.draw(st.sampled_from(pool), label="task")
            owner = self.model.job_of_task(task_id)
            event(f"provider: {how} for a task of " + (f"a {owner.status} job" if owner else "no job"))
            if how == "running":
                if self.model.tasks[task_id] == "pending":
                    hub.set_running(task_id)  # QUEUED -> RUNNING: still pending to everyone
                return
            body = hub.finish_task(task_id, success=how == "success", error="CUDA out of memory", deliver=False)
            self.model.tasks[task_id] = how
            self.bodies.append((task_id, body, how))
            if deliver:
                self.deliver(task_id, body, how)

        @rule(data=st.data())
        def deliver_webhook(self, data: st.DataObject) -> None:
            """Any body kept so far: the first time, a duplicate, out of order, or late."""
            if not self.bodies:
                return
            task_id, body, outcome = data.draw(st.sampled_from(self.bodies), label="webhook")
            self.deliver(task_id, body, outcome)

        def deliver(self, task_id: str, body: bytes, outcome: str) -> None:
            got, want = self.step(lambda: self.manager.finish_webhook(body),
                                  lambda: self.model.webhook(body, task_id, outcome))
            if got is None:
                return
            event("webhook: " + ("unmatched" if want is None else "applied" if want else "duplicate or late"))
            if want is None:
                assert got.job is None and not got.changed and "unmatched" in (got.message or "")
            else:
                assert got.job is not None and got.changed is want
                mjob = self.model.jobs[got.job.id]
                assert str(got.job.status) == mjob.status
                assert got.refunded == (mjob.cost if want and outcome == "failed" else 0)
            self.same_fill(got.process)

        @rule(success=st.booleans())
        def deliver_unknown_task_webhook(self, success: bool) -> None:
            self.unknown_tasks += 1
            task_id = f"12345{self.unknown_tasks:014d}"
            body = unknown_task_body(task_id, success)
            self.bodies.append((task_id, body, "success" if success else "failed"))
            got, _ = self.step(lambda: self.manager.finish_webhook(body),
                               lambda: self.model.webhook(body, task_id, "x"))
            assert got.job is None and not got.changed

        def pick_job(self, data: st.DataObject, any_job: bool) -> int | None:
            """An active job (the interesting case), or with any_job any job at all."""
            active = sorted(j.id for j in self.model.jobs.values() if j.status in ACTIVE)
            pool = sorted(self.model.jobs) if any_job or not active else active
            return data.draw(st.sampled_from(pool), label="job") if pool else None

        @rule(data=st.data(), any_job=st.booleans())
        def cancel(self, data: st.DataObject, any_job: bool) -> None:
            job_id = self.pick_job(data, any_job)
            if job_id is None:
                return
            event(f"cancel a {self.model.jobs[job_id].status} job")
            got, want = self.step(lambda: self.manager.cancel(job_id, "changed my mind"),
                                  lambda: self.model.cancel(job_id))
            if got is not None:
                assert got.changed is want and str(got.job.status) == "cancelled"
                assert got.refunded == (self.model.jobs[job_id].cost if want else 0)
                self.same_fill(got.process)

        @rule(data=st.data(), ending=st.sampled_from(["completed", "failed"]), any_job=st.booleans())
        def operator_finish(self, data: st.DataObject, ending: str, any_job: bool) -> None:
            job_id = self.pick_job(data, any_job)
            if job_id is None:
                return
            error = "operator: the output was blank" if ending == "failed" else None
            got, want = self.step(lambda: self.manager.finish(job_id, ending, error=error),
                                  lambda: self.model.finish(job_id, ending))
            if got is not None:
                assert got.changed is want and str(got.job.status) == ending
                assert got.refunded == (self.model.jobs[job_id].cost if want and ending == "failed" else 0)
                self.same_fill(got.process)

        @rule(pause=st.booleans())
        def pause_or_resume(self, pause: bool) -> None:
            """Pause stops claims (queued jobs keep their places); resume fills at once."""
            if pause:
                got, want = self.step(self.manager.pause, self.model.pause)
            else:
                got, want = self.step(self.manager.resume, self.model.resume)
            if got is not None:
                assert got.paused is pause and got.changed is want
                self.same_fill(got.process)

        @rule(chore=st.sampled_from(["restart", "refund_audit_fix", "unknown_job_ids"]))
        def operator_chores(self, chore: str) -> None:
            """Rarer operator acts, as one rule so they do not crowd out the queue's traffic."""
            getattr(self, chore)()

        def unknown_job_ids(self) -> None:
            missing = max(self.model.jobs, default=0) + 10**6
            self.step(lambda: self.manager.cancel(missing), lambda: self.model.cancel(missing))
            self.step(lambda: self.manager.finish(missing, "completed"), lambda: self.model.finish(missing, "completed"))

        @rule(delta=st.sampled_from(STEPS), then=st.sampled_from([None, "process_next", "cleanup"]))
        def advance_clock(self, delta: timedelta, then: str | None) -> None:
            self.clock.advance(delta)
            if then == "process_next":
                self.process_next(None)
            elif then == "cleanup":
                self.cleanup()

        @rule(offset=st.sampled_from([-1, 0, 1]), then=st.sampled_from(["process_next", "cleanup"]))
        def clock_to_the_staleness_edge(self, offset: int, then: str) -> None:
            """Put the clock at stale_after (+-1 s) past the claim of the newest job holding a
            slot: held exactly stale_after is kept, a second more is expired."""
            starts = [j.started_at for j in self.model.holders() if j.started_at is not None]
            edge = max(starts, default=self.clock.now()) + STALE + timedelta(seconds=offset)
            if edge > self.clock.now():
                self.clock.advance(edge - self.clock.now())
            self.advance_clock(timedelta(0), then)

        @rule()
        def cleanup(self) -> None:
            got, _ = self.step(self.manager.cleanup, self.model.cleanup)
            if got is not None:
                self.same_expiry(got)
                self.same_fill(got.process)

        @rule(point=st.sampled_from(CRASH_POINTS))
        def arm_crash(self, point: str) -> None:
            """The next time the manager reaches `point`, its process dies there (this replaces
            a crash armed before and not reached yet)."""

            def fault(at: str) -> None:
                if at == point:
                    raise Crash(at)

            self.manager.fault = fault  # type: ignore[method-assign]
            self.model.armed = point

        def restart(self) -> None:
            """A restart between commands (a deploy, a reboot): nothing may change."""
            self.restart_process()
            self.model.armed = None

        def refund_audit_fix(self) -> None:
            result = self.manager.refund_audit(fix=True)
            self.dirty = self.changed = True
            assert result.ok and result.fixed == [], result.to_dict()

        # -- after every step ---------------------------------------------------------------

        @invariant()
        def agrees_with_the_model(self) -> None:
            """After every step that used the manager (the others - the clock, the provider's
            script, a task ending at the provider, arming a crash - cannot touch the database):
            the invariant checker and the manager's views against the model. refund-audit runs
            whenever the model says the database changed (elsewhere its answer cannot differ
            from the last one: the same rows, as the comparisons below prove)."""
            self.provider_agrees()
            if not self.dirty:
                return
            model = self.model
            assert check_invariants_on(self.checker, self.limit) == []
            if self.changed:
                assert self.manager.refund_audit().ok
            self.dirty = self.changed = False

            with self.checker.connect() as conn:
                rows = {r.id: r for r in conn.execute(
                    text("SELECT id, status, slot, provider_task_id FROM aiqueue_jobs"))}
                balances = dict(conn.execute(text("SELECT user_id, balance FROM aiqueue_accounts")).all())
            assert set(rows) == set(model.jobs)
            for job_id, row in rows.items():
                mjob = model.jobs[job_id]
                assert (row.status, row.slot, row.provider_task_id) == (mjob.status, mjob.slot, mjob.task_id), (
                    job_id, row, mjob)
            assert {u: balances.get(u, 0) for u in USERS} == model.balances
            for user in sorted(model.users):
                assert self.manager.balance(user).balance == model.balances[user], user

            status = self.manager.status()
            assert status.limit == self.limit and len(status.running) <= self.limit
            assert status.paused is model.paused
            assert [(j.id, j.slot, str(j.status), j.started_at) for j in status.running] == [
                (j.id, j.slot, j.status, j.started_at) for j in model.holders()
            ]
            queued = model.queued()
            assert [(j.id, j.position) for j in status.queued] == [(j.id, n) for n, j in enumerate(queued, 1)]
            assert status.queued_total == len(queued)

            for job_id in sorted(model.touched):
                detail = self.manager.job_detail(job_id)
                mjob = model.jobs[job_id]
                assert str(detail.job.status) == mjob.status
                if mjob.status == "queued":
                    assert detail.job.position == queued.index(mjob) + 1
                kinds = Counter(str(e.kind) for e in detail.ledger)
                assert kinds == Counter(["charge"] + (["refund"] if mjob.refunded else [])), (job_id, kinds)
                if mjob.status == "starting" and mjob.unknown:
                    assert "submit outcome unknown" in (detail.job.error or "")
                if mjob.status in ("failed", "cancelled"):
                    assert detail.job.error, detail.job

            unmatched = sorted(w.task_id for w in self.manager.unmatched_webhooks())
            assert unmatched == sorted(r.task_id for r in model.inbox.values() if not r.applied)

        def provider_agrees(self) -> None:
            """Every task is where the model says, and nothing was submitted the model did not
            expect (an unknown outcome is never resubmitted)."""
            fake = hub.tasks
            assert {t: _FAKE_STATES[fake[t].status] for t in self.model.tasks} == self.model.tasks
            submits = sum(1 for r in hub.requests if r["path"] == RUN_PATH)
            assert submits == self.model.submits, "a submit the model did not expect"

    return QueueModelMachine


def test_the_manager_agrees_with_the_model(backend: str, tmp_path: Path, fake_hub: Any) -> None:
    config = write_config(tmp_path / "aiqueue.toml", fake_hub.base_url, max_concurrent=LIMITS[1])
    db = Database(backend, tmp_path)
    http = httpx.Client()  # one transport for every example: building its SSL context is slow
    machine = build_machine(db, fake_hub, config, http)
    run_seed = int(CHOSEN_SEED) if CHOSEN_SEED else random.getrandbits(32)
    machine_settings = settings(
        max_examples=MAX_EXAMPLES,
        stateful_step_count=STEP_COUNT,
        deadline=None,
        print_blob=True,
        database=None,  # a run is a function of its seed alone
        suppress_health_check=[HealthCheck.too_slow],
        # Shrinking a failure can take Hypothesis's full five minutes; skip it when hunting.
        phases=[p for p in Phase if not (NO_SHRINK and p in (Phase.shrink, Phase.explain))],
    )
    test = hypothesis_seed(run_seed)(get_state_machine_test(machine, settings=machine_settings))
    try:
        test()
    except BaseException as exc:
        note = f"model test seed {run_seed} ({backend}): rerun with AIQUEUE_MODEL_SEED={run_seed}"
        print(note)
        exc.add_note(note)
        raise
    finally:
        http.close()
        db.close()

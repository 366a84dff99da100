"""QueueManager: the single source of truth for the queue's rules.

Every CLI command is a thin layer over one method here. The manager never prints and never
imports the CLI; it returns result objects from aiqueue.domain. Each state change is one
transaction built around a guarded update; its row count decides the side effects (refund,
starting the next job). Provider calls happen between transactions, never inside one.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from aiqueue.clock import Clock, SystemClock, format_duration
from aiqueue.domain import (
    REFUNDED,
    TERMINAL,
    TRANSITIONS,
    AuditProblem,
    AuditResult,
    Balance,
    CleanupResult,
    EnqueueResult,
    FinishResult,
    GrantResult,
    Job,
    JobDetail,
    LedgerEntry,
    LedgerKind,
    PauseResult,
    ProcessResult,
    QueueStatus,
    Status,
    UnmatchedWebhook,
    UserStatus,
)
from aiqueue.errors import (
    ConflictError,
    InputError,
    InsufficientCreditsError,
    Interrupted,
    ProviderError,
    UnknownJobError,
    UnknownToolError,
    UsageError,
    WrongStateError,
)
from aiqueue.provider.base import Provider, SubmitOutcome, TaskOutcome
from aiqueue.provider.codes import ACCOUNT_CODES

if TYPE_CHECKING:
    from aiqueue.settings import Settings, ToolSpec
    from aiqueue.store import Store, Tx

MAX_CREDITS = 10**12  # one grant; far above any real top-up, far below BIGINT
MAX_USER_LENGTH = 200
MAX_INPUT_BYTES = 16 * 1024  # one input value (a path, a URL or a prompt), UTF-8
MAX_NOTE_LENGTH = 2000  # notes, reasons and operator error messages
MAX_OUTPUTS = 100
_RETRIES = 5  # re-reads when a guarded update lost a race


@dataclass(frozen=True)
class _Ended:
    job: Job
    refunded: int


def _no_fault(point: str) -> None:
    """Crash points are inert in the product. The test suite's own runner (tests/crash_runner.py)
    replaces QueueManager.fault in its process to kill itself at a named point; no flag,
    variable or file turns them on."""


class QueueManager:
    fault: Callable[[str], None] = staticmethod(_no_fault)

    def __init__(
        self,
        store: Store,
        settings: Settings,
        provider: Provider | Callable[[], Provider] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock or SystemClock()
        self._provider_or_factory = provider
        self._provider: Provider | None = None

    # --- schema and credits ---------------------------------------------------------------

    def init_db(self) -> bool:
        """Create the schema if it is missing (idempotent). True when it was created now."""
        return self.store.init_schema()

    def grant(self, user: str, amount: int, note: str | None = None) -> GrantResult:
        """Add credits to a user's balance with a `grant` ledger entry."""
        user = _check_user(user)
        amount = _check_amount(amount)
        note = _check_text(note, "note")
        now = self.clock.now()

        def tx_fn(tx: Tx) -> GrantResult:
            balance = tx.credit(user, amount, now)
            entry = tx.add_ledger(user, None, LedgerKind.GRANT, amount, now, note)
            assert entry is not None  # grants carry no job id, so the unique index never applies
            return GrantResult(entry=entry, balance=balance)

        return self.store.run(tx_fn)

    def balance(self, user: str) -> Balance:
        """A user's balance (0 for a user never seen)."""
        user = _check_user(user)
        return Balance(user=user, balance=self.store.read(lambda tx: tx.balance(user)))

    def ledger(
        self, user: str | None = None, job_id: int | None = None, limit: int | None = None
    ) -> list[LedgerEntry]:
        """Ledger entries, oldest first, optionally for one user or one job; with limit, the
        newest `limit` of them."""
        if user is not None:
            user = _check_user(user)
        if job_id is not None:
            job_id = _check_job_id(job_id)
        return self.store.read(lambda tx: tx.ledger_entries(user, job_id, limit))

    # --- the queue ------------------------------------------------------------------------

    def enqueue(
        self, user: str, tool: str, inputs: Mapping[str, str] | None = None, *, start: bool = True
    ) -> EnqueueResult:
        """Create a queued job and charge its cost in one transaction; then, unless start is
        False, fill the free slots in FIFO order (the same code as process_next)."""
        user = _check_user(user)
        spec = self._tool(tool)
        resolved = _resolve_inputs(spec, inputs or {})
        if start:
            self._get_provider()  # a missing API key is refused before anything is charged
        now = self.clock.now()

        def tx_fn(tx: Tx) -> Job:
            # Insert before debiting: jobs, then accounts, is the lock order of every path.
            job = tx.insert_job(user, tool, spec.cost, resolved, now)
            if not tx.debit(user, spec.cost, now):
                available = tx.balance(user)
                raise InsufficientCreditsError(
                    f"user {user!r} has {available} credits; {tool} costs {spec.cost}",
                    user=user,
                    needed=spec.cost,
                    available=available,
                )
            tx.add_ledger(user, job.id, LedgerKind.CHARGE, -spec.cost, now, f"{tool} job {job.id}")
            tx.add_event(job.id, None, Status.QUEUED, now, "enqueued")
            self.fault("enqueue:after-charge")
            return replace(job, position=tx.position(job.id))

        job = self.store.run(tx_fn)
        process = self._fill() if start else ProcessResult()
        if process.started or process.failed or process.unknown or process.requeued:
            job = self._job(job.id)
        return EnqueueResult(job=job, process=process)

    def status(self, limit: int | None = None, window: timedelta = timedelta(hours=24)) -> QueueStatus:
        """Jobs holding slots and the queued jobs in FIFO order with exact positions and
        estimated starts (the first `limit` of them), counts per status (terminal ones: finished
        within `window`), the oldest queued job's age and whether the queue is paused."""
        from aiqueue import overview

        return overview.queue_status(self.store, self.settings.max_concurrent, self.clock, limit, window)

    def user_status(self, user: str) -> UserStatus:
        """One user's active job with its position and estimated start, and their latest jobs.
        NotFoundError when the user has neither jobs nor an account."""
        from aiqueue import overview

        return overview.user_status(self.store, self.settings.max_concurrent, self.clock, _check_user(user))

    def jobs(
        self, statuses: Sequence[str] = (), user: str | None = None, tool: str | None = None,
        since: timedelta | datetime | None = None, limit: int | None = 50, *, stream: bool = False,
    ) -> Iterable[Job]:
        """Jobs newest first, filtered by status (names, comma lists allowed), user, tool and
        creation time (`since`: an aware datetime, or a duration back from now). A list of at most
        `limit`; with stream=True an iterator over one read transaction, in bounded memory."""
        from aiqueue import overview

        wanted = overview.parse_statuses(statuses)
        user = None if user is None else _check_user(user)
        cutoff = overview.since_of(since, self.clock)
        if stream:
            return overview.stream_jobs(self.store, wanted, user, tool, cutoff, limit)
        return overview.list_jobs(self.store, wanted, user, tool, cutoff, limit)

    def listen(self) -> Any:
        """A listener whose wait(timeout) returns True as soon as the queue changes (PostgreSQL
        LISTEN/NOTIFY on a dedicated connection) or False after the timeout (SQLite: always)."""
        return self.store.listener()

    def pause(self) -> PauseResult:
        """Stop submitting: queued jobs keep their places, running ones finish normally."""
        changed = self.store.run(lambda tx: tx.set_paused(True))
        return PauseResult(paused=True, changed=changed)

    def resume(self) -> PauseResult:
        """Submit again, filling the free slots at once (the same fill as process_next)."""
        changed = self.store.run(lambda tx: tx.set_paused(False))
        return PauseResult(paused=False, changed=changed, process=self._fill())

    def job_detail(self, job_id: int) -> JobDetail:
        """One job with its position (when queued), its status history and its ledger entries."""
        job_id = _check_job_id(job_id)

        def tx_fn(tx: Tx) -> JobDetail:
            job = tx.get_job(job_id)
            if job is None:
                raise UnknownJobError(f"no job with id {job_id}", job_id=job_id)
            start, approximate = None, False
            if job.status is Status.QUEUED:
                from aiqueue.overview import estimate_start

                start, approximate = estimate_start(
                    tx, job, self.settings.max_concurrent, self.clock.now(), tx.is_paused())
            return JobDetail(job=job, events=tx.events_of(job_id), ledger=tx.ledger_entries(job_id=job_id),
                             estimated_start=start, approximate=approximate)

        return self.store.read(tx_fn)

    def process_next(self) -> ProcessResult:
        """End stale jobs first (so a missing cron never blocks the queue), then fill every free
        slot in FIFO order."""
        expired = self._expire(self.settings.stale_after)
        finished = [] if self.settings.receives_webhooks else self._poll()
        return replace(self._fill(), expired=expired.expired + expired.completed + expired.failed, finished=finished)

    def _poll(self) -> list[Job]:
        """Without a webhook URL, results come by asking: RunningHub is asked about each running
        job's task, and an ended one ends here by the same path as its webhook. Doubt (pending,
        unreachable, an account-level answer) leaves the job running."""
        running = self.store.read(
            lambda tx: [j for j in tx.holding_slots() if j.status is Status.RUNNING and j.provider_task_id])
        ended: list[Job] = []
        for job in running:
            assert job.provider_task_id is not None
            outcome = self._get_provider().outputs(job.provider_task_id)
            if outcome.kind not in ("success", "failed"):
                continue

            def tx_fn(tx: Tx, job: Job = job, outcome: TaskOutcome = outcome) -> FinishResult | None:
                current = tx.get_job(job.id)
                if current is None or current.status is not Status.RUNNING:
                    return None  # a webhook or a cleanup got there first
                return self._apply(tx, current, outcome, "poll", strict=False)

            result = self.store.run(tx_fn)
            if result is not None and result.changed and result.job is not None:
                ended.append(result.job)
        return ended

    # --- ending jobs ----------------------------------------------------------------------

    def finish(
        self, job_id: int, status: Status | str, error: str | None = None, outputs: list[str] | None = None
    ) -> FinishResult:
        """An operator's finish: completed (with outputs) or failed (with the real message,
        refunded). A repeat of the same finish changes nothing; a different ending of a terminal
        job is refused."""
        target = Status(status)
        if target not in (Status.COMPLETED, Status.FAILED):
            raise UsageError(f"finish takes completed or failed, not {target}")
        if target is Status.FAILED and not (error and error.strip()):
            raise UsageError("a failed job needs its real error message: give --error")
        if target is Status.COMPLETED and error:
            raise UsageError("--error goes with --status failed")
        job_id = _check_job_id(job_id)
        error = _check_text(error, "error message")
        outputs = list(outputs or [])
        if len(outputs) > MAX_OUTPUTS or any(
            not isinstance(url, str) or not url.strip() or len(url) > 4096 or _has_control(url) for url in outputs
        ):
            raise UsageError(f"outputs must be at most {MAX_OUTPUTS} non-empty URLs of at most 4096 characters")
        outcome = TaskOutcome(
            kind="success" if target is Status.COMPLETED else "failed",
            outputs=list(outputs or []),
            message=error,
        )
        return self._finish(lambda tx: tx.get_job(job_id), outcome, source="operator", job_id=job_id)


    def finish_webhook(self, raw: bytes, job_hint: int | None = None, *, fill: bool = True) -> FinishResult:
        """Apply a raw RunningHub webhook body through the same path as finish. The body is
        kept in the inbox first (once per distinct body): one that arrives before its task id
        is stored is applied as soon as the submit is recorded. Duplicates and unknown tasks
        change nothing; a malformed body raises InvalidWebhookError and is not kept.

        job_hint is the job id the webhook URL carried (`?job=ID`): when no job has the task
        and that job is still `starting` without a task id (its submit was accepted but the id
        never stored: a crash or a lost answer), the task is attached to it first. With fill
        False the caller starts the next jobs itself (the receiver answers RunningHub first)."""
        from aiqueue.webhooks import parse_webhook

        event = parse_webhook(raw)
        digest = hashlib.sha256(raw).hexdigest()
        body = raw.decode("utf-8")

        def tx_fn(tx: Tx) -> FinishResult:
            now = self.clock.now()
            tx.lock_task(event.task_id)
            inbox_id, _ = tx.store_webhook(event.task_id, digest, body, now)
            job = tx.get_job_by_task(event.task_id)
            if job is None and job_hint is not None:
                job = self._adopt_task(tx, job_hint, event.task_id)
            if job is None:
                message = f"no job has provider task {event.task_id} yet; kept as unmatched webhook {inbox_id}"
                hinted = self._ended_without_task(tx, job_hint)
                if hinted is not None:
                    # Its submit's answer never came and it was ended (cleanup, a forced cancel)
                    # before RunningHub's result: terminal jobs never change; say where it went.
                    message = (f"job {hinted.id} (named by the webhook URL) had already ended {hinted.status} "
                               f"before RunningHub's {event.outcome.kind} result for task {event.task_id} came: "
                               f"not applied, kept as unmatched webhook {inbox_id}")
                return FinishResult(job=None, changed=False, message=message)
            result = self._apply(tx, job, event.outcome, "webhook", strict=False)
            tx.mark_webhook(inbox_id, job.id, result.message or f"job {job.id} {result.job.status}", now)
            return result

        result = self.store.run(tx_fn)
        return self._after(result) if fill else result

    def _ended_without_task(self, tx: Tx, job_id: int | None) -> Job | None:
        if not _is_hint(job_id):
            return None
        job = tx.get_job(job_id)
        return job if job is not None and job.status in TERMINAL and job.provider_task_id is None else None

    def _adopt_task(self, tx: Tx, job_id: int, task_id: str) -> Job | None:
        if not _is_hint(job_id):
            return None  # only a hint: the webhook is kept all the same
        job = tx.get_job(job_id, for_update=True)
        if job is None or job.status is not Status.STARTING or job.provider_task_id is not None:
            return None
        now = self.clock.now()
        running = tx.transition(job.id, [Status.STARTING], Status.RUNNING, now, provider_task_id=task_id,
                                error=None)
        if running is not None:
            tx.add_event(job.id, Status.STARTING, Status.RUNNING, now, f"provider task {task_id} (from its webhook)")
        return running

    def unmatched_webhooks(self) -> list[UnmatchedWebhook]:
        """Webhooks kept in the inbox whose task no job has (yet), oldest first."""
        rows = self.store.read(lambda tx: tx.unapplied_webhooks())
        return [UnmatchedWebhook(id=r.id, task_id=r.task_id, received_at=r.received_at, body=r.body) for r in rows]

    def cancel(self, job_id: int, reason: str | None = None, *, force: bool = False) -> FinishResult:
        """Cancel a queued, starting or running job (a running one at the provider too) and
        refund it. A running job whose cancel RunningHub does not confirm keeps its slot (it may
        still run and be billed): the answer is a ProviderError, unless the task had already
        ended there (then the job ends as it did). A starting job (being sent, or sent with no
        answer) is refused too: RunningHub may be running it; its webhook or cleanup settles it.
        With force, both end here anyway, refunded, and the history says so."""
        job_id = _check_job_id(job_id)
        reason = _check_text(reason, "reason")
        note = reason.strip() if reason and reason.strip() else "cancelled by operator"
        provider_note: str | None = None
        for _ in range(_RETRIES):
            job = self._job(job_id)
            if job.status in TERMINAL:
                return self._already(job, Status.CANCELLED, strict=True)
            if job.status is Status.STARTING:
                # Being sent, or sent with no answer: RunningHub may be creating (and billing) a
                # task whose id we do not have, so nothing here could cancel it there.
                if not force:
                    why = job.error or "it is being sent right now"
                    raise ConflictError(
                        f"job {job_id} is starting ({why}): RunningHub may be running it, and it cannot be "
                        "cancelled there before its task id is known. Cancel it once it runs; an unanswered "
                        f"submit is settled by its webhook or by cleanup after "
                        f"{format_duration(self.settings.stale_after)}; `cancel --force` ends it here now "
                        "(refunded; a task there may still run and be billed)",
                        job_id=job_id,
                    )
            if job.status is Status.RUNNING and provider_note is None and job.provider_task_id:
                answer = self._get_provider().cancel(job.provider_task_id)
                if answer.ok:
                    provider_note = "provider cancelled the task"
                elif force:
                    provider_note = f"forced: provider cancel failed: {answer.message}"
                else:
                    ended = self._settle_at_provider(job)
                    if ended is not None:
                        return ended
                    raise ProviderError(
                        f"RunningHub did not confirm cancelling task {job.provider_task_id} of job {job_id}: "
                        f"{answer.message}. The job keeps its slot and stays running; try again, or "
                        "`cancel --force` to end it here (refunded; the task may still run and be billed)",
                        job_id=job_id,
                    )
            if job.status is Status.RUNNING and provider_note is None:
                continue
            # Said of this attempt only: a starting job that runs by the next attempt is then
            # cancelled at RunningHub like any running one.
            said = "forced: the job was starting, its submit's outcome unknown" if job.status is Status.STARTING \
                else provider_note
            detail = note if said is None else f"{note}; {said}"
            seen = job

            def tx_fn(tx: Tx) -> _Ended | Job | None:
                current = tx.get_job(job_id)
                if current is None or current.status != seen.status:
                    return current
                return self._end(tx, current, Status.CANCELLED, detail, error=note)

            ended = self.store.run(tx_fn)
            if isinstance(ended, _Ended):
                return FinishResult(
                    job=ended.job, changed=True, refunded=ended.refunded, message=said,
                    process=self._fill() if seen.status is not Status.QUEUED else ProcessResult(),
                )
        raise ConflictError(f"job {job_id} kept changing while being cancelled; try again", job_id=job_id)

    def _settle_at_provider(self, job: Job) -> FinishResult | None:
        """A cancel RunningHub refused: if the task has already ended there, end the job as it
        did (the same path as its webhook); None when it is still running or cannot be asked."""
        assert job.provider_task_id is not None
        outcome = self._get_provider().outputs(job.provider_task_id)
        if outcome.kind not in ("success", "failed"):
            return None
        result = self._finish(lambda tx: tx.get_job(job.id), outcome, source="provider (asked at cancel)",
                              job_id=job.id)
        ended = "completed" if outcome.kind == "success" else "failed"
        return replace(result, message=f"not cancelled: the task had already {ended} at RunningHub")

    def cleanup(
        self, older_than: timedelta | None = None, *, dry_run: bool = False, progress: Progress | None = None
    ) -> CleanupResult:
        """End jobs that have held a slot longer than `older_than` (default queue.stale_after),
        asking the provider first; refund the failed ones; then start the next jobs. With
        dry_run, only list the stale jobs: no provider call, no change."""
        if dry_run:
            cutoff = self.clock.now() - (older_than or self.settings.stale_after)
            stale = self.store.read(lambda tx: tx.stale(cutoff))
            return CleanupResult(expired=[], completed=[], failed=[], stale=stale, dry_run=True)
        result = self._expire(older_than or self.settings.stale_after, progress or _no_progress)
        return replace(result, process=self._fill())

    # --- the refund audit -----------------------------------------------------------------

    def refund_audit(
        self, fix: bool = False, *, dry_run: bool = False, progress: Progress | None = None
    ) -> AuditResult:
        """Compare jobs, ledger and cached balances. With fix, add missing refunds and reset
        cached balances to the ledger's sum (idempotent); other problems need a human. With
        fix and dry_run, list what fix would change and change nothing. `progress(done, total)`
        is told of each step (the checks, then each fix)."""
        tick = progress or _no_progress
        problems = self._audit(tick)
        if not fix:
            return AuditResult(problems=problems, fixed=[])
        if dry_run:
            return AuditResult(problems=problems, fixed=[], would_fix=_fixable(problems), dry_run=True)
        fixed: list[AuditProblem] = []
        refunds = [p for p in problems if p.kind == "missing_refund"]
        for done, problem in enumerate(refunds, start=1):
            if self._fix_refund(problem):
                fixed.append(problem)
            tick(done, len(refunds))
        remaining = self._audit(tick)
        for problem in _fixable(remaining):
            if problem.kind == "balance_mismatch" and self._fix_balance(problem.user):
                fixed.append(problem)
        return AuditResult(problems=self._audit(tick), fixed=fixed)

    # --- internals ------------------------------------------------------------------------

    def _finish(
        self, lookup: Callable[[Tx], Job | None], outcome: TaskOutcome, *, source: str, job_id: int
    ) -> FinishResult:
        def tx_fn(tx: Tx) -> FinishResult:
            job = lookup(tx)
            if job is None:
                raise UnknownJobError(f"no job with id {job_id}", job_id=job_id)
            return self._apply(tx, job, outcome, source, strict=True)

        return self._after(self.store.run(tx_fn))

    def _after(self, result: FinishResult) -> FinishResult:
        """A slot was freed: start the next jobs (the same fill as process_next)."""
        return replace(result, process=self._fill()) if result.changed else result

    def _apply(self, tx: Tx, job: Job, outcome: TaskOutcome, source: str, *, strict: bool) -> FinishResult:
        """End `job` as the outcome says, inside the caller's transaction. A terminal job is a
        duplicate (or, when strict, a conflicting request); a queued one was never started."""
        if outcome.kind not in ("success", "failed"):
            raise UsageError(f"a finish needs success or failure, not {outcome.kind}")
        target = Status.COMPLETED if outcome.kind == "success" else Status.FAILED
        detail = f"{source}: " + ("completed" if target is Status.COMPLETED else (outcome.message or "failed"))
        for _ in range(_RETRIES):
            if job.status in TERMINAL:
                return self._already(job, target, strict=strict)
            if job.status is Status.QUEUED:
                raise WrongStateError(
                    f"job {job.id} is queued and was never started: cancel it instead",
                    job_id=job.id, status=str(job.status),
                )
            ended = self._end(
                tx, job, target, detail,
                error=outcome.message if target is Status.FAILED else None,
                outputs=outcome.outputs,
            )
            if ended is not None:
                return FinishResult(job=ended.job, changed=True, refunded=ended.refunded)
            current = tx.get_job(job.id)  # lost a race: look again
            assert current is not None
            job = current
        raise ConflictError(f"job {job.id} kept changing while being finished; try again", job_id=job.id)

    def _already(self, job: Job, wanted: Status, *, strict: bool) -> FinishResult:
        if job.status is wanted or not strict:
            return FinishResult(job=job, changed=False, message=f"job {job.id} is already {job.status}")
        raise WrongStateError(
            f"job {job.id} is already {job.status}; terminal jobs never change",
            job_id=job.id, status=str(job.status),
        )

    def _end(
        self,
        tx: Tx,
        job: Job,
        target: Status,
        detail: str,
        *,
        error: str | None = None,
        outputs: list[str] | None = None,
    ) -> _Ended | None:
        """The one place a job reaches a terminal status: guarded on the status we read, it
        frees the slot, records the event and refunds failed and cancelled jobs (the unique
        index on the ledger makes a second refund impossible)."""
        assert target in TERMINAL and target in TRANSITIONS[job.status], (job.status, target)
        now = self.clock.now()
        error, detail = self._redact(error), self._redact(detail) or detail
        values: dict[str, Any] = {"finished_at": now, "error": error}
        if outputs:
            values["outputs"] = outputs
        ended = tx.transition(job.id, [job.status], target, now, **values)
        if ended is None:
            return None
        tx.add_event(job.id, job.status, target, now, detail)
        refunded = 0
        if target in REFUNDED:
            entry = tx.add_ledger(job.user, job.id, LedgerKind.REFUND, job.cost, now, f"{target} job {job.id}")
            self.fault("end:in-refund")
            if entry is not None:
                tx.credit(job.user, job.cost, now)
                refunded = job.cost
        return _Ended(job=ended, refunded=refunded)

    def _fill(self) -> ProcessResult:
        """Claim the oldest queued job for a free slot, submit it, record the answer; repeat
        until no slot is free, nothing is queued or the provider says it is busy."""
        started: list[Job] = []
        requeued: list[Job] = []
        failed: list[Job] = []
        unknown: list[Job] = []
        halted: str | None = None
        while True:
            job = self.store.run(self._claim)
            if job is None:
                break
            self.fault("fill:after-claim")
            try:
                outcome = self._submit(job)
            except KeyboardInterrupt:
                # Ctrl-C while RunningHub may be creating the task: say so on the job, as for
                # any unknown outcome (never resubmitted; its webhook or cleanup settles it).
                outcome = SubmitOutcome(kind="unknown", message="the submit was interrupted (Ctrl-C)")
                self.store.run(lambda tx, job=job, outcome=outcome: self._record(tx, job, outcome))
                raise Interrupted(
                    f"interrupted while sending job {job.id} to RunningHub: its outcome is unknown (it keeps its "
                    f"slot; its webhook or cleanup settles it); see `aiqueue status {job.id}`", job_id=job.id,
                ) from None
            if outcome.kind == "rejected" and (outcome.code in ACCOUNT_CODES or outcome.code is None):
                # Not this job's fault: every job would get the same answer. Stop, keep places.
                halted = outcome.message
                outcome = SubmitOutcome(kind="busy", code=outcome.code, message=f"queue halted: {outcome.message}")
            if outcome.kind == "accepted":
                self.fault("fill:after-accept")
            recorded = self.store.run(lambda tx, job=job, outcome=outcome: self._record(tx, job, outcome))
            if recorded is None:
                # Cancelled or expired while we were submitting: the task must not run unpaid-for.
                if outcome.kind == "accepted" and outcome.task_id:
                    self._get_provider().cancel(outcome.task_id)
                continue
            {"accepted": started, "busy": requeued, "rejected": failed, "unknown": unknown}[
                outcome.kind
            ].append(recorded)
            if outcome.kind == "busy":
                break
        return ProcessResult(started=started, requeued=requeued, failed=failed, unknown=unknown, halted=halted)

    def _claim(self, tx: Tx) -> Job | None:
        if tx.lock_gate():  # paused
            return None
        used = set(tx.used_slots())
        limit = self.settings.max_concurrent
        if len(used) >= limit:
            return None
        job = tx.oldest_queued()
        if job is None:
            return None
        slot = next(s for s in range(1, len(used) + 2) if s not in used)
        now = self.clock.now()
        claimed = tx.transition(job.id, [Status.QUEUED], Status.STARTING, now, slot=slot, started_at=now, error=None)
        if claimed is not None:
            tx.add_event(job.id, Status.QUEUED, Status.STARTING, now, f"claimed slot {slot}")
        return claimed

    def _submit(self, job: Job) -> SubmitOutcome:
        spec = self.settings.tools.get(job.tool)
        if spec is None:
            where = self.settings.config_path or "no config file was found"
            return SubmitOutcome(kind="rejected", message=f"tool {job.tool!r} of job {job.id} is not in the config ({where})")
        node_info_list = [
            {"nodeId": item.node_id, "fieldName": item.field, "fieldValue": job.inputs.get(name, item.default)}
            for name, item in spec.inputs.items()
        ]
        return self._get_provider().submit(spec.webapp_id, node_info_list, self.settings.submit_webhook_url(job.id))

    def _record(self, tx: Tx, job: Job, outcome: SubmitOutcome) -> Job | None:
        now = self.clock.now()
        if outcome.kind == "accepted":
            assert outcome.task_id is not None
            tx.lock_task(outcome.task_id)
            running = tx.transition(
                job.id, [Status.STARTING], Status.RUNNING, now, provider_task_id=outcome.task_id, error=None
            )
            if running is None:
                # Its webhook may have come first and attached the task (finish_webhook's hint).
                current = tx.get_job(job.id)
                return current if current is not None and current.provider_task_id == outcome.task_id else None
            tx.add_event(job.id, Status.STARTING, Status.RUNNING, now, f"provider task {outcome.task_id}")
            return self._apply_early_webhooks(tx, running)
        if outcome.kind == "busy":
            back = tx.transition(job.id, [Status.STARTING], Status.QUEUED, now, started_at=None,
                                 error=f"not started yet: {outcome.message}")
            if back is None:
                return None
            tx.add_event(job.id, Status.STARTING, Status.QUEUED, now, f"provider busy: {outcome.message}")
            return replace(back, position=tx.position(back.id))
        if outcome.kind == "rejected":
            ended = self._end(tx, job, Status.FAILED, f"submit rejected: {outcome.message}",
                              error=f"submit rejected: {outcome.message}")
            return None if ended is None else ended.job
        # Unknown: the provider may have created (and billed) a task. Never resubmit; keep the
        # slot and let cleanup (or an operator's finish) end it.
        reason = f"submit outcome unknown: {outcome.message}"
        if not tx.set_job_fields(job.id, Status.STARTING, now, error=reason):
            return None
        tx.add_event(job.id, Status.STARTING, Status.STARTING, now, reason)
        return replace(job, error=reason)

    def _apply_early_webhooks(self, tx: Tx, job: Job) -> Job:
        """Webhooks that came before the task id was stored (a fast provider) apply now."""
        from aiqueue.webhooks import parse_webhook

        assert job.provider_task_id is not None
        for row in tx.unapplied_webhooks(job.provider_task_id):
            result = self._apply(tx, job, parse_webhook(row.body.encode("utf-8")).outcome, "early webhook",
                                 strict=False)
            job = result.job or job
            tx.mark_webhook(row.id, job.id, result.message or f"job {job.id} {job.status}", self.clock.now())
        return job

    def _expire(self, older_than: timedelta, progress: Progress | None = None) -> CleanupResult:
        tick = progress or _no_progress
        now = self.clock.now()
        stale = self.store.read(lambda tx: tx.stale(now - older_than))
        expired: list[Job] = []
        completed: list[Job] = []
        failed: list[Job] = []
        for done, job in enumerate(stale, start=1):
            held = format_duration(now - job.started_at) if job.started_at else "?"
            limit = format_duration(older_than)
            target, error, outputs, bucket = Status.FAILED, "", [], expired
            if job.status is Status.RUNNING and job.provider_task_id:
                answer = self._get_provider().outputs(job.provider_task_id)
                if answer.kind == "success":
                    target, error, outputs, bucket = Status.COMPLETED, "", answer.outputs, completed
                elif answer.kind == "failed":
                    error, bucket = answer.message or f"provider code {answer.code}", failed
                else:
                    said = "still running" if answer.kind == "pending" else f"unreachable: {answer.message}"
                    # Say why before cancelling: a cleanup running beside us will then hear
                    # "cancelled" from the provider and keep this reason, not that echo.
                    reason = f"timed out after {held} running (limit {limit}); provider: {said}"
                    self.store.run(lambda tx, job=job, reason=reason: tx.set_job_fields(
                        job.id, Status.RUNNING, self.clock.now(), error=reason))
                    cancel = self._get_provider().cancel(job.provider_task_id)
                    cancelled = "cancelled there" if cancel.ok else f"cancel failed: {cancel.message}"
                    error = f"timed out after {held} running (limit {limit}); provider: {said}, {cancelled}"
            else:
                why = job.error or "the submit never returned"
                error = f"timed out after {held} starting (limit {limit}); {why}"
            seen = job
            timed_out: list[bool] = []

            def tx_fn(tx: Tx) -> _Ended | None:
                timed_out.clear()  # the store may run this again after a deadlock
                current = tx.get_job(seen.id)
                if current is None or current.status != seen.status or current.started_at != seen.started_at:
                    return None  # someone else ended or restarted it meanwhile
                if bucket is failed and current.error and current.error.startswith("timed out"):
                    # Another cleanup timed it out and cancelled it: its reason is the real one.
                    timed_out.append(True)
                    return self._end(tx, current, Status.FAILED, f"cleanup: {current.error}",
                                     error=f"{current.error}; provider: {error}")
                return self._end(tx, current, target, f"cleanup: {error or 'provider reports success'}",
                                 error=error or None, outputs=outputs)

            ended = self.store.run(tx_fn)
            if ended is not None:
                (expired if timed_out else bucket).append(ended.job)
                self.fault("cleanup:between-jobs")
            tick(done, len(stale))
        return CleanupResult(expired=expired, completed=completed, failed=failed)

    def _audit(self, progress: Progress | None = None) -> list[AuditProblem]:
        tick = progress or _no_progress

        def tx_fn(tx: Tx) -> list[AuditProblem]:
            problems: list[AuditProblem] = []
            for r in tx.jobs_missing_refund():
                problems.append(AuditProblem("missing_refund", r.id, r.user_id,
                                             f"{r.status} job has no refund of {r.cost}", fixable=True))
            tick(1, 5)
            for r in tx.refunds_on_unrefundable():
                problems.append(AuditProblem("refund_on_completed" if r.status == "completed" else "refund_on_active",
                                             r.id, r.user_id, f"{r.status} job was refunded {r.amount}", fixable=False))
            tick(2, 5)
            for r in tx.jobs_missing_charge():
                problems.append(AuditProblem("missing_charge", r.id, r.user_id,
                                             f"{r.status} job has no charge of {r.cost}", fixable=False))
            tick(3, 5)
            for r in tx.wrong_amounts():
                problems.append(AuditProblem("wrong_amount", r.id, r.user_id,
                                             f"{r.kind} of {r.amount} for user {r.entry_user!r} on a job costing {r.cost}",
                                             fixable=False))
                if r.entry_user != r.user_id:
                    problems.append(AuditProblem("wrong_user", r.id, r.entry_user,
                                                 f"{r.kind} of {r.amount} belongs to job {r.id} of user {r.user_id!r}",
                                                 fixable=False))
            tick(4, 5)
            for r in tx.balance_mismatches():
                problems.append(AuditProblem("balance_mismatch", None, r.user_id,
                                             f"cached balance {r.balance} but the ledger sums to {r.total}", fixable=True))
            tick(5, 5)
            return problems

        return self.store.read(tx_fn)

    def _fix_refund(self, problem: AuditProblem) -> bool:
        assert problem.job_id is not None

        def tx_fn(tx: Tx) -> bool:
            job = tx.get_job(problem.job_id, for_update=True)  # type: ignore[arg-type]
            if job is None or job.status not in REFUNDED:
                return False
            now = self.clock.now()
            entry = tx.add_ledger(job.user, job.id, LedgerKind.REFUND, job.cost, now,
                                  f"refund-audit fix: {job.status} job {job.id}")
            if entry is None:
                return False
            tx.credit(job.user, job.cost, now)
            return True

        return self.store.run(tx_fn)

    def _fix_balance(self, user: str) -> bool:
        return self.store.run(lambda tx: tx.reset_balance_to_ledger(user, self.clock.now()))

    def _redact(self, text: str | None) -> str | None:
        """Provider text may echo our API key (a webhook is not scrubbed by the client)."""
        if not text:
            return text
        key = self.settings.api_key
        if key and len(key) >= 8:
            text = text.replace(key, "***")
        redact = getattr(self._provider, "redact", None)
        return redact(text) if redact is not None else text

    def _job(self, job_id: int) -> Job:
        job = self.store.read(lambda tx: tx.get_job(job_id))
        if job is None:
            raise UnknownJobError(f"no job with id {job_id}", job_id=job_id)
        return job

    def _tool(self, name: str) -> ToolSpec:
        spec = self.settings.tools.get(name)
        if spec is None:
            known = ", ".join(sorted(self.settings.tools)) or "none configured"
            raise UnknownToolError(f"unknown tool {name!r} (configured: {known})", tool=name)
        return spec

    def _get_provider(self) -> Provider:
        if self._provider is None:
            candidate = self._provider_or_factory
            if candidate is None:
                from aiqueue.errors import ConfigError

                raise ConfigError("no provider configured")
            self._provider = candidate if hasattr(candidate, "submit") else candidate()  # type: ignore[operator]
        return self._provider  # type: ignore[return-value]


def _check_user(user: str) -> str:
    if not isinstance(user, str) or not user.strip():
        raise UsageError("user must be a non-empty string")
    if user != user.strip():
        raise UsageError(f"user id {user!r} has leading or trailing spaces")
    if len(user) > MAX_USER_LENGTH:
        raise UsageError(f"user id is {len(user)} characters long; the limit is {MAX_USER_LENGTH}")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in user):
        raise UsageError("user id contains control or invisible characters")
    normal = unicodedata.normalize("NFKC", user)
    if normal != user:  # full-width 'Ｕｓｅｒ' would be a second 'User' that looks the same
        raise UsageError(f"user id {user!r} is not NFKC-normalised: write it as {normal!r}", value=user)
    return user


def _has_control(text: str, allowed: str = "") -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cs") and ch not in allowed for ch in text)


def _check_text(value: str | None, what: str, limit: int = MAX_NOTE_LENGTH) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{what} must be text")
    if len(value) > limit:
        raise UsageError(f"{what} is {len(value)} characters long; the limit is {limit}")
    if _has_control(value, allowed="\t\n"):
        raise UsageError(f"{what} contains control characters")
    return value


def _check_job_id(job_id: Any) -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 1 <= job_id < 2**63:
        raise UnknownJobError(f"no job with id {job_id}", job_id=str(job_id))
    return job_id


def _check_amount(amount: Any) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise UsageError(f"credit amount must be a positive integer (got {amount!r})")
    if amount <= 0:
        raise UsageError(f"credit amount must be a positive integer (got {amount})")
    if amount > MAX_CREDITS:
        raise UsageError(f"credit amount {amount} is above the limit of {MAX_CREDITS}")
    return amount


def _resolve_inputs(spec: ToolSpec, given: Mapping[str, str]) -> dict[str, str]:
    unknown = sorted(set(given) - set(spec.inputs))
    if unknown:
        known = ", ".join(spec.inputs) or "none"
        raise InputError(f"tool {spec.name} has no input {unknown[0]!r} (inputs: {known})", tool=spec.name)
    resolved: dict[str, str] = {}
    for name, item in spec.inputs.items():
        if name in given:
            value = given[name]
            if not isinstance(value, str):
                raise InputError(f"input {name!r} must be text", tool=spec.name)
            if not value.strip():
                raise InputError(f"input {name!r} is empty", tool=spec.name)
            size = len(value.encode("utf-8", errors="replace"))
            if size > MAX_INPUT_BYTES:
                raise InputError(f"input {name!r} is {size} bytes; the limit is {MAX_INPUT_BYTES}", tool=spec.name)
            if _has_control(value, allowed="\t\n\r"):
                raise InputError(f"input {name!r} contains control characters", tool=spec.name)
            resolved[name] = value
        elif item.default is not None:
            resolved[name] = item.default
        else:
            raise InputError(f"tool {spec.name} needs input {name!r}: give --input {name}=VALUE", tool=spec.name)
    return resolved


def _is_hint(job_id: Any) -> bool:
    """A job id a webhook URL may carry (`?job=ID`): a plain positive 64-bit integer."""
    return not isinstance(job_id, bool) and isinstance(job_id, int) and 1 <= job_id < 2**63


Progress = Callable[[int, int], None]  # (done, total) of a long operation, for a progress bar


def _no_progress(done: int, total: int) -> None:
    return None


def _fixable(problems: Sequence[AuditProblem]) -> list[AuditProblem]:
    """What --fix repairs: missing refunds, and cached balances of users whose ledger rows are
    otherwise sound. A user whose rows are themselves wrong keeps the mismatch for a human:
    resetting the balance to a tampered sum would move credits along the tampering and hide it."""
    suspect = {p.user for p in problems if p.kind not in ("balance_mismatch", "missing_refund")}
    return [p for p in problems
            if p.kind == "missing_refund" or (p.kind == "balance_mismatch" and p.user not in suspect)]

"""Health checks (`aiqueue doctor`) and metrics (`aiqueue metrics`) built from a QueueManager, its
store (the aggregate queries of aiqueue.store.stats) and the provider's account status.

Like the manager, this module never prints and imports no terminal library: it returns a
HealthReport or a Metrics object and the CLI renders them. Every check stands alone: a dead
provider does not stop the database checks, and a dead database is reported (critical) while
the provider is still asked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from aiqueue.clock import format_duration
from aiqueue.errors import AiqueueError, ConfigError, ProviderError, UsageError
from aiqueue.provider.codes import ACCOUNT_CODES, CAPACITY_CODES

if TYPE_CHECKING:
    from aiqueue.manager import QueueManager
    from aiqueue.store.stats import QueueNumbers

Level = Literal["ok", "warning", "critical"]
OK: Level = "ok"
WARNING: Level = "warning"
CRITICAL: Level = "critical"
# Exit codes as monitoring plugins (Nagios, Icinga, Sensu) read them.
EXIT_CODES: dict[Level, int] = {OK: 0, WARNING: 1, CRITICAL: 2}
CHECKS = ("database", "schema", "provider", "stuck_jobs", "queue_age", "queue_depth", "paused", "refund_audit")
SKIPPABLE = CHECKS[2:]  # the database and the schema gate every other check
TERMINAL = ("completed", "failed", "cancelled")
ACTIVE = ("queued", "starting", "running")


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str  # one line
    data: dict[str, Any] = field(default_factory=dict)  # the numbers behind the detail

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "level": self.level, "detail": self.detail, "data": dict(self.data)}


@dataclass(frozen=True)
class HealthReport:
    checks: list[Check]

    @property
    def status(self) -> Level:
        return max((c.level for c in self.checks), key=EXIT_CODES.__getitem__, default=OK)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    @property
    def ok(self) -> bool:  # `--quiet` prints a report only when it is not
        return self.status == OK

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "checks": [c.to_dict() for c in self.checks]}


@dataclass(frozen=True)
class Metrics:
    queued: int
    running: int  # holding a slot: starting or running
    slots_limit: int
    paused: bool
    oldest_queued_age_seconds: float  # 0 when nothing is queued
    stuck: int  # holding a slot past queue.stale_after
    finished: list[tuple[str, str, int]]  # (status, tool, count) of terminal jobs, all time
    active: list[tuple[str, str, int]]  # (status, tool, count) of queued/starting/running jobs
    refunds: int
    refunded_credits: int
    provider_errors: list[tuple[str, int]]  # (code, failed jobs)
    scrape_duration_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "queued": self.queued,
            "running": self.running,
            "slots_limit": self.slots_limit,
            "paused": self.paused,
            "oldest_queued_age_seconds": self.oldest_queued_age_seconds,
            "stuck": self.stuck,
            "jobs_finished": [{"status": s, "tool": t, "count": n} for s, t, n in self.finished],
            "jobs_active": [{"status": s, "tool": t, "count": n} for s, t, n in self.active],
            "refunds": self.refunds,
            "refunded_credits": self.refunded_credits,
            "provider_errors": [{"code": c, "count": n} for c, n in self.provider_errors],
            "scrape_duration_seconds": self.scrape_duration_seconds,
        }


# --- metrics ----------------------------------------------------------------------------------


def collect_metrics(manager: QueueManager) -> Metrics:
    """Every number in one read transaction (aggregates only: no rows come back to Python)."""
    from aiqueue.store import stats

    started = time.perf_counter()
    now = manager.clock.now()
    cutoff = now - manager.settings.stale_after

    def tx_fn(tx: Any) -> tuple[Any, ...]:
        return (stats.queue_numbers(tx, cutoff), stats.jobs_by_status_and_tool(tx),
                stats.refund_totals(tx), stats.provider_error_codes(tx))

    numbers, by_status, (refunds, credits), codes = manager.store.read(tx_fn)
    counts = {(status, tool): count for status, tool, count in by_status}
    # Configured tools get explicit zeros, so rate() and alerts see a series from the first scrape.
    tools = sorted(set(manager.settings.tools) | {tool for _, tool, _ in by_status})
    finished = [(s, t, counts.get((s, t), 0)) for s in TERMINAL for t in tools]
    active = [(s, t, counts.get((s, t), 0)) for s in ACTIVE for t in tools]
    return Metrics(
        queued=numbers.queued,
        running=numbers.holding,
        slots_limit=manager.settings.max_concurrent,
        paused=numbers.paused,
        oldest_queued_age_seconds=_age(now, numbers.head_created_at),
        stuck=numbers.stuck,
        finished=finished,
        active=active,
        refunds=refunds,
        refunded_credits=credits,
        provider_errors=codes,
        scrape_duration_seconds=time.perf_counter() - started,
    )


# --- doctor -----------------------------------------------------------------------------------


def doctor(manager: QueueManager, provider: Callable[[], Any], skip: Collection[str] = ()) -> HealthReport:
    """Run every check; none stops another. `provider` builds the RunningHub client (raising
    ConfigError when no API key is configured); only its account_status() is called. Checks
    named in `skip` are not run (reported ok, "skipped"): e.g. the refund audit, which reads
    every job and ledger entry, for a check that runs every minute."""
    unknown = sorted(set(skip) - set(SKIPPABLE))
    if unknown:
        raise UsageError(f"cannot skip {', '.join(unknown)}: choose from {', '.join(SKIPPABLE)}", check=unknown[0])

    def run(name: str, fn: Callable[[], Check]) -> Check:
        return _skipped(name) if name in skip else _guarded(name, fn, manager)

    database = _guarded("database", lambda: _check_database(manager), manager)
    schema = _guarded("schema", lambda: _check_schema(manager), manager) if database.level == OK else \
        _not_checked("schema", "the database is unreachable")
    checks = [database, schema, run("provider", lambda: _check_provider(provider))]
    if schema.level != OK:
        why = "the database is unreachable" if database.level != OK else "the schema is missing or not current"
        for name in (*_QUEUE_CHECKS, "refund_audit"):
            checks.append(_skipped(name) if name in skip else _not_checked(name, why))
        return HealthReport(checks)

    numbers: Any = None
    if set(_QUEUE_CHECKS) - set(skip):  # one read serves all four
        numbers = _guarded("queue", lambda: _queue_numbers(manager), manager)
    for name, check_queue in _QUEUE_CHECKS.items():
        if name in skip:
            checks.append(_skipped(name))
        elif isinstance(numbers, Check):  # the queue query failed: each of its checks says why
            checks.append(Check(name, CRITICAL, numbers.detail))
        else:
            checks.append(_guarded(name, partial(check_queue, manager, *numbers), manager))
    checks.append(run("refund_audit", lambda: _check_audit(manager)))
    return HealthReport(checks)


def _skipped(name: str) -> Check:
    return Check(name, OK, "skipped (--skip)", {"skipped": True})


def _guarded(name: str, fn: Callable[[], Any], manager: QueueManager) -> Any:
    """fn(), or a critical Check naming what went wrong (a check never raises)."""
    try:
        return fn()
    except AiqueueError as err:
        return Check(name, CRITICAL, _scrub(err.message, manager))
    except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else "(no message)"
        return Check(name, CRITICAL, _scrub(f"unexpected {type(exc).__name__}: {text}", manager))


def _not_checked(name: str, why: str) -> Check:
    return Check(name, CRITICAL, f"not checked: {why}")


def _check_database(manager: QueueManager) -> Check:
    from aiqueue.settings import mask_url
    from aiqueue.store import stats

    started = time.perf_counter()
    version = manager.store.read(stats.ping)
    elapsed = time.perf_counter() - started
    dialect = "PostgreSQL" if manager.store.dialect == "postgresql" else "SQLite"
    return Check("database", OK, f"{dialect} {version} answered in {elapsed * 1000:.0f} ms "
                                 f"({mask_url(manager.settings.database_url)})",
                 {"dialect": manager.store.dialect, "server_version": version, "seconds": round(elapsed, 6)})


def _check_schema(manager: QueueManager) -> Check:
    current, head, missing, empty = schema_versions(manager)
    data = {"current": current, "head": head, "missing_tables": missing}
    if missing:
        fix = "run `aiqueue db init`" if empty else "compare with `aiqueue db current`"
        return Check("schema", CRITICAL, f"missing tables {', '.join(missing)}: {fix}", data)
    if not current:
        return Check("schema", CRITICAL, "no schema version recorded: run `aiqueue db upgrade`", data)
    if current < head:
        return Check("schema", CRITICAL, f"schema version {current}, this aiqueue expects {head}: "
                                         "run `aiqueue db upgrade`", data)
    if current > head:
        return Check("schema", CRITICAL, f"schema version {current} is newer than this aiqueue ({head}): "
                                         "upgrade aiqueue", data)
    return Check("schema", OK, f"all tables present, schema version {current} (current)", data)


def schema_versions(manager: QueueManager) -> tuple[int, int, list[str], bool]:
    """The schema's (current version, head version, missing tables, whether all are missing);
    the versions are the migrations' own "current vs head" answer, as `aiqueue db current` gives."""
    from aiqueue.store import migrations, stats

    tables = manager.store.read(stats.schema_tables)
    versions = migrations.schema_state(manager.store)
    return versions.current, versions.head, tables.missing, tables.empty


def _check_provider(provider: Callable[[], Any]) -> Check:
    try:
        client = provider()
    except ConfigError as err:
        if getattr(err, "key", None) == "provider.api_key":
            # A warning, not critical: the doctor may run where the key is not kept (a monitoring
            # host); a queue that cannot submit still shows up as queue age and depth.
            return Check("provider", WARNING, f"not checked: {err.message}")
        raise
    try:
        account = client.account_status()
    except ProviderError as err:
        code = getattr(err, "code", None)
        data = {"code": code}
        if code is None:
            return Check("provider", CRITICAL, f"RunningHub unreachable: {err.message}", data)
        if code in ACCOUNT_CODES:
            return Check("provider", CRITICAL, f"RunningHub refused the account: {err.message}", data)
        if code in CAPACITY_CODES:
            return Check("provider", WARNING, f"RunningHub is busy: {err.message}", data)
        return Check("provider", CRITICAL, f"RunningHub answered with an error: {err.message}", data)
    coins, tasks = account.get("remainCoins"), account.get("currentTaskCounts")
    data = {"remain_coins": coins, "current_task_counts": tasks, "api_type": account.get("apiType")}
    return Check("provider", OK, f"RunningHub account OK: {coins} coins left, {tasks} tasks running", data)


def _queue_numbers(manager: QueueManager) -> tuple[datetime, QueueNumbers]:
    from aiqueue.store import stats

    now = manager.clock.now()
    cutoff = now - manager.settings.stale_after
    return now, manager.store.read(lambda tx: stats.queue_numbers(tx, cutoff))


def _check_stuck(manager: QueueManager, now: datetime, numbers: QueueNumbers) -> Check:
    limit = format_duration(manager.settings.stale_after)
    oldest = _age(now, numbers.stuck_oldest_started_at)
    data = {"count": numbers.stuck, "oldest_age_seconds": oldest,
            "stale_after_seconds": manager.settings.stale_after.total_seconds()}
    if numbers.stuck:
        jobs = "1 job has" if numbers.stuck == 1 else f"{numbers.stuck} jobs have"
        return Check("stuck_jobs", WARNING, f"{jobs} held a slot past {limit} (oldest for "
                                            f"{format_duration(timedelta(seconds=oldest))}): "
                                            "run `aiqueue cleanup`", data)
    return Check("stuck_jobs", OK, f"no job has held a slot past {limit} "
                                   f"({numbers.holding} holding a slot)", data)


def _check_queue_age(manager: QueueManager, now: datetime, numbers: QueueNumbers) -> Check:
    settings = manager.settings
    age = _age(now, numbers.head_created_at)
    data = {"age_seconds": age, "warning_seconds": settings.queue_age_warning.total_seconds(),
            "critical_seconds": settings.queue_age_critical.total_seconds()}
    if numbers.head_created_at is None:
        return Check("queue_age", OK, "nothing is queued", data)
    waited = f"the oldest queued job has waited {format_duration(timedelta(seconds=age))}"
    for level, limit in ((CRITICAL, settings.queue_age_critical), (WARNING, settings.queue_age_warning)):
        if age > limit.total_seconds():
            return Check("queue_age", level, f"{waited} (over {format_duration(limit)})", data)
    return Check("queue_age", OK, f"{waited} (warning at {format_duration(settings.queue_age_warning)})", data)


def _check_queue_depth(manager: QueueManager, now: datetime, numbers: QueueNumbers) -> Check:
    settings = manager.settings
    data = {"depth": numbers.queued, "warning": settings.queue_depth_warning,
            "critical": settings.queue_depth_critical}
    queued = f"{numbers.queued} job{'' if numbers.queued == 1 else 's'} queued"
    for level, limit in ((CRITICAL, settings.queue_depth_critical), (WARNING, settings.queue_depth_warning)):
        if numbers.queued > limit:
            return Check("queue_depth", level, f"{queued} (over {limit})", data)
    return Check("queue_depth", OK, f"{queued} (warning above {settings.queue_depth_warning})", data)


def _check_paused(manager: QueueManager, now: datetime, numbers: QueueNumbers) -> Check:
    if numbers.paused:
        return Check("paused", WARNING, "the queue is paused: nothing is submitted (`aiqueue resume`)",
                     {"paused": True})
    return Check("paused", OK, "the queue is not paused", {"paused": False})


_QUEUE_CHECKS: dict[str, Callable[[QueueManager, datetime, QueueNumbers], Check]] = {
    "stuck_jobs": _check_stuck,
    "queue_age": _check_queue_age,
    "queue_depth": _check_queue_depth,
    "paused": _check_paused,
}


def _check_audit(manager: QueueManager) -> Check:
    result = manager.refund_audit(fix=False)
    if result.ok:
        return Check("refund_audit", OK, "jobs, ledger and balances agree", {"problems": 0})
    kinds: dict[str, int] = {}
    for problem in result.problems:
        kinds[problem.kind] = kinds.get(problem.kind, 0) + 1
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    fixable = sum(1 for p in result.problems if p.fixable)
    hint = "`aiqueue refund-audit --fix`" if fixable else "`aiqueue refund-audit`"
    return Check("refund_audit", CRITICAL, f"{len(result.problems)} problem(s): {summary}; see {hint}",
                 {"problems": len(result.problems), "kinds": kinds, "fixable": fixable})


def _age(now: datetime, since: datetime | None) -> float:
    return 0.0 if since is None else max(0.0, (now - since).total_seconds())


def _scrub(text: str, manager: QueueManager) -> str:
    """Library messages may quote a DSN or the key: mask both before they reach a report."""
    settings = manager.settings
    secrets = {settings.api_key or ""}
    password = urlsplit(settings.database_url).password
    if password:
        secrets |= {password, unquote(password)}
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return " ".join(text.split())

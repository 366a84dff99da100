"""Scenario 9 (issue 3): tampering behind the product's back, on SQLite and PostgreSQL.

- The schema itself refuses a duplicate refund, a duplicate charge, a negative balance, a refund
  with a negative amount and a grant tied to a job, inserted or updated by raw SQL.
- `refund-audit --json` (the real CLI entry point) finds and names each of: a deleted charge, an
  edited charge or refund amount, an entry moved to another user, a deleted refund, a refund on a
  completed job; by kind, job id and user, with exit 10.
- `--fix` adds only the missing refund (once) and resets only the balances of users whose ledger
  is sound; it changes no row (ledger or balance) of a user with a problem it cannot judge, and it
  is idempotent: a second run fixes nothing and reports the same problems.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from tests.cli_helpers import Run, run_cli
from tests.conftest import API_KEY
from tests.invariants import check_invariants

TABLES = ("aiqueue_jobs", "aiqueue_job_events", "aiqueue_accounts", "aiqueue_ledger", "aiqueue_webhooks",
          "aiqueue_queue_state")


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {t: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY 1"))] for t in TABLES}
    finally:
        engine.dispose()


def sql(url: str, statement: str, **params: Any) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement), params)
    finally:
        engine.dispose()


@pytest.fixture
def cli(db_url: str, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)

    def run(*args: str) -> Run:
        return run_cli("--config", str(config_file), "--db", db_url, *args)

    assert run("db", "init").code == 0
    return run


def ok(run: Run) -> Any:
    assert run.code == 0, (run.args, run.code, run.stderr)
    return run.json() if "--json" in run.args else run.stdout


@pytest.fixture
def jobs(cli: Callable[..., Run], manager: Any) -> dict[str, dict[str, Any]]:
    """alice: cancelled (charge + refund); bob: completed (charge); carol: running (charge);
    dave: only a grant. Made through the manager (faster than a CLI run per step)."""
    for user in ("alice", "bob", "carol", "dave"):
        manager.grant(user, 100)
    made = {user: manager.enqueue(user, "upscale_image", {"image": "x.png"}).job.to_dict()
            for user in ("alice", "bob", "carol")}
    manager.cancel(made["alice"]["id"])
    manager.finish(made["bob"]["id"], "completed")
    assert ok(cli("refund-audit", "--json")) == {"ok": True, "problems": [], "fixed": [], "dry_run": False, "would_fix": []}
    return made


def named(report: dict[str, Any], key: str = "problems") -> set[tuple[str, int | None, str]]:
    return {(p["kind"], p["job_id"], p["user"]) for p in report[key]}


def audit(cli: Callable[..., Run], *extra: str) -> tuple[int, dict[str, Any]]:
    run = cli("refund-audit", *extra, "--json")
    assert run.stderr == "", run.stderr
    return run.code, json.loads(run.stdout)


# --- the schema refuses ---------------------------------------------------------------------------

REFUSED = {
    "duplicate refund": "INSERT INTO aiqueue_ledger (user_id, job_id, kind, amount, created_at)"
                        " VALUES ('alice', :alice, 'refund', 5, CURRENT_TIMESTAMP)",
    "duplicate charge": "INSERT INTO aiqueue_ledger (user_id, job_id, kind, amount, created_at)"
                        " VALUES ('bob', :bob, 'charge', -5, CURRENT_TIMESTAMP)",
    "negative balance": "UPDATE aiqueue_accounts SET balance = -1 WHERE user_id = 'dave'",
    "new negative account": "INSERT INTO aiqueue_accounts (user_id, balance, updated_at)"
                            " VALUES ('mallory', -50, CURRENT_TIMESTAMP)",
    "negative refund": "INSERT INTO aiqueue_ledger (user_id, job_id, kind, amount, created_at)"
                       " VALUES ('bob', :bob, 'refund', -5, CURRENT_TIMESTAMP)",
    "positive charge": "UPDATE aiqueue_ledger SET amount = 5 WHERE job_id = :carol AND kind = 'charge'",
    "grant tied to a job": "INSERT INTO aiqueue_ledger (user_id, job_id, kind, amount, created_at)"
                           " VALUES ('dave', :bob, 'grant', 5, CURRENT_TIMESTAMP)",
}


def test_the_schema_refuses_raw_sql_tampering(cli: Callable[..., Run], jobs: dict[str, Any], db_url: str) -> None:
    before = dump(db_url)
    ids = {user: job["id"] for user, job in jobs.items()}
    for what, statement in REFUSED.items():
        params = {k: v for k, v in ids.items() if f":{k}" in statement}
        with pytest.raises(IntegrityError):
            sql(db_url, statement, **params)
        assert dump(db_url) == before, what
    assert check_invariants(db_url, 3) == []
    assert audit(cli) == (0, {"ok": True, "problems": [], "fixed": [], "dry_run": False, "would_fix": []})


# --- the audit names what the schema cannot refuse -------------------------------------------------

# name -> (statement, {problem that must be named}, problems --fix may repair)
TAMPERING: dict[str, tuple[str, Callable[[dict[str, int]], set[tuple[str, int | None, str]]]]] = {
    "deleted charge": (
        "DELETE FROM aiqueue_ledger WHERE job_id = :bob AND kind = 'charge'",
        lambda ids: {("missing_charge", ids["bob"], "bob"), ("balance_mismatch", None, "bob")},
    ),
    "edited charge amount": (
        "UPDATE aiqueue_ledger SET amount = -1 WHERE job_id = :carol AND kind = 'charge'",
        lambda ids: {("wrong_amount", ids["carol"], "carol"), ("balance_mismatch", None, "carol")},
    ),
    "edited refund amount": (
        "UPDATE aiqueue_ledger SET amount = 50 WHERE job_id = :alice AND kind = 'refund'",
        lambda ids: {("wrong_amount", ids["alice"], "alice"), ("balance_mismatch", None, "alice")},
    ),
    "entry moved to another user": (
        "UPDATE aiqueue_ledger SET user_id = 'dave' WHERE job_id = :bob AND kind = 'charge'",
        lambda ids: {("wrong_amount", ids["bob"], "bob"), ("wrong_user", ids["bob"], "dave"),
                     ("balance_mismatch", None, "bob"), ("balance_mismatch", None, "dave")},
    ),
    "refund on a completed job": (
        "INSERT INTO aiqueue_ledger (user_id, job_id, kind, amount, created_at)"
        " VALUES ('bob', :bob, 'refund', 5, CURRENT_TIMESTAMP)",
        lambda ids: {("refund_on_completed", ids["bob"], "bob"), ("balance_mismatch", None, "bob")},
    ),
}


@pytest.mark.parametrize("what", list(TAMPERING))
def test_refund_audit_names_tampering_it_cannot_fix(
    cli: Callable[..., Run], jobs: dict[str, Any], db_url: str, what: str
) -> None:
    statement, expected = TAMPERING[what]
    ids = {user: job["id"] for user, job in jobs.items()}
    sql(db_url, statement, **{k: v for k, v in ids.items() if f":{k}" in statement})
    before = dump(db_url)

    code, report = audit(cli)
    assert code == 10 and report["ok"] is False and report["fixed"] == []
    assert named(report) == expected(ids)
    for problem in report["problems"]:
        assert problem["detail"] and "\n" not in problem["detail"]
    moved = [p for p in report["problems"] if p["kind"] == "wrong_amount" and what.startswith("entry moved")]
    assert all("'dave'" in p["detail"] for p in moved)

    table = cli("refund-audit")
    assert table.code == 10 and "problem(s)" in table.stderr and table.stderr.count("\n") == 1
    job_problem = next(p for p in report["problems"] if p["job_id"] is not None)
    assert job_problem["kind"] in table.stdout and str(job_problem["job_id"]) in table.stdout

    # --fix cannot judge these: every problem stays named, and neither a ledger row nor a cached
    # balance moves (resetting a balance to a tampered ledger would spread the tampering).
    for _ in range(2):  # and again: idempotent
        code, fixed = audit(cli, "--fix")
        assert code == 10 and fixed["ok"] is False and fixed["fixed"] == []
        assert named(fixed) == named(report)
        assert dump(db_url) == before
    code, plain = audit(cli)
    assert code == 10 and named(plain) == named(report)


def test_a_deleted_refund_is_named_and_fixed_once(cli: Callable[..., Run], jobs: dict[str, Any], db_url: str) -> None:
    alice = jobs["alice"]["id"]
    sql(db_url, "DELETE FROM aiqueue_ledger WHERE job_id = :id AND kind = 'refund'", id=alice)
    code, report = audit(cli)
    assert code == 10
    assert named(report) == {("missing_refund", alice, "alice"), ("balance_mismatch", None, "alice")}
    assert "cancelled job has no refund of 5" in next(p["detail"] for p in report["problems"] if p["job_id"] == alice)

    code, fixed = audit(cli, "--fix")
    assert code == 0 and fixed["ok"] is True and fixed["problems"] == []
    assert ("missing_refund", alice, "alice") in named(fixed, "fixed")
    entries = ok(cli("credits", "ledger", "--job", str(alice), "--json"))["entries"]
    assert [(e["kind"], e["amount"]) for e in entries] == [("charge", -5), ("refund", 5)]
    assert ok(cli("credits", "balance", "alice", "--json"))["balance"] == 100
    assert check_invariants(db_url, 3) == []
    settled = dump(db_url)

    assert audit(cli, "--fix") == (0, {"ok": True, "problems": [], "fixed": [], "dry_run": False, "would_fix": []})
    assert dump(db_url) == settled


def test_everything_at_once_is_named_in_one_report(cli: Callable[..., Run], jobs: dict[str, Any], db_url: str) -> None:
    ids = {user: job["id"] for user, job in jobs.items()}
    sql(db_url, "DELETE FROM aiqueue_ledger WHERE job_id = :alice AND kind = 'refund'", alice=ids["alice"])
    sql(db_url, "DELETE FROM aiqueue_ledger WHERE job_id = :bob AND kind = 'charge'", bob=ids["bob"])
    sql(db_url, "UPDATE aiqueue_ledger SET user_id = 'dave' WHERE job_id = :carol", carol=ids["carol"])
    code, report = audit(cli)
    assert code == 10
    assert {("missing_refund", ids["alice"], "alice"), ("missing_charge", ids["bob"], "bob"),
            ("wrong_amount", ids["carol"], "carol")} <= named(report)
    balances = {u: ok(cli("credits", "balance", u, "--json"))["balance"] for u in ("bob", "carol", "dave")}
    code, fixed = audit(cli, "--fix")
    assert code == 10
    assert named(fixed, "fixed") == {("missing_refund", ids["alice"], "alice"), ("balance_mismatch", None, "alice")}
    assert named(fixed) == named(report) - named(fixed, "fixed")
    assert ok(cli("credits", "balance", "alice", "--json"))["balance"] == 100
    assert {u: ok(cli("credits", "balance", u, "--json"))["balance"] for u in balances} == balances
    code, again = audit(cli, "--fix")
    assert code == 10 and again["fixed"] == [] and named(again) == named(fixed)
    refunds = [e for e in ok(cli("credits", "ledger", "--job", str(ids["alice"]), "--json"))["entries"]
               if e["kind"] == "refund"]
    assert len(refunds) == 1

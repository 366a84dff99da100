"""The hot queries use indexes (issue 5): the statements the store really sends are captured and
EXPLAINed on a generated database of a useful size (PostgreSQL: EXPLAIN (FORMAT JSON) after
ANALYZE; SQLite: EXPLAIN QUERY PLAN, with no statistics, as in use). A sequential scan of a big
table, or a sort of a whole status for the FIFO pick, fails the test with the plan."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event

from aiqueue.store import Store, Tx
from aiqueue.store.bulk import generate, last_queued_id

BIG_TABLES = ("aiqueue_jobs", "aiqueue_ledger", "aiqueue_job_events", "aiqueue_accounts", "aiqueue_webhooks")
# Partial indexes that only ever hold a handful of rows (the jobs holding slots): walking one whole
# is bounded by the global limit, not by the size of the database.
BOUNDED_INDEXES = ("ux_aiqueue_jobs_slot",)
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    s.init_schema()
    generate(s, finished=20_000, queued=2_000, users=2_000, now=NOW)
    # A few jobs holding slots and one task id to look up, as in use.
    s.run(lambda tx: tx.conn.exec_driver_sql(
        "UPDATE aiqueue_jobs SET status = 'running', slot = 1, provider_task_id = '1990000000000000042',"
        " started_at = created_at WHERE id = (SELECT MIN(id) FROM aiqueue_jobs WHERE status = 'queued')"))
    yield s
    s.dispose()


HOT: dict[str, Callable[[Tx, int], Any]] = {
    "FIFO pick": lambda tx, last: tx.oldest_queued(),
    "position of a job": lambda tx, last: tx.position(last),
    "used slots": lambda tx, last: tx.used_slots(),
    "jobs holding slots": lambda tx, last: tx.holding_slots(),
    "first of the queue": lambda tx, last: tx.queued(20),
    "active job of a user": lambda tx, last: tx.active_job_of("user-0000007"),
    "job by provider task id": lambda tx, last: tx.get_job_by_task("1990000000000000042"),
    "stale jobs": lambda tx, last: tx.stale(NOW - timedelta(minutes=10)),
    "ledger of a user": lambda tx, last: tx.ledger_entries(user="user-0000007", limit=50),
    "ledger of a job": lambda tx, last: tx.ledger_entries(job_id=last),
    "events of a job": lambda tx, last: tx.events_of(last),
    "job by id": lambda tx, last: tx.get_job(last),
    "count of the queue": lambda tx, last: tx.count_queued(),
    "finished in the last day, by status": lambda tx, last: tx.finished_counts(NOW - timedelta(days=1)),
    "recent run durations": lambda tx, last: tx.recent_durations("upscale_image", 50),
}


def captured(store: Store, fn: Callable[[Tx, int], Any]) -> list[tuple[str, Any]]:
    last = last_queued_id(store)
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "WITH")):
            statements.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        store.read(lambda tx: fn(tx, last))
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    return statements


def bad_steps(store: Store, statement: str, parameters: Any) -> tuple[list[str], str]:
    """The plan's full scans of big tables, and the plan."""
    raw = store.engine.raw_connection()
    try:
        cur = raw.driver_connection.cursor()
        if store.dialect == "postgresql":
            cur.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
            plan = cur.fetchone()[0]
            plan = json.loads(plan) if isinstance(plan, str) else plan
            bad: list[str] = []

            def walk(node: dict[str, Any]) -> None:
                big = node.get("Relation Name") in BIG_TABLES
                if node.get("Node Type") == "Seq Scan" and big:
                    bad.append(f"Seq Scan on {node['Relation Name']}")
                # An index walked from one end while filtering (the primary key in id order past
                # every finished job, say) is a full scan too.
                if (big and node.get("Node Type") in ("Index Scan", "Index Only Scan")
                        and "Index Cond" not in node and "Filter" in node
                        and node.get("Index Name") not in BOUNDED_INDEXES):
                    bad.append(f"{node['Node Type']} on {node['Index Name']} without a condition,"
                               f" filtering {node['Filter']}")
                for child in node.get("Plans", []):
                    walk(child)

            walk(plan[0]["Plan"])
            return bad, json.dumps(plan, indent=1)[:3000]
        cur.execute("EXPLAIN QUERY PLAN " + statement, parameters or ())
        details = [row[3] for row in cur.fetchall()]
        # Any SCAN of a big table is a pass over all of it (of its rows, or of a whole index).
        bad = [d for d in details if d.startswith("SCAN ") and d.split()[1] in BIG_TABLES]
        # A sort for ORDER BY ... LIMIT after seeking one status sorts every job of that status
        # (every completed job, say) to return the first few.
        if " LIMIT " in statement.upper() and any(
                d.startswith("SEARCH ") and "ix_aiqueue_jobs_status_id (status=?)" in d for d in details):
            bad += [d for d in details if d.startswith("USE TEMP B-TREE FOR") and "ORDER BY" in d]
        return bad, "\n".join(details)
    finally:
        raw.close()


@pytest.mark.parametrize("name", sorted(HOT))
def test_hot_query_uses_an_index(store: Store, name: str) -> None:
    statements = captured(store, HOT[name])
    assert statements, f"{name}: no statement was captured"
    for statement, parameters in statements:
        bad, plan = bad_steps(store, statement, parameters)
        assert bad == [], f"{name}: {bad}\n{statement}\n{plan}"


def test_fifo_pick_does_not_sort_the_queue(store: Store) -> None:
    """The oldest queued job comes straight off the (status, id) index, never from a sort of
    every queued row (SQLite: no temp B-tree; PostgreSQL: no Sort node)."""
    for statement, parameters in captured(store, HOT["FIFO pick"]):
        _, plan = bad_steps(store, statement, parameters)
        assert "TEMP B-TREE" not in plan and '"Sort"' not in plan, plan


def test_the_check_catches_a_full_scan(store: Store) -> None:
    """The detector itself: a query on an unindexed column is reported."""
    bad, plan = bad_steps(store, "SELECT id FROM aiqueue_jobs WHERE error = 'x'", None)
    assert bad, plan


def test_the_check_catches_the_pitfalls_found(store: Store) -> None:
    """The two plans this test found in the product must be seen for what they are.
    PostgreSQL (with statistics): the FIFO pick as first written, `status = 'queued' ORDER BY id
    LIMIT 1`, walks the primary key past every finished job (228 ms at a million jobs).
    SQLite (no statistics): the finished-in-window count grouped by status walks the whole
    (status, id) index instead of range-scanning (finished_at, status) (456 ms); a tool's recent
    durations with a range on the tool sort every completed job (1.1 s)."""
    if store.dialect == "postgresql":
        statements = ["SELECT * FROM aiqueue_jobs WHERE status = 'queued' ORDER BY id LIMIT 1"]
    else:
        statements = [
            "SELECT status, count(*) FROM aiqueue_jobs WHERE finished_at >= '2026-11-30' GROUP BY status",
            # recent durations of a tool with a range on the tool: sorts every completed job (1.1 s)
            "SELECT started_at, finished_at FROM aiqueue_jobs WHERE tool BETWEEN 'upscale_image' AND"
            " 'upscale_image' AND status = 'completed' ORDER BY tool DESC, status DESC, id DESC LIMIT 50",
        ]
    for statement in statements:
        bad, plan = bad_steps(store, statement, None)
        assert bad, f"{statement}\n{plan}"

"""`aiqueue bench` itself (issue 5), tiny and on both backends: the JSON shape, every lifecycle
finished on both sides, the fresh schema/file removed afterwards, the in-place refusal of a
database that holds jobs (and --force), and the bulk generator's consistency. No timing asserts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import run_cli
from tests.invariants import check_invariants

OPS = {"enqueue", "claim_submit", "finish"}


def _schemas(db_url: str) -> set[str]:
    import psycopg

    raw = db_url.replace("+psycopg", "").split("?")[0]
    with psycopg.connect(raw, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'aiqueue_bench_%'")}


def _check_side(side: dict[str, Any], jobs: int) -> None:
    assert side["finished"] == jobs
    assert side["left_active"] == 0
    assert 0 <= side["failed"] <= jobs
    assert side["jobs_per_second"] > 0 and side["seconds"] > 0
    assert set(side["operations"]) == OPS
    for op in side["operations"].values():
        assert op["count"] >= 1
        assert 0 <= op["p50_ms"] <= op["p95_ms"] <= op["p99_ms"]


def test_bench_json_and_cleanup(backend: str, db_url: str, tmp_path: Path) -> None:
    before = _schemas(db_url) if backend == "postgres" else set()
    result = run_cli("--db", db_url, "bench", "--jobs", "12", "--workers", "2", "--fail-rate", "0.5",
                      "--seed", "7", "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"backend", "jobs", "workers", "limit", "fail_rate", "where", "ratio",
                         "ratio_without_provider", "manager", "raw_sql", "cleaned_up"}
    assert data["ratio_without_provider"] > data["ratio"]
    assert data["backend"] == ("postgresql" if backend == "postgres" else "sqlite")
    assert (data["jobs"], data["workers"], data["limit"], data["where"]) == (12, 2, 3, "fresh")
    for side in ("manager", "raw_sql"):
        _check_side(data[side], 12)
    assert data["manager"]["failed"] > 0  # the refund path ran (seeded: 12 jobs at 50%)
    assert data["manager"]["provider_ms_per_job"] > 0 and data["raw_sql"]["provider_ms_per_job"] == 0
    assert data["ratio"] == pytest.approx(
        data["manager"]["jobs_per_second"] / data["raw_sql"]["jobs_per_second"], rel=0.01)
    assert data["cleaned_up"] is True
    if backend == "postgres":
        assert _schemas(db_url) == before
    else:
        assert not Path(db_url.removeprefix("sqlite:///")).exists()  # nothing created by the bench
        assert not list(tmp_path.glob("aiqueue-bench-*"))


def test_bench_in_place_refuses_a_database_with_jobs(
    backend: str, db_url: str, make_manager: Any
) -> None:
    manager = make_manager()
    manager.grant("alice", 50)
    manager.enqueue("alice", "upscale_image", {"image": "a.png"}, start=False)
    refused = run_cli("--db", db_url, "bench", "--jobs", "4", "--in-place", "--json")
    assert refused.code == 5, refused.stderr
    assert refused.stdout == ""
    assert "holds 1 jobs" in json.loads(refused.stderr)["error"]["message"]
    assert [j.user for j in manager.status().queued] == ["alice"]  # nothing changed


def test_bench_in_place_forced_leaves_only_the_real_rows(backend: str, db_url: str, make_manager: Any) -> None:
    manager = make_manager(max_concurrent=3)
    manager.grant("alice", 50)
    manager.enqueue("alice", "upscale_image", {"image": "a.png"}, start=False)
    manager.pause()  # a paused queue is refused even with --force: the bench would never end
    paused = run_cli("--db", db_url, "bench", "--jobs", "4", "--in-place", "--force", "--json")
    assert paused.code == 5 and "paused" in paused.stderr
    manager.store.run(lambda tx: tx.set_paused(False))
    ran = run_cli("--db", db_url, "bench", "--jobs", "6", "--workers", "2", "--in-place", "--force", "--json")
    assert ran.code == 0, ran.stderr
    data = json.loads(ran.stdout)
    assert data["where"] == "in place"
    # The real job may have been started (and finished) by a bench worker's fill; its rows stay,
    # every bench row is gone.
    detail = manager.job_detail(1)
    assert detail.job.user == "alice"
    assert manager.balance("alice").balance in (45, 50)
    assert all(not e.user.startswith("bench-") for e in manager.ledger())
    assert manager.refund_audit().ok


def test_bench_refuses_bad_options(backend: str, db_url: str) -> None:
    result = run_cli("--db", db_url, "bench", "--jobs", "0", "--json")
    assert result.code == 2 and result.stdout == ""


def test_bulk_generator_is_consistent(backend: str, db_url: str) -> None:
    from aiqueue.store import Store
    from aiqueue.store.bulk import generate

    store = Store(db_url)
    store.init_schema()
    stats = generate(store, finished=500, queued=40, users=60, fail_rate=0.2, seed=3)
    store.dispose()
    assert stats.rows["aiqueue_jobs"] == 540
    assert stats.rows["aiqueue_accounts"] == 60
    failed = stats.rows["aiqueue_ledger"] - 540 - 60  # grants + charges + refunds
    assert 0 < failed < 500
    assert check_invariants(db_url, 3) == []
    from aiqueue.manager import QueueManager
    from aiqueue.settings import Settings

    manager = QueueManager(Store(db_url), Settings(database_url=db_url))
    try:
        status = manager.status(limit=5)
        assert status.queued_total == 40
        assert len({j.user for j in manager.status().queued}) == 40
        assert manager.refund_audit().ok
    finally:
        manager.store.dispose()

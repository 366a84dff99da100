"""Versioned schema migrations (store/migrations.py) on SQLite and PostgreSQL: the version-1 schema
built from step 1 and upgraded to head equals a fresh `db init` (tables, columns with types,
nullability and defaults, indexes with their WHERE, CHECK/unique/primary/foreign keys, read from
the catalogs); upgrades are idempotent, serialised across real processes, atomic per step; and
`db current` / `db upgrade` keep their JSON shapes and exit codes."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiqueue.settings import mask_url
from aiqueue.store import Store, migrations
from aiqueue.store import engine as _engine
from tests.cli_helpers import run_cli
from tests.conftest import make_pg_schema_url

# --- reading a schema from the catalogs --------------------------------------------------------


def _norm(sql: str | None, schema: str | None = None) -> str:
    text = " ".join((sql or "").split())
    if schema:
        text = text.replace(f"{schema}.", "")
    return text.replace("IF NOT EXISTS ", "")


def _schema_snapshot(url: str) -> dict[str, Any]:
    store = Store(url)
    try:
        with store.engine.connect() as conn:
            return _pg_snapshot(conn) if store.dialect == "postgresql" else _sqlite_snapshot(conn)
    finally:
        store.dispose()


def _sqlite_snapshot(conn: Any) -> dict[str, Any]:
    from sqlalchemy import inspect

    inspector = inspect(conn)
    tables = sorted(name for (name,) in conn.exec_driver_sql(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'aiqueue%'"))
    snap: dict[str, Any] = {}
    for table in tables:
        columns = {row[1]: (row[2], row[3], row[4], row[5])  # type, notnull, default, pk position
                   for row in conn.exec_driver_sql(f"PRAGMA table_info({table})")}
        indexes = {}
        for _seq, name, unique, origin, partial in conn.exec_driver_sql(f"PRAGMA index_list({table})"):
            cols = [row[2] for row in conn.exec_driver_sql(f"PRAGMA index_info({name})")]
            sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).scalar()
            key = name if not name.startswith("sqlite_autoindex") else f"auto:{','.join(cols)}"
            indexes[key] = (unique, origin, partial, tuple(cols), _norm(sql))
        checks = sorted((c["name"], _norm(c["sqltext"])) for c in inspector.get_check_constraints(table))
        uniques = sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table))
        fks = sorted(tuple(row[2:5]) for row in conn.exec_driver_sql(f"PRAGMA foreign_key_list({table})"))
        snap[table] = {"columns": columns, "indexes": indexes, "checks": checks, "uniques": uniques,
                       "foreign_keys": fks}
    return snap


def _pg_snapshot(conn: Any) -> dict[str, Any]:
    schema = conn.exec_driver_sql("SELECT current_schema()").scalar()
    snap: dict[str, Any] = {}
    for table, column, type_, length, nullable, default in conn.exec_driver_sql(
        "SELECT table_name, column_name, data_type, character_maximum_length, is_nullable,"
        " column_default FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name LIKE 'aiqueue%%'"
    ):
        snap.setdefault(table, {"columns": {}, "indexes": {}, "constraints": {}})
        snap[table]["columns"][column] = (type_, length, nullable, _norm(default, schema))
    for table, name, definition in conn.exec_driver_sql(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
    ):
        snap[table]["indexes"][name] = _norm(definition, schema)
    for table, name, kind, definition in conn.exec_driver_sql(
        "SELECT rel.relname, con.conname, con.contype, pg_get_constraintdef(con.oid)"
        " FROM pg_constraint con JOIN pg_class rel ON rel.oid = con.conrelid"
        " WHERE con.connamespace = current_schema()::regnamespace"
    ):
        snap[table]["constraints"][name] = (kind, _norm(definition, schema))
    return snap


# --- databases -----------------------------------------------------------------------------------


@pytest.fixture
def second_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """Another empty database on the same backend (the fresh install to compare with)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    url, drop = make_pg_schema_url()
    try:
        yield url
    finally:
        drop()


def _empty(url: str) -> None:
    target = _engine.sqlite_file(url)
    if target is not None:
        target.touch()  # `db upgrade` never creates a missing SQLite file; `db init` does


def build_v1(url: str) -> None:
    """The first schema, exactly as step 1 writes it (not from tables.py)."""
    _empty(url)
    store = Store(url)
    try:
        assert _engine.run(store.engine, lambda conn: migrations._apply(conn, store.dialect, migrations.STEPS[0]))
    finally:
        store.dispose()


def fresh_init(url: str) -> None:
    store = Store(url)
    try:
        assert store.init_schema() is True
    finally:
        store.dispose()


def upgrade(url: str) -> list[int]:
    store = Store(url)
    try:
        return [step.version for step in migrations.upgrade(store)]
    finally:
        store.dispose()


def state(url: str) -> migrations.SchemaState:
    store = Store(url)
    try:
        return migrations.schema_state(store)
    finally:
        store.dispose()


def execute(url: str, *statements: str) -> None:
    store = Store(url)
    try:
        with _engine.transaction(store.engine, write=True) as conn:
            for sql in statements:
                conn.exec_driver_sql(sql)
    finally:
        store.dispose()


# --- the steps themselves ------------------------------------------------------------------------


def test_steps_are_numbered_one_to_head_and_init_stamps_head() -> None:
    from aiqueue.store.tables import SCHEMA_VERSION

    assert [step.version for step in migrations.STEPS] == list(range(1, migrations.HEAD + 1))
    assert SCHEMA_VERSION == migrations.HEAD
    assert all(step.sqlite and step.postgresql or step.python for step in migrations.STEPS)


def test_upgrade_from_version_1_equals_a_fresh_install(db_url: str, second_url: str) -> None:
    build_v1(db_url)
    assert state(db_url) == (1, migrations.HEAD, migrations.STEPS[1:])
    # Rows written under version 1 survive the upgrade.
    execute(db_url,
            "INSERT INTO aiqueue_accounts (user_id, balance, updated_at) VALUES ('alice', 5, '2026-12-01 12:00:00')",
            "INSERT INTO aiqueue_ledger (user_id, kind, amount, created_at) VALUES ('alice', 'grant', 5, '2026-12-01 12:00:00')")
    assert upgrade(db_url) == list(range(2, migrations.HEAD + 1))
    fresh_init(second_url)

    upgraded, fresh = _schema_snapshot(db_url), _schema_snapshot(second_url)
    assert set(upgraded) == set(fresh) and len(fresh) >= 6
    for table in fresh:
        assert upgraded[table] == fresh[table], table
    assert state(db_url) == state(second_url) == (migrations.HEAD, migrations.HEAD, ())
    store = Store(db_url)
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT balance FROM aiqueue_accounts").scalar() == 5
    finally:
        store.dispose()


def test_the_snapshot_sees_a_missing_partial_index(db_url: str, second_url: str) -> None:
    """The comparison above can fail: drop one WHERE from a partial index and it differs."""
    fresh_init(db_url)
    fresh_init(second_url)
    execute(db_url, "DROP INDEX ux_aiqueue_ledger_job_kind",
            "CREATE UNIQUE INDEX ux_aiqueue_ledger_job_kind ON aiqueue_ledger (job_id, kind)")
    assert _schema_snapshot(db_url)["aiqueue_ledger"] != _schema_snapshot(second_url)["aiqueue_ledger"]


def test_upgrade_is_idempotent(db_url: str) -> None:
    build_v1(db_url)
    upgrade(db_url)
    before = _schema_snapshot(db_url)
    assert upgrade(db_url) == [] and upgrade(db_url) == []
    assert _schema_snapshot(db_url) == before
    assert state(db_url).pending == ()


def test_an_empty_database_is_upgraded_to_head(db_url: str, second_url: str) -> None:
    _empty(db_url)
    assert state(db_url) == (0, migrations.HEAD, migrations.STEPS)
    assert upgrade(db_url) == list(range(1, migrations.HEAD + 1))
    fresh_init(second_url)
    assert _schema_snapshot(db_url) == _schema_snapshot(second_url)


def test_a_database_from_before_versioning_is_adopted(db_url: str, second_url: str) -> None:
    """Tables present, no version row (and one table missing): step 1 creates what is missing
    and stamps version 1; the upgrade then ends at head like a fresh install."""
    build_v1(db_url)
    execute(db_url, "DELETE FROM aiqueue_queue_state", "DROP TABLE aiqueue_webhooks")
    described = _describe(db_url)
    assert described["state"] == "unversioned" and described["current"] == 0
    assert upgrade(db_url) == list(range(1, migrations.HEAD + 1))
    fresh_init(second_url)
    assert _schema_snapshot(db_url) == _schema_snapshot(second_url)
    assert state(db_url).current == migrations.HEAD


def _describe(url: str) -> dict[str, Any]:
    store = Store(url)
    try:
        return migrations.describe(store)
    finally:
        store.dispose()


# --- a step that fails, a database from the future ------------------------------------------------


BROKEN = migrations.Step(
    migrations.HEAD + 1, "broken on purpose",
    sqlite=("CREATE TABLE aiqueue_probe (id INTEGER)", "CREATE TABLE aiqueue_probe (id INTEGER)"),
    postgresql=("CREATE TABLE aiqueue_probe (id INTEGER)", "CREATE TABLE aiqueue_probe (id INTEGER)"),
)


def _with_steps(monkeypatch: pytest.MonkeyPatch, *extra: migrations.Step) -> None:
    steps = migrations.STEPS + extra
    monkeypatch.setattr(migrations, "STEPS", steps)
    monkeypatch.setattr(migrations, "HEAD", steps[-1].version)


def test_a_failing_step_changes_nothing_and_exits_8(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_init(db_url)
    before = _schema_snapshot(db_url)
    _with_steps(monkeypatch, BROKEN)
    result = run_cli("--db", db_url, "db", "upgrade", "--json")
    assert result.code == 8 and result.stdout == ""
    assert "aiqueue_probe" in result.error()["message"]
    assert _schema_snapshot(db_url) == before  # the first CREATE was rolled back with the step
    assert state(db_url).current == BROKEN.version - 1


def test_a_database_newer_than_the_code_is_refused(db_url: str) -> None:
    fresh_init(db_url)
    execute(db_url, f"UPDATE aiqueue_queue_state SET schema_version = {migrations.HEAD + 1}")
    current = run_cli("--db", db_url, "db", "current", "--json").json()
    assert current["state"] == "ahead" and current["pending"] == []
    result = run_cli("--db", db_url, "db", "upgrade")
    assert result.code == 8 and "newer than this aiqueue" in result.stderr and result.stdout == ""


# --- the commands ----------------------------------------------------------------------------------


def test_db_current_and_upgrade_json(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_init(db_url)
    current = run_cli("--db", db_url, "db", "current", "--json").json()
    assert set(current) == {"database", "current", "head", "state", "pending"}
    assert current["current"] == current["head"] == migrations.HEAD
    assert current["state"] == "current" and current["pending"] == []
    assert current["database"] == mask_url(db_url)  # the one masking rule (no password shown)

    extra = migrations.Step(migrations.HEAD + 1, "probe table", sqlite=("CREATE TABLE aiqueue_probe (id INTEGER)",),
                            postgresql=("CREATE TABLE aiqueue_probe (id INTEGER)",))
    _with_steps(monkeypatch, extra)
    behind = run_cli("--db", db_url, "db", "current", "--json").json()
    assert behind["state"] == "behind" and behind["current"] == extra.version - 1
    assert behind["pending"] == [{"version": extra.version, "name": "probe table"}]
    table = run_cli("--db", db_url, "db", "current")
    assert table.code == 0 and "run `aiqueue db upgrade`" in table.stdout

    init = run_cli("--db", db_url, "db", "init")
    assert init.code == 0 and "1 step(s) behind" in init.stderr  # init leaves an existing schema

    upgraded = run_cli("--db", db_url, "db", "upgrade", "--json").json()
    assert upgraded["applied"] == [{"version": extra.version, "name": "probe table"}]
    assert (upgraded["previous"], upgraded["current"], upgraded["head"]) == (extra.version - 1,) + (extra.version,) * 2
    again = run_cli("--db", db_url, "db", "upgrade", "--json").json()
    assert again["applied"] == [] and again["previous"] == again["current"] == extra.version
    assert run_cli("--db", db_url, "db", "current", "--json").json()["state"] == "current"


def test_commands_on_a_missing_sqlite_file_exit_8_and_create_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'none.db'}"
    for command in ("current", "upgrade"):
        result = run_cli("--db", url, "db", command, "--json")
        assert result.code == 8 and "aiqueue db init" in result.error()["message"]
    assert not (tmp_path / "none.db").exists()
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    (tmp_path / "empty.db").touch()
    assert run_cli("--db", empty, "db", "current", "--json").json()["state"] == "empty"


# --- concurrency: real processes ------------------------------------------------------------------


def _slow_step(conn: Any, dialect: str) -> None:
    conn.exec_driver_sql("CREATE TABLE aiqueue_probe (n INTEGER)")
    time.sleep(0.4)  # a wide window for the other process to try the same step
    conn.exec_driver_sql("INSERT INTO aiqueue_probe (n) VALUES (1)")


def _upgrade_in_child(url: str, barrier: Any, queue: Any) -> None:
    slow = migrations.Step(migrations.HEAD + 1, "slow probe", python=_slow_step)
    migrations.STEPS = migrations.STEPS + (slow,)
    migrations.HEAD = slow.version
    store = Store(url)
    barrier.wait(timeout=30)
    try:
        queue.put([step.version for step in migrations.upgrade(store)])
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        queue.put(f"{type(exc).__name__}: {exc}")
    finally:
        store.dispose()


def test_concurrent_upgrades_apply_each_step_once(db_url: str) -> None:
    _empty(db_url)
    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(2), context.Queue()
    children = [context.Process(target=_upgrade_in_child, args=(db_url, barrier, queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    assert all(isinstance(r, list) for r in results), results
    applied = sorted(v for r in results for v in r)
    assert applied == list(range(1, migrations.HEAD + 2))  # every step once, by one of them
    store = Store(db_url)
    try:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM aiqueue_probe").scalar() == 1
            version = conn.exec_driver_sql("SELECT schema_version FROM aiqueue_queue_state").scalar()
            assert version == migrations.HEAD + 1
    finally:
        store.dispose()


def test_upgrade_ddl_is_literal_sql() -> None:
    """Step SQL is frozen text, not generated from tables.py (a step must not change later)."""
    source = Path(migrations.__file__).read_text(encoding="utf-8")
    assert not re.search(r"^from aiqueue\.store\.tables import", source, re.MULTILINE)
    assert "CREATE TABLE IF NOT EXISTS aiqueue_jobs" in migrations.STEPS[0].sqlite[1]


# --- commands refuse to write through a schema that does not match the code -------------------


def test_writes_on_a_schema_behind_or_ahead_exit_8_and_change_nothing(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh_init(db_url)
    assert run_cli("--db", db_url, "credits", "grant", "alice", "5").code == 0
    ledger = run_cli("--db", db_url, "credits", "ledger", "--json").json()

    extra = migrations.Step(migrations.HEAD + 1, "probe table", sqlite=("CREATE TABLE aiqueue_probe (id INTEGER)",),
                            postgresql=("CREATE TABLE aiqueue_probe (id INTEGER)",))
    with monkeypatch.context() as patch:
        _with_steps(patch, extra)
        behind = run_cli("--db", db_url, "credits", "grant", "alice", "5", "--json")
        assert behind.code == 8 and "run `aiqueue db upgrade`" in behind.error()["message"]
        assert behind.error()["current"] == extra.version - 1 and behind.error()["head"] == extra.version
        assert run_cli("--db", db_url, "credits", "balance", "alice", "--json").json()["balance"] == 5  # reads go on

    execute(db_url, f"UPDATE aiqueue_queue_state SET schema_version = {migrations.HEAD + 1}")
    ahead = run_cli("--db", db_url, "credits", "grant", "alice", "5")
    assert ahead.code == 8 and "newer than this aiqueue" in ahead.stderr and ahead.stdout == ""

    execute(db_url, "DELETE FROM aiqueue_queue_state")
    unversioned = run_cli("--db", db_url, "credits", "grant", "alice", "5")
    assert unversioned.code == 8 and "no version row" in unversioned.stderr
    assert run_cli("--db", db_url, "credits", "ledger", "--json").json() == ledger  # nothing was written
    assert upgrade(db_url) == list(range(1, migrations.HEAD + 1))  # adopted by step 1 onwards
    assert run_cli("--db", db_url, "credits", "grant", "alice", "5").code == 0  # adopted: writes again


def test_two_cli_upgrades_at_once_share_the_steps(db_url: str, tmp_path: Path) -> None:
    """The real entry point, twice at the same time on an empty database: both exit 0, each
    step is applied by exactly one of them, and the database ends at head."""
    _empty(db_url)
    aiqueue = str(Path(sys.executable).parent / "aiqueue")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIQUEUE_")} | {"HOME": str(tmp_path)}
    children = [subprocess.Popen([aiqueue, "--db", db_url, "db", "upgrade", "--json"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [child.communicate(timeout=120) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    applied = sorted(step["version"] for out, _err in outputs for step in json.loads(out)["applied"])
    assert applied == list(range(1, migrations.HEAD + 1))
    assert state(db_url) == (migrations.HEAD, migrations.HEAD, ())

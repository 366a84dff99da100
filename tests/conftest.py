"""Shared fixtures: one real database per test (SQLite file, or a fresh PostgreSQL schema), the
fake RunningHub server on 127.0.0.1, a config pointing at it, and a QueueManager over them.

PostgreSQL: AIQUEUE_TEST_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test).
When it is unreachable the PostgreSQL tests skip with the reason, except under CI (env CI set),
where they fail: CI must run them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from aiqueue.clock import FrozenClock

PG_URL = os.environ.get("AIQUEUE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
API_KEY = "test-key-0123456789abcdef0123456789ab"

TOOLS_TOML = """
[tools.upscale_image]
webapp_id = "1990000000000000001"
cost = 5
[tools.upscale_image.inputs.image]
node_id = "12"
field = "image"
[tools.upscale_image.inputs.scale]
node_id = "15"
field = "value"
default = "2"

[tools.upscale_video]
webapp_id = "1990000000000000002"
cost = 20
[tools.upscale_video.inputs.video]
node_id = "3"
field = "video"
"""

_pg_problem: str | None = None
_pg_checked = False


def _pg_reachable() -> str | None:
    """None when PostgreSQL answers, else why not (checked once per session)."""
    global _pg_checked, _pg_problem
    if not _pg_checked:
        _pg_checked = True
        try:
            import psycopg

            with psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=3):
                pass
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            _pg_problem = f"PostgreSQL at {PG_URL} is not reachable: {str(exc).splitlines()[0]}"
    return _pg_problem


def require_postgres() -> None:
    problem = _pg_reachable()
    if problem is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{problem} (CI requires the PostgreSQL tests)")
    pytest.skip(problem)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test starts without stray AIQUEUE_*/RUNNINGHUB_* variables or user config."""
    for name in list(os.environ):
        if name.startswith(("AIQUEUE_", "RUNNINGHUB_")) and name != "AIQUEUE_TEST_PG_URL":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


def make_pg_schema_url() -> tuple[str, Callable[[], None]]:
    """A fresh schema on the test server; returns its URL and a function that drops it."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    raw = PG_URL.replace("+psycopg", "")
    with psycopg.connect(raw, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options=-csearch_path%3D{schema}"

    def drop() -> None:
        with psycopg.connect(raw, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    return url, drop


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        require_postgres()
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'aiqueue.db'}"
        return
    url, drop = make_pg_schema_url()
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def fake_hub() -> Iterator[Any]:
    from aiqueue.provider.fake_server import FakeRunningHub

    hub = FakeRunningHub(api_key=API_KEY)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


def write_config(path: Path, base_url: str, *, max_concurrent: int = 3, extra: str = "") -> Path:
    path.write_text(
        f"""
[queue]
max_concurrent = {max_concurrent}
stale_after = "10m"

[provider]
name = "runninghub"
base_url = "{base_url}"
webhook_url = "http://127.0.0.1:9/hooks/runninghub"
timeout = 2
{extra}
{TOOLS_TOML}
""",
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


@pytest.fixture
def config_file(tmp_path: Path, fake_hub: Any) -> Path:
    return write_config(tmp_path / "aiqueue.toml", fake_hub.base_url)


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc))


@pytest.fixture
def make_manager(
    db_url: str, config_file: Path, clock: FrozenClock
) -> Iterator[Callable[..., Any]]:
    """Build QueueManagers over the test database (several may share it, as processes do)."""
    from aiqueue.manager import QueueManager
    from aiqueue.provider.runninghub import RunningHubClient
    from aiqueue.settings import load_settings
    from aiqueue.store import Store

    stores: list[Any] = []

    def build(max_concurrent: int | None = None, provider: Any = None) -> QueueManager:
        env = {"RUNNINGHUB_API_KEY": API_KEY}
        if max_concurrent is not None:
            env["AIQUEUE_MAX_CONCURRENT"] = str(max_concurrent)
        settings = load_settings(config_file, db_url=db_url, env=env)
        store = Store(settings.database_url)
        stores.append(store)
        client = provider or RunningHubClient(settings.base_url, API_KEY, timeout=settings.request_timeout)
        manager = QueueManager(store, settings, client, clock)
        manager.init_db()
        return manager

    yield build
    for store in stores:
        store.dispose()


@pytest.fixture
def manager(make_manager: Callable[..., Any]) -> Any:
    return make_manager()

"""Scenario 10 (issue 3): the API key and the database password never appear in any output.

Distinctive canaries (an `sk-LEAK-CANARY-...` API key, a `pw-LEAK-CANARY-...` DSN password and the
`sekret-pw-123` of a broken URL) are used for every command, succeeding and failing, plain, with
--json and with --debug, with the key from the environment or from the config file and the DSN
from the environment, the config file or --db. stdout and stderr of every run, every stored row
of the database, the fake provider's view of the requests, and (the module-wide guard below) any
log record and anything written to the process's own file descriptors are searched for the
literals. A config file that holds the key and is readable by group or others is refused with a
clear message unless AIQUEUE_ALLOW_INSECURE_CONFIG=1.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, make_url, text

from aiqueue.domain import Status
from aiqueue.provider.fake_server import FakeRunningHub
from aiqueue.provider.runninghub import RunningHubClient
from tests.cli_helpers import Run, run_cli
from tests.conftest import write_config
from tests.invariants import check_invariants

KEY = f"sk-LEAK-CANARY-{uuid.uuid4().hex}"
PASSWORD = f"pw-LEAK-CANARY-{uuid.uuid4().hex[:16]}"
BROKEN_PASSWORD = "sekret-pw-123"
SECRETS = (KEY, PASSWORD, BROKEN_PASSWORD)
# A cut-off secret is still a leak: the marker, and every 10-character piece of the random parts.
FRAGMENTS = ("LEAK-CANARY", BROKEN_PASSWORD, *{
    secret[i:i + 10] for secret in (KEY, PASSWORD) for i in range(len("sk-LEAK-CANARY-"), len(secret) - 9)})
TABLES = ("aiqueue_jobs", "aiqueue_job_events", "aiqueue_accounts", "aiqueue_ledger", "aiqueue_webhooks",
          "aiqueue_queue_state")


def leaks(text: str) -> list[str]:
    return [fragment for fragment in FRAGMENTS if fragment in text]


def assert_quiet(runs: list[Run]) -> None:
    for run in runs:
        assert not leaks(run.stdout + run.stderr), (run.args, run.code, run.stdout[-500:], run.stderr[-500:])


@pytest.fixture(autouse=True)
def _guard(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Module-wide: every log record (at DEBUG, from every library) and everything that reached
    this process's stdout/stderr file descriptors during a test must be free of the secrets."""
    caplog.set_level(logging.DEBUG)
    yield
    out, err = capfd.readouterr()
    assert not leaks(out + err), (out[-500:], err[-500:])
    for record in caplog.records:
        assert not leaks(record.getMessage()), record.getMessage()[:500]


@pytest.fixture
def hub() -> Iterator[FakeRunningHub]:
    fake = FakeRunningHub(api_key=KEY).start()  # it accepts our canary key, and only it
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def secret_db(backend: str, db_url: str) -> str:
    """The test database; on PostgreSQL with the canary password in the URL (the test server
    trusts local connections, so the password is carried along but not checked)."""
    if backend == "sqlite":
        return db_url
    url = make_url(db_url).set(password=PASSWORD).render_as_string(hide_password=False)
    engine = create_engine(url)
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"the test server checks passwords, the canary cannot be used: {type(exc).__name__}")
    finally:
        engine.dispose()
    return url


def dump_text(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return repr({t: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY 1"))] for t in TABLES})
    finally:
        engine.dispose()


def _leaf_commands() -> list[str]:
    from typer.main import get_command

    from aiqueue.cli.app import app

    leaves: list[str] = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        children = getattr(command, "commands", None)
        if children:
            for name, child in children.items():
                walk(child, (*path, name))
        else:
            leaves.append(" ".join(path))

    walk(get_command(app), ())
    return leaves


# --- every command, through the real entry point ---------------------------------------------------


@pytest.mark.parametrize("source", ["environment", "config file"])
def test_no_command_prints_a_secret(
    source: str, secret_db: str, hub: FakeRunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "aiqueue.toml"
    if source == "environment":
        write_config(config, hub.base_url)
        monkeypatch.setenv("RUNNINGHUB_API_KEY", KEY)
        monkeypatch.setenv("AIQUEUE_DATABASE_URL", secret_db)
    else:
        write_config(config, hub.base_url, extra=f'api_key = "{KEY}"')
        config.write_text(config.read_text() + f'\n[database]\nurl = "{secret_db}"\n')
        config.chmod(0o600)
    runs: list[Run] = []

    def cli(*args: str, input: bytes | None = None, code: int | None = 0) -> Run:
        run = run_cli("--config", str(config), *args, input=input)
        runs.append(run)
        if code is not None:
            assert run.code == code, (args, run.code, run.stderr)
        return run

    for command in _leaf_commands():
        cli(*command.split(), "--help")
    for variant in ((), ("--json",), ("--debug",)):
        cli(*variant, "db", "init")
    for user in ("alice", "bob", "carol", "dave", "erin"):
        cli("credits", "grant", user, "100", "--note", "top-up")
    cli("credits", "balance", "alice")
    def enqueue(user: str, *extra: str) -> dict[str, Any]:
        return cli("enqueue", "--user", user, "--tool", "upscale_image", "--input", "image=x.png", *extra,
                   "--json").json()["job"]

    alice, bob, carol = enqueue("alice"), enqueue("bob"), enqueue("carol", "--no-start")
    assert alice["status"] == bob["status"] == "running" and carol["status"] == "queued"
    for variant in ((), ("--json",), ("--debug",)):
        cli(*variant, "status")
        cli(*variant, "status", str(alice["id"]))
        cli(*variant, "credits", "ledger")
    cli("finish", "--webhook", "-", "--json", input=hub.finish_task(alice["provider_task_id"], deliver=False))
    cli("finish", str(bob["id"]), "--status", "failed", "--error", "node 9: bad input")
    stranger = hub.finish_task(alice["provider_task_id"], deliver=False).replace(
        alice["provider_task_id"].encode(), b"1990000000000009999")
    cli("finish", "--webhook", "-", input=stranger)
    cli("status", "--unmatched")
    cli("status", "--unmatched", "--json")
    cli("process-next", "--json")
    cli("cancel", str(carol["id"]), "--reason", "changed my mind")  # running: cancelled at the provider too
    cli("cleanup", "--older-than", "1h")
    cli("cleanup", "--json")
    cli("refund-audit")
    cli("refund-audit", "--fix", "--json")

    # Refusals and failures, plain, --json and --debug.
    for variant in ((), ("--json",), ("--debug",)):
        cli(*variant, "enqueue", "--user", "dave", "--tool", "nope", code=4)
        cli(*variant, "status", "999999", code=4)
        cli(*variant, "cancel", str(alice["id"]), code=5)
        cli(*variant, "credits", "grant", "dave", "-5", code=2)
        cli(*variant, "finish", "--webhook", "-", input=b"\xff not json", code=9)
        cli(*variant, "enqueue", "--user", "dave", "--bogus-option", code=2)
    # Provider faults: an unknown outcome, a busy provider, a provider that is gone.
    hub.script_submits(["http500"])
    unknown = cli("enqueue", "--user", "dave", "--tool", "upscale_image", "--input", "image=d.png", "--json")
    assert unknown.json()["job"]["status"] == "starting"
    hub.stop()
    queued = cli("enqueue", "--user", "erin", "--tool", "upscale_image", "--input", "image=e.png", "--json")
    assert queued.json()["job"]["status"] == "queued"
    cli("--debug", "process-next")
    cli("--debug", "cancel", str(unknown.json()["job"]["id"]), code=5)  # outcome unknown: refused...
    cli("--debug", "cancel", str(unknown.json()["job"]["id"]), "--force")  # ...unless forced
    cli("--debug", "cleanup", "--older-than", "1s", "--json")

    assert len(runs) > 60
    assert_quiet(runs)
    assert not leaks(dump_text(secret_db))
    assert not leaks(json.dumps(hub.requests))
    assert any(r["key_in"] for r in hub.requests)  # the key did travel, to the provider only
    assert check_invariants(secret_db, 3) == []


def test_a_provider_that_rejects_the_key_does_not_echo_it(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeRunningHub(api_key="a-different-key") as other:
        config = write_config(tmp_path / "aiqueue.toml", other.base_url)
        monkeypatch.setenv("RUNNINGHUB_API_KEY", KEY)
        runs = [run_cli("--config", str(config), "--db", db_url, "db", "init"),
                run_cli("--config", str(config), "--db", db_url, "credits", "grant", "alice", "10")]
        for variant in ((), ("--json",), ("--debug",)):
            runs.append(run_cli(*variant, "--config", str(config), "--db", db_url, "enqueue", "--user", "alice",
                                "--tool", "upscale_image", "--input", "image=a.png"))
            runs.append(run_cli(*variant, "--config", str(config), "--db", db_url, "status", "1"))
        assert "802 APIKEY_UNAUTHORIZED" in runs[2].stdout + runs[2].stderr  # the queue halts
    assert_quiet(runs)
    assert not leaks(dump_text(db_url))


def test_provider_answers_that_echo_the_key_are_scrubbed(make_manager: Any, clock: Any) -> None:
    """Proxies and error pages echo requests back: the submit, polling and cancel answers that
    carry the key come out masked in the job, its history and the results."""
    from datetime import timedelta

    echoes: dict[str, Callable[[httpx.Request], httpx.Response]] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        return echoes[request.url.path](request)

    body = lambda r: r.content.decode()  # noqa: E731
    client = RunningHubClient("http://rh.invalid", KEY, http=httpx.Client(transport=httpx.MockTransport(handler)))
    manager = make_manager(provider=client)
    cases = {
        "400 page": lambda r: httpx.Response(400, text=f"<pre>bad request {body(r)}</pre>"),
        "garbage": lambda r: httpx.Response(200, text=f"echo: {body(r)}"),
        "envelope msg": lambda r: httpx.Response(200, json={"code": 1234, "msg": f"bad key {KEY}", "data": None}),
        "no task id": lambda r: httpx.Response(200, json={"code": 0, "data": {"k": KEY}}),
        "auth header": lambda r: httpx.Response(200, json={"code": 802, "msg": r.headers["authorization"]}),
    }
    for i, (name, answer) in enumerate(cases.items()):
        user = f"user{i}"
        manager.grant(user, 100)
        echoes["/task/openapi/ai-app/run"] = answer
        result = manager.enqueue(user, "upscale_image", {"image": "x.png"})
        assert result.job.error and "***" in result.job.error, (name, result.job.error)
        if result.job.status is Status.STARTING:  # an unknown outcome keeps its slot: free it
            manager.finish(result.job.id, "failed", error="ended by the test")
        if result.job.status is Status.QUEUED:  # a set-up error halted the queue: clear it
            manager.cancel(result.job.id)

    echoes["/task/openapi/ai-app/run"] = lambda r: httpx.Response(
        200, json={"code": 0, "msg": "success", "data": {"taskId": "1990000000000000042"}})
    echoes["/task/openapi/outputs"] = lambda r: httpx.Response(
        200, json={"code": 805, "msg": "failed", "data": {"failedReason": {"exception_message": f"key {KEY}"}}})
    echoes["/task/openapi/cancel"] = lambda r: httpx.Response(503, text=body(r))
    manager.grant("polled", 100)
    polled = manager.enqueue("polled", "upscale_image", {"image": "x.png"}).job
    manager.grant("cancelled", 100)
    echoes["/task/openapi/ai-app/run"] = lambda r: httpx.Response(
        200, json={"code": 0, "msg": "success", "data": {"taskId": "1990000000000000043"}})
    cancelled = manager.enqueue("cancelled", "upscale_image", {"image": "x.png"}).job
    cancel = manager.cancel(cancelled.id)
    clock.advance(timedelta(minutes=11))
    cleaned = manager.cleanup()
    assert [j.id for j in cleaned.failed] == [polled.id] and "***" in cleaned.failed[0].error
    texts = [repr(cancel), repr(cleaned)] + [repr(manager.job_detail(j)) for j in range(1, polled.id + 2)]
    assert not any(leaks(t) for t in texts)
    assert not leaks(dump_text(manager.store.url))
    assert check_invariants(manager.store.url, 3) == []


# --- database URLs that fail -------------------------------------------------------------------------

BROKEN_URLS = [
    f"postgresql://postgres:{BROKEN_PASSWORD}@127.0.0.1:5432/nonexistent_db",
    f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/nonexistent_db",
    f"postgres://postgres:{PASSWORD}@127.0.0.1:1/aiqueue",  # nothing listens
    f"postgresql+psycopg://aiq:{PASSWORD}@127.0.0.1:notaport/aiqueue",  # unparsable port
    f"postgresql://aiq:{PASSWORD}@[::1/aiqueue",
    f"postgresql://aiq:{PASSWORD}@x@127.0.0.1:1/aiqueue",  # a raw '@' in the password
    f"postgresql://aiq:{PASSWORD}@127.0.0.1:1/aiqueue?sslmode=bogus",
    f"postgresql://aiq:{PASSWORD}@/aiqueue?host=/nonexistent",
    f"mysql://root:{PASSWORD}@db.example/aiqueue",  # unsupported scheme
    f"postgresql+psycopg2://root:{PASSWORD}@db.example/aiqueue",
]


def test_broken_database_urls_never_show_the_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[Run] = []
    config = tmp_path / "db.toml"
    for url in BROKEN_URLS:
        for variant in ((), ("--json",), ("--debug",)):
            runs.append(run_cli(*variant, "--db", url, "status"))
            runs.append(run_cli(*variant, "--db", url, "db", "init"))
        monkeypatch.setenv("AIQUEUE_DATABASE_URL", url)
        runs.append(run_cli("--debug", "credits", "balance", "alice"))
        monkeypatch.delenv("AIQUEUE_DATABASE_URL")
        config.write_text(f'[database]\nurl = "{url}"\n')
        runs.append(run_cli("--debug", "--config", str(config), "refund-audit", "--json"))
    for run in runs:
        assert run.code in (1, 3, 8) and run.stdout == "", (run.args, run.code, run.stdout)
        assert "Traceback" in run.stderr or run.stderr.count("\n") == 1, run.stderr
    assert_quiet(runs)
    # Through a real process as well (warnings, anything printed outside the catch point).
    env = {**os.environ, "RUNNINGHUB_API_KEY": KEY, "PYTHONWARNINGS": "always"}
    done = subprocess.run([sys.executable, "-m", "aiqueue", "--debug", "--db", BROKEN_URLS[0], "credits", "grant",
                           "a", "5"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 8 and not leaks(done.stdout + done.stderr), done.stderr
    assert "***" in done.stderr


def test_settings_views_mask_both_secrets(tmp_path: Path) -> None:
    from aiqueue.settings import load_settings, redacted

    url = f"postgresql://aiq:{PASSWORD}@db.example:5432/aiqueue"
    settings = load_settings(None, db_url=url, env={"RUNNINGHUB_API_KEY": KEY})
    assert settings.api_key == KEY
    for view in (repr(settings), str(settings), json.dumps(redacted(settings)),
                 repr(RunningHubClient("https://www.runninghub.ai", KEY))):
        assert not leaks(view), view


# --- a config file readable by others ----------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o666])
def test_a_config_with_the_key_readable_by_others_is_refused(
    mode: int, db_url: str, tmp_path: Path, hub: FakeRunningHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "aiqueue.toml", hub.base_url, extra=f'api_key = "{KEY}"')
    config.chmod(mode)
    runs = []
    for args in (("status",), ("enqueue", "--user", "a", "--tool", "upscale_image", "--input", "image=x"),
                 ("--json", "status"), ("--debug", "db", "init")):
        run = run_cli("--config", str(config), "--db", db_url, *args)
        runs.append(run)
        assert run.code == 3 and run.stdout == "", (mode, args, run.stderr)
        assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    message = runs[0].stderr
    assert str(config) in message and f"mode {mode:04o}" in message and "readable by others" in message
    assert f"chmod 600 {config}" in message and "AIQUEUE_ALLOW_INSECURE_CONFIG=1" in message
    assert json.loads(runs[2].stderr)["error"]["key"] == "provider.api_key"
    for value in ("0", "true", "yes", " "):  # only an explicit 1 overrides
        monkeypatch.setenv("AIQUEUE_ALLOW_INSECURE_CONFIG", value)
        runs.append(run_cli("--config", str(config), "--db", db_url, "status"))
        assert runs[-1].code == 3
    monkeypatch.setenv("AIQUEUE_ALLOW_INSECURE_CONFIG", "1")
    allowed = run_cli("--config", str(config), "--db", db_url, "db", "init", "--json")
    assert allowed.code == 0 and allowed.json()["created"] is True
    assert_quiet([*runs, allowed])


def test_private_configs_and_configs_without_the_key_are_accepted(
    db_url: str, tmp_path: Path, hub: FakeRunningHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = write_config(tmp_path / "private.toml", hub.base_url, extra=f'api_key = "{KEY}"')
    for mode in (0o600, 0o400):
        private.chmod(mode)
        assert run_cli("--config", str(private), "--db", db_url, "db", "init").code == 0
    public = write_config(tmp_path / "public.toml", hub.base_url)  # no key inside
    public.chmod(0o644)
    monkeypatch.setenv("RUNNINGHUB_API_KEY", KEY)
    assert run_cli("--config", str(public), "--db", db_url, "status").code == 0
    # A private link to a public file is judged by the file it points to.
    target = write_config(tmp_path / "target.toml", hub.base_url, extra=f'api_key = "{KEY}"')
    target.chmod(0o644)
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    refused = run_cli("--config", str(link), "--db", db_url, "status")
    assert refused.code == 3 and "readable by others" in refused.stderr
    assert_quiet([refused])


@pytest.mark.parametrize("base_url, verified", [("https://www.runninghub.ai", True), ("http://127.0.0.1:8765", False)])
def test_tls_is_verified_for_https_and_not_built_for_plain_http(
    base_url: str, verified: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    from aiqueue.cli.wiring import LazyRunningHub
    from aiqueue.settings import load_settings

    seen: list[Any] = []

    class Recording(httpx.Client):
        def __init__(self, **kwargs: Any) -> None:
            seen.append(kwargs.get("verify", True))
            super().__init__(**kwargs)

    monkeypatch.setattr(httpx, "Client", Recording)
    config = tmp_path / "tls.toml"
    config.write_text(f'[provider]\nbase_url = "{base_url}"\n', encoding="utf-8")
    settings = load_settings(config, env={"RUNNINGHUB_API_KEY": "k0123456789abcdef0123456789abcdef"})
    lazy = LazyRunningHub(settings)
    lazy()
    lazy.close()
    assert seen == [verified]

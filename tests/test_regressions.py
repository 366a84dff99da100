"""Regression tests for defects found by the issue-3 tests and fixed since (repros that lived in
/tmp/defects). Each docstring names what went wrong before the fix. Tests that touch the
database run on SQLite and PostgreSQL (the `db_url` / `make_manager` fixtures).

Not repeated here (already guarded elsewhere): the statistical early-webhook race
(tests/test_inbox.py::test_webhook_racing_the_task_id_record_is_never_lost) and the refund-audit
--fix over a tampered ledger (tests/test_manager.py::test_refund_audit_finds_fixes_and_names_tampering,
tests/test_tampering.py).
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select, table

from aiqueue.clock import FrozenClock
from aiqueue.domain import Status
from aiqueue.errors import ConfigError, InvalidWebhookError
from aiqueue.provider.runninghub import RunningHubClient
from aiqueue.settings import load_settings
from tests.cli_helpers import run_cli
from tests.conftest import API_KEY, write_config

IMG = {"image": "in.png"}
NO_HUB = "http://127.0.0.1:9"  # nothing listens: these runs must not reach a provider


def _rows(db_url: str, name: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table(name))).scalar_one())
    finally:
        engine.dispose()


def _mock_client(handler: Any, key: str = API_KEY) -> RunningHubClient:
    return RunningHubClient("http://rh.invalid", key, http=httpx.Client(transport=httpx.MockTransport(handler)))


# --- hostile input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cost", [2**63, 2**70, 10**12 + 1])
def test_tool_cost_beyond_the_limit_is_a_config_error(cost: int, db_url: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool cost beyond BIGINT (legal TOML) was accepted, then every enqueue of that tool crashed
    with an unexpected OverflowError (SQLite) or a database error (PostgreSQL), exit 1."""
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    config = write_config(tmp_path / "c.toml", NO_HUB)
    config.write_text(config.read_text().replace("cost = 5", f"cost = {cost}"))
    assert run_cli("--db", db_url, "db", "init").code == 0
    assert run_cli("--db", db_url, "credits", "grant", "a", "100").code == 0
    run = run_cli("--config", str(config), "--db", db_url, "enqueue", "--user", "a", "--tool", "upscale_image",
                  "--input", "image=x", "--no-start")
    assert run.code == 3 and "tools.upscale_image.cost" in run.stderr and run.stdout == "", (run.code, run.stderr)
    assert _rows(db_url, "aiqueue_jobs") == 0 and _rows(db_url, "aiqueue_ledger") == 1  # the grant only


def test_config_integers_are_capped_at_the_largest_credit_amount(tmp_path: Path) -> None:
    """queue.max_concurrent and tools.*.cost had no upper bound (2**70 was accepted); the cap is
    10**12, itself still accepted."""
    config = write_config(tmp_path / "c.toml", NO_HUB)
    text = config.read_text()
    config.write_text(text.replace("cost = 5", f"cost = {10**12}"))
    assert load_settings(config, db_url="sqlite://", env={}).tools["upscale_image"].cost == 10**12
    config.write_text(text.replace("max_concurrent = 3", f"max_concurrent = {2**70}"))
    with pytest.raises(ConfigError) as refused:
        load_settings(config, db_url="sqlite://", env={})
    assert refused.value.key == "queue.max_concurrent"


@pytest.mark.parametrize("url", ["postgresql://u:pw-LEAK-CANARY-9@127.0.0.1:notaport/x",
                                 "postgresql://u:pw-LEAK-CANARY-9@[::1/x"])
def test_database_url_with_a_bad_port_is_a_config_error(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL URL whose port is not a number was an "unexpected ValueError" (exit 1) from
    SQLAlchemy instead of a configuration error (exit 3) naming database.url."""
    plain = run_cli("--db", url, "status")
    assert plain.code == 3 and "database.url" in plain.stderr, (plain.code, plain.stderr)
    as_json = run_cli("--json", "--db", url, "status")
    assert as_json.code == 3 and as_json.error()["key"] == "database.url"
    monkeypatch.setenv("AIQUEUE_DATABASE_URL", url)
    from_env = run_cli("status")
    assert from_env.code == 3 and "database.url" in from_env.stderr, (from_env.code, from_env.stderr)
    for run in (plain, as_json, from_env):
        assert "LEAK-CANARY" not in run.stdout + run.stderr


def _with_lone_surrogate(body: bytes) -> bytes:
    """The fake escapes the backslash of "\\ud800" we gave it; keep the escape itself instead."""
    body = body.replace(b"bad \\\\\\\\ud800", b"bad \\\\ud800")
    assert b"bad \\\\ud800 thing" in body
    return body


def test_failure_webhook_with_a_lone_surrogate(make_manager: Any, fake_hub: Any) -> None:
    """A TASK_END webhook whose failure text holds a JSON-escaped lone surrogate crashed with an
    unexpected UnicodeEncodeError when stored: body not kept, job left running."""
    manager = make_manager()
    manager.grant("a", 100)
    job = manager.enqueue("a", "upscale_image", IMG).job
    assert job.status is Status.RUNNING
    body = fake_hub.finish_task(job.provider_task_id, success=False, error="bad \\ud800 thing", deliver=False)
    try:
        result = manager.finish_webhook(_with_lone_surrogate(body))
    except InvalidWebhookError:  # refusing it (exit 9) is acceptable too: then nothing changed
        assert manager.job_detail(job.id).job.status is Status.RUNNING
        assert manager.unmatched_webhooks() == []
        return
    detail = manager.job_detail(job.id)
    assert result.job is not None and detail.job.status is Status.FAILED
    assert "bad" in detail.job.error and "thing" in detail.job.error
    json.dumps(detail.to_dict(), default=str, ensure_ascii=False).encode("utf-8")  # printable as UTF-8
    assert [e.amount for e in detail.ledger] == [-5, 5]


def test_submit_answer_with_a_lone_surrogate(make_manager: Any) -> None:
    """A submit answer whose msg held a lone surrogate raised UnicodeEncodeError after the slot
    was claimed: the job stayed "starting" with no reason (later "the submit never returned")."""
    answer = json.dumps({"code": 1234, "msg": "bad \ud800 thing", "data": None})
    manager = make_manager(provider=_mock_client(lambda r: httpx.Response(200, text=answer)))
    manager.grant("a", 100)
    job = manager.enqueue("a", "upscale_image", IMG).job
    assert job.status is Status.FAILED and "1234" in job.error and "thing" in job.error, job
    job.error.encode("utf-8")
    assert [e.amount for e in manager.ledger(job_id=job.id)] == [-5, 5]


# --- secrets ---------------------------------------------------------------------------------------

BAD_KEYS = ["sk-LEAK-CANARY-abc\nXYZ", "sk-LEAK-CANARY-abc\x00z", "sk-LEAK-CANARY-abcé", "sk-LEAK-CANARY a"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_settings_refuse_a_key_that_cannot_be_sent(key: str, tmp_path: Path) -> None:
    """Any non-blank API key was accepted; one with a control character then leaked (as its repr)
    into job errors and output, a non-ASCII one crashed the submit after a slot was claimed."""
    with pytest.raises(ConfigError) as from_env:
        load_settings(None, db_url="sqlite://", env={"RUNNINGHUB_API_KEY": key})
    config = tmp_path / "c.toml"
    config.write_text("[provider]\napi_key = " + json.dumps(key) + "\n", encoding="utf-8")  # TOML escapes
    config.chmod(0o600)
    with pytest.raises(ConfigError) as from_file:
        load_settings(config, db_url="sqlite://", env={})
    for refused in (from_env.value, from_file.value):
        assert refused.key == "provider.api_key"
        assert "LEAK-CANARY" not in str(refused) and key not in repr(refused), str(refused)


@pytest.mark.parametrize("key", ["sk-LEAK-CANARY-abc\nXYZ", "sk-LEAK-CANARY-abcé"])
def test_client_refuses_a_key_that_cannot_be_sent(key: str, fake_hub: Any) -> None:
    """The client took such a key: the control character one ended in "submit outcome unknown:
    ... Illegal header value b'Bearer sk-...'" stored on the job; the non-ASCII one in an
    unexpected UnicodeEncodeError that left the claimed job "starting" without a reason."""
    with pytest.raises(ConfigError) as refused:
        RunningHubClient(fake_hub.base_url, key)
    assert "LEAK-CANARY" not in str(refused.value), str(refused.value)
    assert fake_hub.requests == []  # nothing was sent


@pytest.mark.parametrize("key", ["sk-LEAK-CANARY-abc\nXYZ", "sk-LEAK-CANARY-abcé"])
def test_cli_enqueue_with_a_bad_key_claims_nothing(key: str, db_url: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the CLI the same keys left a charged job "starting" (or printed the key): now the
    command is refused up front (exit 3), with no job, no charge and no echo of the key."""
    config = str(write_config(tmp_path / "c.toml", NO_HUB))
    assert run_cli("--db", db_url, "db", "init").code == 0
    assert run_cli("--db", db_url, "credits", "grant", "a", "100").code == 0
    monkeypatch.setenv("RUNNINGHUB_API_KEY", key)
    for variant in ((), ("--json",)):
        run = run_cli(*variant, "--config", config, "--db", db_url, "enqueue", "--user", "a",
                      "--tool", "upscale_image", "--input", "image=x")
        assert run.code == 3 and "provider.api_key" in run.stderr, (run.code, run.stderr)
        assert "LEAK-CANARY" not in run.stdout + run.stderr
    assert _rows(db_url, "aiqueue_jobs") == 0 and _rows(db_url, "aiqueue_ledger") == 1


def test_debug_traceback_is_scrubbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --debug the traceback of an unexpected error was printed raw, so a DSN password (or
    the API key, and never one from the config file) in the exception text reached stderr."""
    from aiqueue.manager import QueueManager

    key = f"sk-LEAK-CANARY-{uuid.uuid4().hex}"  # fresh: the CLI remembers keys it has loaded
    config = write_config(tmp_path / "c.toml", NO_HUB, extra=f'api_key = "{key}"')

    def boom(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"lost postgresql://aiq:s3cr3t@db.example/aiq sent {key}")

    monkeypatch.setattr(QueueManager, "status", boom)
    db = f"sqlite:///{tmp_path / 'x.db'}"
    plain = run_cli("--config", str(config), "--db", db, "status")
    traced = run_cli("--debug", "--config", str(config), "--db", db, "status")
    assert plain.code == traced.code == 1
    assert "Traceback" in traced.stderr and "RuntimeError" in traced.stderr and "***" in traced.stderr
    for run in (plain, traced):
        assert "s3cr3t" not in run.stderr and "LEAK-CANARY" not in run.stderr, run.stderr[-400:]


PW = "pw-LEAK-CANARY-77"


@pytest.mark.parametrize("url", [f"postgresql://u@127.0.0.1:1/db?password={PW}",
                                 f"postgresql://u:{PW}@127.0.0.1:1/db?sslmode=disable&password={PW}"])
def test_password_query_parameter_is_masked(url: str) -> None:
    """A DSN password given as ?password= (libpq's documented form) was printed in clear in
    every database error: only the user-info password was hidden."""
    for variant in ((), ("--json",), ("--debug",)):
        for command in (("status",), ("db", "init")):
            run = run_cli(*variant, "--db", url, *command)
            assert run.code == 8, (run.args, run.code, run.stderr)
            assert PW not in run.stdout + run.stderr and "***" in run.stderr, run.stderr


KEY = "sk-LEAK-CANARY-0123456789abcdef0123456789abcdef"
KEY_FRAGMENTS = [KEY[i:i + 8] for i in range(len("sk-LEAK-CANARY-"), len(KEY) - 7)]


def _leaks(message: str) -> bool:
    return "LEAK-CANARY" in message or any(fragment in message for fragment in KEY_FRAGMENTS)


def test_error_page_echoing_the_request_never_shows_a_cut_key() -> None:
    """Provider answers were cut short (80/300 characters) BEFORE the key was masked, so an
    error page echoing the request kept a prefix of the key when the cut fell inside it."""
    for prefix in range(0, 100):
        client = _mock_client(lambda r, n=prefix: httpx.Response(400, text="y" * n + r.content.decode()), KEY)
        outcome = client.submit("1", [], None)
        assert "400" in outcome.message and not _leaks(outcome.message), (prefix, outcome.message)


def test_long_msg_echoing_the_key_never_shows_a_cut_key() -> None:
    """A business msg cut to 300 characters kept most of a key that straddled the cut."""
    for pad in range(240, 320, 3):
        client = _mock_client(lambda r, n=pad: httpx.Response(200, json={"code": 1234, "msg": "y" * n + KEY}), KEY)
        outcome = client.submit("1", [], None)
        assert outcome.code == 1234 and not _leaks(outcome.message), (pad, outcome.message)
    echo = _mock_client(lambda r: httpx.Response(200, json={"code": 0, "msg": "ok", "data": {"echo": KEY}}), KEY)
    outcome = echo.submit("1", [], None)
    assert outcome.kind == "unknown" and not _leaks(outcome.message), outcome.message


def test_webhook_failure_text_is_scrubbed(make_manager: Any, fake_hub: Any) -> None:
    """Provider failure text was scrubbed of the API key when polled but not when it came by
    webhook: the key went into the job's error, its history and `finish --json`."""
    manager = make_manager()
    manager.grant("a", 100)
    job = manager.enqueue("a", "upscale_image", IMG).job
    body = fake_hub.finish_task(job.provider_task_id, success=False, error=f"invalid apiKey {API_KEY}",
                                deliver=False)
    assert API_KEY.encode() in body
    result = manager.finish_webhook(body)
    detail = manager.job_detail(job.id)
    assert detail.job.status is Status.FAILED and "invalid apiKey ***" in detail.job.error, detail.job.error
    shown = json.dumps([detail.to_dict(), result.job.to_dict(), result.message], default=str)
    assert API_KEY not in shown and API_KEY[5:20] not in shown


# --- races -----------------------------------------------------------------------------------------


def test_two_cleanups_keep_the_timeout_reason(make_manager: Any, fake_hub: Any, clock: FrozenClock) -> None:
    """Cleanup A timed a job out and cancelled it at the provider; cleanup B, polling just then,
    heard "task was cancelled" and stored that as a provider failure instead of the timeout."""
    other = make_manager()

    class CancelThenOtherCleanup:
        """A's provider: right after A's cancel reaches the provider, B runs a whole cleanup."""

        def __init__(self) -> None:
            self.client = RunningHubClient(fake_hub.base_url, API_KEY, timeout=5)
            self.b_result: Any = None

        def __getattr__(self, name: str) -> Any:
            return getattr(self.client, name)

        def cancel(self, task_id: str) -> Any:
            answer = self.client.cancel(task_id)
            self.b_result = other.cleanup(older_than=timedelta(minutes=10))
            return answer

    provider = CancelThenOtherCleanup()
    first = make_manager(provider=provider)
    first.grant("u", 50)
    job = first.enqueue("u", "upscale_image", IMG).job  # running; the provider says QUEUED
    clock.advance(timedelta(minutes=11))
    a_result = first.cleanup(older_than=timedelta(minutes=10))
    b_result = provider.b_result
    assert b_result is not None and fake_hub.tasks[job.provider_task_id].cancelled
    detail = first.job_detail(job.id)
    assert detail.job.status is Status.FAILED
    assert [j.id for j in a_result.expired + b_result.expired] == [job.id], (a_result, b_result)
    assert a_result.failed == [] and b_result.failed == []
    assert "timed out after 11m" in detail.job.error and "still running" in detail.job.error, detail.job.error
    assert [e.amount for e in detail.ledger] == [-5, 5]
    assert [str(e.to_status) for e in detail.events].count("failed") == 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # SQLite serialises writers anyway
def test_webhook_held_open_while_process_next_records_its_task(make_manager: Any, fake_hub: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic form of the early-webhook race: the webhook's transaction found no job yet
    and stayed open while process-next stored the task id; under READ COMMITTED neither saw the
    other's row and the webhook stayed unmatched for ever, the job running."""
    from aiqueue.provider.fake_server import FakeTask, _webhook_body
    from aiqueue.store import Tx

    recorder, receiver = make_manager(), make_manager()
    recorder.grant("u", 50)
    job = recorder.enqueue("u", "upscale_image", IMG, start=False).job
    task_id = str(fake_hub._next_id)  # the fake hands out ids in sequence
    body = _webhook_body(FakeTask(task_id=task_id, api="ai-app", webapp_id="1", workflow_id=None,
                                  node_info_list=[], webhook_url=None, status="SUCCESS",
                                  outputs=[f"https://cdn.example.com/{task_id}.png"]))
    looked, recorded = threading.Event(), threading.Event()
    original = Tx.get_job_by_task

    def held_lookup(self: Tx, tid: str) -> Any:
        found = original(self, tid)
        if threading.current_thread().name == "webhook":
            looked.set()
            recorded.wait(1.5)  # with the per-task lock the record waits for us: time out
        return found

    monkeypatch.setattr(Tx, "get_job_by_task", held_lookup)
    errors: list[BaseException] = []

    def deliver() -> None:
        try:
            receiver.finish_webhook(body)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    hook = threading.Thread(target=deliver, name="webhook")
    hook.start()
    assert looked.wait(10)
    started = recorder.process_next().started
    recorded.set()
    hook.join(10)
    assert not hook.is_alive() and errors == []
    assert [j.provider_task_id for j in started] == [task_id]
    final = recorder.job_detail(job.id).job
    assert (final.status, recorder.unmatched_webhooks()) == (Status.COMPLETED, [])

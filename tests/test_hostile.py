"""Scenario 8 (issue 3): hostile input through the real CLI entry point (and the manager API where
argv cannot carry it), on SQLite and PostgreSQL.

Every refusal is checked the same way: a non-zero exit with the documented code, an empty stdout,
exactly one short line on stderr (one JSON line with --json), and a byte-for-byte identical dump of
every aiqueue table before and after. Covered: credit amounts (0, -5, 1.5, NaN, 1e30, 2**70...);
user ids with RTL marks, invisible or control characters, NUL (manager API), 10 kB; input values
of 1 MB, just over the limit, with control characters, or not valid text (raw bytes in argv);
webhook bodies that are not UTF-8, 10 MB large (stdin and file, with the child's peak memory
measured), deeply nested, scalar JSON or missing fields; a config with a wrong type in every key.
User ids with quotes and `;` are legitimate data: they are stored and echoed verbatim (no
injection), not refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from aiqueue.errors import InputError, UsageError
from tests.cli_helpers import Run, run_cli
from tests.conftest import API_KEY, TOOLS_TOML
from tests.invariants import check_invariants

TABLES = ("aiqueue_jobs", "aiqueue_job_events", "aiqueue_accounts", "aiqueue_ledger", "aiqueue_webhooks",
          "aiqueue_queue_state")
MB = 1024 * 1024
CLI = Callable[..., Run]


def dump(url: str) -> dict[str, list[tuple[Any, ...]]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {t: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY 1"))] for t in TABLES}
    finally:
        engine.dispose()


def refused(run: Run, code: int) -> str:
    """Exit `code`, nothing on stdout, one short line on stderr; returns that line."""
    where = (run.args[-3:], run.code, run.stdout[:200], run.stderr[:300])
    assert run.code == code, where
    assert run.stdout == "", where
    assert run.stderr.endswith("\n") and run.stderr.count("\n") == 1, where
    assert len(run.stderr) < 400, where
    if "--json" in run.args:
        error = json.loads(run.stderr)["error"]
        assert error["exit_code"] == code and error["message"], where
        return str(error["message"])
    assert run.stderr.startswith("error: ") and "Traceback" not in run.stderr, where
    return run.stderr[len("error: "):].strip()


@pytest.fixture
def options(db_url: str, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, ...]:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    return ("--config", str(config_file), "--db", db_url)


@pytest.fixture
def cli(options: tuple[str, ...], manager: Any) -> CLI:
    """The CLI on a database holding a running job (alice) and a funded user (bob)."""

    def run(*args: str, input: bytes | str | None = None) -> Run:
        return run_cli(*options, *args, input=input)

    manager.grant("alice", 100)
    manager.grant("bob", 100)
    manager.enqueue("alice", "upscale_image", {"image": "in.png"})
    return run


def each_refused(cli: CLI, db_url: str, cases: list[tuple[str, ...]], code: int, *, json_too: bool = True) -> None:
    before = dump(db_url)
    for args in cases:
        refused(cli(*args), code)
        if json_too:
            refused(cli(*args, "--json"), code)
    assert dump(db_url) == before
    assert check_invariants(db_url, 3) == []


# --- credit amounts --------------------------------------------------------------------------------

AMOUNTS = ["0", "-5", "1.5", "NaN", "nan", "inf", "-inf", "1e30", str(2**70), str(10**12 + 1), str(-(2**70)),
           "", " ", "0x10", "1_000", "٣", "5.0", "+-5", "0.0", "1e3", "5 5", "9" * 5000]


def test_bad_credit_amounts(cli: CLI, db_url: str, manager: Any) -> None:
    each_refused(cli, db_url, [("credits", "grant", "bob", amount) for amount in AMOUNTS], 2)
    before = dump(db_url)
    for amount in (0, -5, 1.5, float("nan"), float("inf"), 1e30, 2**70, True, "5", None):
        with pytest.raises(UsageError):
            manager.grant("bob", amount)
    assert dump(db_url) == before


# --- user ids --------------------------------------------------------------------------------------

BAD_USERS = {
    "right-to-left mark": "bob\u200f",
    "right-to-left override": "\u202eevil",
    "left-to-right isolate": "a\u2066b",
    "arabic letter mark": "a\u061cb",
    "zero-width space": "bo\u200bb",
    "byte order mark": "\ufeffbob",
    "escape sequence": "bob\x1b[31m",
    "tab": "b\tob",
    "newline": "bob\nmallory",
    "carriage return": "bob\r",
    "delete": "bob\x7f",
    "10 kB": "u" * 10_000,
    "201 characters": "u" * 201,
    "empty": "",
    "blank": "   ",
}


def test_hostile_user_ids_are_refused(cli: CLI, db_url: str) -> None:
    cases: list[tuple[str, ...]] = []
    for user in BAD_USERS.values():
        cases += [
            ("credits", "grant", user, "10"),
            ("credits", "balance", user),
            ("credits", "ledger", "--user", user),
            ("enqueue", "--user", user, "--tool", "upscale_image", "--input", "image=x.png"),
        ]
    each_refused(cli, db_url, cases, 2)
    message = refused(cli("credits", "grant", BAD_USERS["10 kB"], "10"), 2)
    assert "10000" in message and "u" * 50 not in message  # named by its length, not echoed


def test_nul_and_control_characters_through_the_manager_api(manager: Any, db_url: str) -> None:
    manager.grant("bob", 100)
    job = manager.enqueue("bob", "upscale_image", {"image": "x.png"}, start=False).job
    before = dump(db_url)
    nul_users = ["a\x00b", "\x00", "bob\x00", "a\ud800b"]
    for user in nul_users:
        for call in (lambda: manager.grant(user, 5), lambda: manager.balance(user),
                     lambda: manager.ledger(user=user),
                     lambda: manager.enqueue(user, "upscale_image", {"image": "x.png"})):
            with pytest.raises(UsageError):
                call()
    for value in ("x\x00y", "\x1b[2J", "a\x07", "a\ud800", b"\xff\xfe", 5, None):
        with pytest.raises(InputError):
            manager.enqueue("carol", "upscale_image", {"image": value})  # type: ignore[dict-item]
    with pytest.raises(UsageError):
        manager.grant("carol", 5, note="top-up\x00")
    with pytest.raises(UsageError):
        manager.cancel(job.id, reason="because\x00")
    assert dump(db_url) == before
    assert check_invariants(db_url, 3) == []


def test_quotes_and_semicolons_are_data_not_sql(cli: CLI, db_url: str) -> None:
    users = ['a"b', "a'b", "x'; DROP TABLE aiqueue_ledger; --", "Robert'); DELETE FROM aiqueue_jobs;--",
             "%_\\", "\U0001f600" * 200, "é" * 200]
    for user in users:
        grant = cli("credits", "grant", user, "10", "--json")
        assert grant.code == 0, grant.stderr
        assert grant.json()["user"] == user
        assert cli("credits", "balance", user, "--json").json() == {"user": user, "balance": 10}
        job = cli("enqueue", "--user", user, "--tool", "upscale_image", "--input", "image=a';b.png", "--json",
                  "--no-start")
        assert job.json()["job"]["user"] == user and job.json()["job"]["inputs"]["image"] == "a';b.png"
        entries = cli("credits", "ledger", "--user", user, "--json").json()["entries"]
        assert [e["kind"] for e in entries] == ["grant", "charge"] and {e["user"] for e in entries} == {user}
    tables = dump(db_url)
    assert len(tables["aiqueue_jobs"]) == 1 + len(users) and len(tables["aiqueue_ledger"]) == 3 + 2 * len(users)
    assert check_invariants(db_url, 3) == []


# --- input values ----------------------------------------------------------------------------------


def test_hostile_input_values_are_refused(cli: CLI, db_url: str) -> None:
    enqueue = ("enqueue", "--user", "bob", "--tool", "upscale_image", "--no-start")
    values = ["A" * MB, "A" * (16 * 1024 + 1), "é" * (8 * 1024 + 1), "x\x1b[31mred", "bell\x07", "x\x7f",
              "\x1b]0;title\x07", "a\x0bb", "a\x0cb"]
    cases = [(*enqueue, "--input", f"image={value}") for value in values]
    cases += [
        (*enqueue, "--input", "image=x.png", "--input", "im\x1bage=y"),  # an unknown input name
        (*enqueue, "--input", "image=x.png", "--input", "image=y.png"),  # given twice
        (*enqueue, "--input", "=x"),
        (*enqueue, "--input", "image"),
    ]
    each_refused(cli, db_url, cases, 2)
    each_refused(cli, db_url, [("enqueue", "--user", "bob", "--tool", "x'; DROP TABLE aiqueue_jobs;--\n",
                                "--input", "image=x.png")], 4)
    message = refused(cli(*enqueue, "--input", "image=" + "A" * MB), 2)
    assert "1048576 bytes" in message and "AAAA" not in message
    limit = cli(*enqueue, "--input", "image=" + "A" * (16 * 1024), "--json")  # exactly at the limit: fine
    assert limit.code == 0, limit.stderr


def test_binary_input_value_through_a_real_process(options: tuple[str, ...], db_url: str, manager: Any) -> None:
    manager.grant("bob", 100)
    before = dump(db_url)
    env = {**os.environ, "RUNNINGHUB_API_KEY": API_KEY}
    raw = b"image=\xff\xfe\xc3\x28"  # not UTF-8: Python hands it to the program as lone surrogates
    args = [sys.executable, "-m", "aiqueue", *options, "enqueue", "--user", "bob", "--tool", "upscale_image", "--input"]
    done = subprocess.run([os.fsencode(a) for a in args] + [raw], capture_output=True, env=env, timeout=60)
    assert done.returncode == 2 and done.stdout == b"", done.stderr
    assert done.stderr.startswith(b"error: ") and done.stderr.count(b"\n") == 1, done.stderr
    assert b"control characters" in done.stderr
    assert dump(db_url) == before


# --- webhook bodies --------------------------------------------------------------------------------


def _bodies(task_id: str, good: bytes) -> dict[str, bytes]:
    data = json.loads(good)["eventData"]
    v1 = json.dumps({"event": "TASK_END", "taskId": task_id, "eventData": data}).encode()
    return {
        "not UTF-8": b"\xff\xfe\x00{",
        "latin-1": good.replace(b"TASK_END", "TASK_END\xe9".encode("latin-1")),
        "empty": b"",
        "blank": b" \n\t ",
        "10 MB": b"x" * (10 * MB),
        "10 MB of JSON": b'{"event": "TASK_END", "pad": "' + b"x" * (10 * MB) + b'"}',
        "deeply nested arrays": b"[" * 100_000 + b"]" * 100_000,
        "deeply nested objects": b'{"a":' * 40 + b"1" + b"}" * 40,
        "deeply nested eventData": json.dumps({"event": "TASK_END", "taskId": task_id,
                                               "eventData": "[" * 5000 + "]" * 5000}).encode(),
        "integer": b"42",
        "string": b'"TASK_END"',
        "null": b"null",
        "true": b"true",
        "array": b"[]",
        "empty object": b"{}",
        "no taskId": json.dumps({"event": "TASK_END", "eventData": data}).encode(),
        "no event": json.dumps({"taskId": task_id, "eventData": data}).encode(),
        "no eventData": json.dumps({"event": "TASK_END", "taskId": task_id}).encode(),
        "eventData without a result": v1.replace(b"code", b"kode"),
        "eventData is a number": json.dumps({"event": "TASK_END", "taskId": task_id, "eventData": 7}).encode(),
        "taskId is a float": json.dumps({"event": "TASK_END", "taskId": 1.5, "eventData": data}).encode(),
        "taskId is an object": json.dumps({"event": "TASK_END", "taskId": {"a": 1}, "eventData": data}).encode(),
        "taskId with RTL override": json.dumps({"event": "TASK_END", "taskId": "1\u202e2", "eventData": data}).encode(),
        "taskId 10 kB": json.dumps({"event": "TASK_END", "taskId": "9" * 10_000, "eventData": data}).encode(),
        "huge integer": b'{"event": "TASK_END", "taskId": ' + b"9" * 5000 + b"}",
        "NaN": b'{"event": "TASK_END", "taskId": "1", "eventData": NaN}',
        "truncated": good[: len(good) // 2],
        "other event": good.replace(b"TASK_END", b"TASK_START"),
        "event with NUL": good.replace(b'"TASK_END"', b'"TASK_END\\u0000"'),
    }


def test_hostile_webhook_bodies_are_refused(cli: CLI, db_url: str, fake_hub: Any, tmp_path: Path) -> None:
    running = cli("status", "--json").json()["running"][0]
    good = fake_hub.finish_task(running["provider_task_id"], deliver=False)
    before = dump(db_url)
    for name, body in _bodies(running["provider_task_id"], good).items():
        message = refused(cli("finish", "--webhook", "-", input=body), 9)
        assert len(message) < 300, (name, message)
        path = tmp_path / "body.json"
        path.write_bytes(body)
        refused(cli("finish", "--webhook", str(path), "--json"), 9)
    assert dump(db_url) == before
    for source in (str(tmp_path / "missing.json"), str(tmp_path)):
        refused(cli("finish", "--webhook", source), 2)
    assert dump(db_url) == before
    assert check_invariants(db_url, 3) == []
    applied = cli("finish", "--webhook", "-", "--json", input=good)  # the real one still works
    assert applied.json()["job"]["status"] == "completed"


# Reports the peak resident size of the aiqueue process itself (VmHWM belongs to the process's own
# memory map, which exec() replaces; ru_maxrss from wait4 would also count the parent's pages that
# a vfork()ed child held before exec).
PEAK_RSS = r"""
import atexit, runpy, sys
report = sys.argv[1]
def peak():
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(report, "w") as out:
        out.write(str(kb * 1024))
atexit.register(peak)
sys.argv = ["aiqueue", *sys.argv[2:]]
runpy.run_module("aiqueue", run_name="__main__", alter_sys=True)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_a_10_mb_webhook_body_is_refused_in_bounded_memory(
    options: tuple[str, ...], db_url: str, manager: Any, tmp_path: Path
) -> None:
    manager.grant("bob", 100)
    before = dump(db_url)

    def run(body: bytes, via: str) -> tuple[subprocess.CompletedProcess[bytes], int]:
        path, report = tmp_path / "body", tmp_path / "peak"
        path.write_bytes(body)
        source = "-" if via == "stdin" else str(path)
        args = [sys.executable, "-c", PEAK_RSS, str(report), *options, "finish", "--webhook", source]
        with path.open("rb") as stdin:
            done = subprocess.run(args, stdin=stdin, capture_output=True, timeout=60)
        return done, int(report.read_text())

    small, baseline = run(b"{}", "stdin")
    assert small.returncode == 9
    big = b'{"event": "TASK_END", "x": "' + b"y" * (10 * MB) + b'"}'
    for via in ("stdin", "file"):
        done, peak = run(big, via)
        assert done.returncode == 9 and done.stdout == b"", (via, done.stderr)
        assert done.stderr.startswith(b"error: webhook body is too large") and done.stderr.count(b"\n") == 1
        assert peak < 10 * (10 * MB)  # well under 10x the body
        assert peak - baseline < 4 * MB, (via, peak, baseline)  # the body is never held whole
    assert dump(db_url) == before


# --- the config: a wrong type in every key ---------------------------------------------------------

TOOL = "tools.upscale_image"
INPUT = f"{TOOL}.inputs.image"
# (what replaces a line of the valid config or is added to it, the key the message must name)
SECTION_CASES: list[tuple[str, str]] = [
    ('[database]\nurl = 5', "database.url"),
    ('[database]\nurl = "mysql://u@h/db"', "database.url"),
    ('[queue]\nmax_concurrent = "three"', "queue.max_concurrent"),
    ("[queue]\nmax_concurrent = 0", "queue.max_concurrent"),
    ("[queue]\nmax_concurrent = -1", "queue.max_concurrent"),
    ("[queue]\nmax_concurrent = 1.5", "queue.max_concurrent"),
    ("[queue]\nmax_concurrent = true", "queue.max_concurrent"),
    ("[queue]\nmax_concurrent = [3]", "queue.max_concurrent"),
    ("[queue]\nstale_after = true", "queue.stale_after"),
    ("[queue]\nstale_after = [600]", "queue.stale_after"),
    ("[queue]\nstale_after = {m = 10}", "queue.stale_after"),
    ('[queue]\nstale_after = "-5m"', "queue.stale_after"),
    ('[queue]\nstale_after = "soon"', "queue.stale_after"),
    ("[queue]\nstale_after = 1970-01-01", "queue.stale_after"),
    ("[provider]\nname = 1", "provider.name"),
    ('[provider]\nname = "openai"', "provider.name"),
    ("[provider]\nbase_url = 1", "provider.base_url"),
    ('[provider]\nbase_url = "ftp://example.com"', "provider.base_url"),
    ("[provider]\nwebhook_url = false", "provider.webhook_url"),
    ("[provider]\napi_key = 123", "provider.api_key"),
    ("[provider]\napi_key = true", "provider.api_key"),
    ('[provider]\napi_key = ""', "provider.api_key"),
    ('[provider]\ntimeout = "2"', "provider.timeout"),
    ("[provider]\ntimeout = true", "provider.timeout"),
    ("[provider]\ntimeout = -1", "provider.timeout"),
    ("[provider]\ntimeout = 0", "provider.timeout"),
    ("[provider]\ntimeout = nan", "provider.timeout"),
    ("[provider]\ntimeout = inf", "provider.timeout"),
    ("queue = 3", "queue"),
    ('provider = "x"', "provider"),
    ('database = ["x"]', "database"),
    ("[queue]\nmax_concurent = 3", "queue.max_concurent"),
    ("[surprise]\nx = 1", "surprise"),
    ('tools = "x"', "tools"),
    ("[tools]\nupscale_image = 5", "tools.upscale_image"),
    ('[tools.t]\nwebapp_id = "1"\ncost = 5\ninputs = "x"', "tools.t.inputs"),
    ('[tools.t]\nwebapp_id = "1"\ncost = 5\ninputs = {image = 5}', "tools.t.inputs.image"),
    ('[tools.t]\nwebapp_id = "1"\ncost = 5\nsurprise = 1', "tools.t.surprise"),
    ('[tools.t]\ncost = 5', "tools.t.webapp_id"),
    ('[tools."bad name"]\nwebapp_id = "1"\ncost = 5', "tools.bad name"),
]
TOOL_CASES: list[tuple[str, str, str]] = [
    # (line of TOOLS_TOML, its replacement, key)
    ('webapp_id = "1990000000000000001"', "webapp_id = 1.5", f"{TOOL}.webapp_id"),
    ('webapp_id = "1990000000000000001"', "webapp_id = true", f"{TOOL}.webapp_id"),
    ('webapp_id = "1990000000000000001"', 'webapp_id = "abc"', f"{TOOL}.webapp_id"),
    ('webapp_id = "1990000000000000001"', "webapp_id = -1", f"{TOOL}.webapp_id"),
    ("cost = 5", 'cost = "5"', f"{TOOL}.cost"),
    ("cost = 5", "cost = 0", f"{TOOL}.cost"),
    ("cost = 5", "cost = -5", f"{TOOL}.cost"),
    ("cost = 5", "cost = 1.5", f"{TOOL}.cost"),
    ("cost = 5", "cost = true", f"{TOOL}.cost"),
    ("cost = 5", "cost = nan", f"{TOOL}.cost"),
    ('node_id = "12"', "node_id = true", f"{INPUT}.node_id"),
    ('node_id = "12"', "node_id = 1.5", f"{INPUT}.node_id"),
    ('field = "image"', "field = 1", f"{INPUT}.field"),
    ('field = "image"', "field = []", f"{INPUT}.field"),
    ('default = "2"', "default = [2]", f"{TOOL}.inputs.scale.default"),
    ('default = "2"', "default = {a = 1}", f"{TOOL}.inputs.scale.default"),
    ('default = "2"', "default = nan", f"{TOOL}.inputs.scale.default"),
    ("[tools.upscale_image.inputs.image]\n", "[tools.upscale_image.inputs.image]\nsurprise = 1\n", f"{INPUT}.surprise"),
]


def _config_texts(base_url: str) -> list[tuple[str, str]]:
    head = f'[provider]\nbase_url = "{base_url}"\n'
    texts = []
    for snippet, key in SECTION_CASES:
        if snippet.startswith("[provider]\nbase_url"):
            body = snippet + "\n" + TOOLS_TOML
        elif snippet.startswith("[provider]"):
            body = snippet.replace("[provider]", head.rstrip("\n")) + "\n" + TOOLS_TOML
        elif snippet.startswith("provider ="):
            body = snippet + "\n" + TOOLS_TOML
        elif "tools" in snippet:
            body = snippet + "\n" + head
        else:
            body = snippet + "\n" + head + TOOLS_TOML
        texts.append((body, key))
    for old, new, key in TOOL_CASES:
        assert old in TOOLS_TOML, old
        texts.append((head + TOOLS_TOML.replace(old, new, 1), key))
    return texts


def test_a_config_with_a_wrong_type_in_every_key(
    db_url: str, fake_hub: Any, tmp_path: Path, manager: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    manager.grant("bob", 100)
    before = dump(db_url)
    path = tmp_path / "bad.toml"
    for body, key in _config_texts(fake_hub.base_url):
        path.write_text(body)
        path.chmod(0o600)
        for args in (("credits", "grant", "bob", "5"),
                     ("enqueue", "--user", "bob", "--tool", "upscale_image", "--input", "image=x")):
            message = refused(run_cli("--config", str(path), "--db", db_url, *args), 3)
            assert key in message and str(path) in message, (body, message)
        refused(run_cli("--config", str(path), "--db", db_url, "status", "--json"), 3)
    for raw, what in ((b"[queue\n", "invalid TOML"), (b"[queue]\nmax_concurrent = \xff\n", "not UTF-8"),
                      (b"\x00\x01\x02", "invalid TOML")):
        path.write_bytes(raw)
        assert what in refused(run_cli("--config", str(path), "--db", db_url, "credits", "grant", "bob", "5"), 3)
    for name, value in (("AIQUEUE_MAX_CONCURRENT", "three"), ("AIQUEUE_MAX_CONCURRENT", "0"),
                        ("AIQUEUE_DATABASE_URL", "mysql://x")):
        monkeypatch.setenv(name, value)
        message = refused(run_cli("credits", "grant", "bob", "5"), 3)
        assert name in message
        monkeypatch.delenv(name)
    assert dump(db_url) == before

"""Settings: file discovery, precedence, validation messages, secrets, saving."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from aiqueue.errors import ConfigError, ConflictError
from aiqueue.settings import (
    Settings,
    default_database_url,
    load_settings,
    mask_url,
    redacted,
    save_config,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"

TOOL = """
[tools.upscale_image]
webapp_id = "1937264810573920481"
cost = 5

[tools.upscale_image.inputs.image]
node_id = "12"
field = "image"
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No stray AIQUEUE_* / RUNNINGHUB_* variables, and a private HOME, XDG dirs and cwd, so the
    developer's real config can never leak into a test."""
    for name in list(os.environ):
        if name.startswith(("AIQUEUE_", "RUNNINGHUB_")):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    path.chmod(0o600)  # a config may hold the API key: private, as load_settings insists
    return path


def config_error(path: Path, text: str) -> str:
    write(path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert info.value.exit_code == 3
    return message


# --- defaults and discovery -------------------------------------------------------------------


def test_no_file_gives_defaults(clean_env: Path) -> None:
    settings = load_settings()
    assert settings.config_path is None
    assert settings.database_url == f"sqlite:///{clean_env}/.local/share/aiqueue/aiqueue.db"
    assert settings.max_concurrent == 3
    assert settings.stale_after == timedelta(minutes=10)
    assert settings.provider_name == "runninghub"
    assert settings.base_url == "https://www.runninghub.ai"
    assert settings.webhook_url is None
    assert settings.api_key is None
    assert settings.request_timeout == 10.0
    assert dict(settings.tools) == {}
    assert set(settings.sources.values()) == {"default"}
    assert settings.sources["database.url"] == "default"


def test_default_database_url_follows_xdg_data_home(tmp_path: Path) -> None:
    assert default_database_url({"XDG_DATA_HOME": str(tmp_path / "d"), "HOME": "/nope"}) == (
        f"sqlite:///{tmp_path}/d/aiqueue/aiqueue.db"
    )
    assert default_database_url({"HOME": "/home/ann"}) == (
        "sqlite:////home/ann/.local/share/aiqueue/aiqueue.db"
    )
    # The XDG spec says relative values are to be ignored.
    assert default_database_url({"XDG_DATA_HOME": "rel", "HOME": "/home/ann"}).startswith(
        "sqlite:////home/ann/.local/share/"
    )


def test_discovery_order(tmp_path: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = write(clean_env / ".config" / "aiqueue" / "config.toml", "[queue]\nmax_concurrent = 4\n")
    assert load_settings().config_path == xdg

    xdg_home = tmp_path / "xdg"
    moved = write(xdg_home / "aiqueue" / "config.toml", "[queue]\nmax_concurrent = 5\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg_home))
    assert load_settings().config_path == moved

    local = write(Path.cwd() / "aiqueue.toml", "[queue]\nmax_concurrent = 6\n")
    assert load_settings().config_path == local
    assert load_settings().max_concurrent == 6

    named = write(tmp_path / "named.toml", "[queue]\nmax_concurrent = 7\n")
    monkeypatch.setenv("AIQUEUE_CONFIG", str(named))
    assert load_settings().config_path == named

    flag = write(tmp_path / "flag.toml", "[queue]\nmax_concurrent = 8\n")
    settings = load_settings(flag)
    assert settings.config_path == flag
    assert settings.max_concurrent == 8
    assert settings.sources["queue.max_concurrent"] == "file"


def test_env_mapping_argument_is_used_instead_of_os_environ(tmp_path: Path) -> None:
    named = write(tmp_path / "named.toml", "[queue]\nmax_concurrent = 2\n")
    settings = load_settings(env={"AIQUEUE_CONFIG": str(named), "HOME": str(tmp_path)})
    assert settings.config_path == named


@pytest.mark.parametrize("how", ["flag", "env"])
def test_named_config_that_does_not_exist_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        if how == "flag":
            load_settings(missing)
        else:
            monkeypatch.setenv("AIQUEUE_CONFIG", str(missing))
            load_settings()
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)


def test_relative_config_path_is_made_absolute(tmp_path: Path) -> None:
    write(Path.cwd() / "sub" / "c.toml", "")
    settings = load_settings("sub/c.toml")
    assert settings.config_path == Path.cwd() / "sub" / "c.toml"
    assert settings.config_path.is_absolute()


# --- precedence -------------------------------------------------------------------------------


def test_database_url_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "c.toml", '[database]\nurl = "sqlite:////srv/file.db"\n')

    settings = load_settings(path)
    assert (settings.database_url, settings.sources["database.url"]) == (
        "sqlite:////srv/file.db",
        "file",
    )

    monkeypatch.setenv("AIQUEUE_DATABASE_URL", "sqlite:////srv/env.db")
    settings = load_settings(path)
    assert (settings.database_url, settings.sources["database.url"]) == (
        "sqlite:////srv/env.db",
        "env",
    )

    settings = load_settings(path, db_url="sqlite:////srv/flag.db")
    assert (settings.database_url, settings.sources["database.url"]) == (
        "sqlite:////srv/flag.db",
        "flag",
    )


def test_api_key_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().sources["provider.api_key"] == "default"
    path = write(tmp_path / "c.toml", '[provider]\napi_key = "from-file"\n')
    settings = load_settings(path)
    assert (settings.api_key, settings.sources["provider.api_key"]) == ("from-file", "file")

    monkeypatch.setenv("RUNNINGHUB_API_KEY", "from-env")
    settings = load_settings(path)
    assert (settings.api_key, settings.sources["provider.api_key"]) == ("from-env", "env")


def test_empty_environment_variables_count_as_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "c.toml", '[provider]\napi_key = "from-file"\n')
    monkeypatch.setenv("RUNNINGHUB_API_KEY", "")
    monkeypatch.setenv("AIQUEUE_DATABASE_URL", "")
    monkeypatch.setenv("AIQUEUE_CONFIG", "")
    settings = load_settings(path)
    assert settings.api_key == "from-file"
    assert settings.sources["database.url"] == "default"


def test_max_concurrent_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "c.toml", "[queue]\nmax_concurrent = 2\n")
    monkeypatch.setenv("AIQUEUE_MAX_CONCURRENT", "9")
    settings = load_settings(path)
    assert (settings.max_concurrent, settings.sources["queue.max_concurrent"]) == (9, "env")

    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("AIQUEUE_MAX_CONCURRENT", bad)
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert "AIQUEUE_MAX_CONCURRENT" in str(info.value)
        assert "queue.max_concurrent" in str(info.value)


# --- database URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("sqlite:///jobs.db", "{dir}/jobs.db"),
        ("sqlite:///./data/jobs.db", "{dir}/data/jobs.db"),
        ("sqlite:///../up.db", "{dir}/../up.db"),
        ("sqlite:////abs/jobs.db", "/abs/jobs.db"),
    ],
)
def test_relative_sqlite_path_in_file_resolves_against_config_dir(
    tmp_path: Path, written: str, expected: str
) -> None:
    config_dir = tmp_path / "etc" / "aiqueue"
    path = write(config_dir / "aiqueue.toml", f'[database]\nurl = "{written}"\n')
    settings = load_settings(path)
    assert settings.database_url == "sqlite:///" + expected.format(dir=config_dir)
    # The point of it: the same file means the same database from any working directory.
    os.chdir(tmp_path)
    assert load_settings(path).database_url == settings.database_url


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_sqlite_left_alone(tmp_path: Path, url: str) -> None:
    path = write(tmp_path / "c.toml", f'[database]\nurl = "{url}"\n')
    assert load_settings(path).database_url == url


def test_relative_sqlite_from_flag_or_env_is_left_to_the_working_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings(db_url="sqlite:///here.db").database_url == "sqlite:///here.db"
    monkeypatch.setenv("AIQUEUE_DATABASE_URL", "sqlite:///env.db")
    assert load_settings().database_url == "sqlite:///env.db"


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u:pw@db.example:5432/aiqueue",
        "postgresql://u:pw@db.example:5432/aiqueue",
        "postgresql+psycopg://u:pw@db.example:5432/aiqueue",
    ],
)
def test_postgres_urls_are_normalised(tmp_path: Path, url: str) -> None:
    expected = "postgresql+psycopg://u:pw@db.example:5432/aiqueue"
    assert load_settings(db_url=url).database_url == expected
    path = write(tmp_path / "c.toml", f'[database]\nurl = "{url}"\n')
    assert load_settings(path).database_url == expected


@pytest.mark.parametrize(
    "url",
    ["mysql://u:hunter2@h/db", "postgresql+psycopg2://u:hunter2@h/db", "jobs.db", "sqlite:///"],
)
def test_unsupported_database_url(tmp_path: Path, url: str) -> None:
    message = config_error(tmp_path / "c.toml", f'[database]\nurl = "{url}"\n')
    assert "database.url" in message
    assert "hunter2" not in message  # a bad URL is echoed with its password masked
    with pytest.raises(ConfigError) as info:
        load_settings(db_url=url)
    assert "--db" in str(info.value) and "database.url" in str(info.value)


# --- the example file -------------------------------------------------------------------------


def test_example_config_loads() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.config_path == EXAMPLE
    assert list(settings.tools) == [
        "upscale_image",
        "upscale_video",
        "remove_background",
        "portrait_enhance",
    ]
    costs = {name: tool.cost for name, tool in settings.tools.items()}
    assert costs == {
        "upscale_image": 5,
        "upscale_video": 20,
        "remove_background": 3,
        "portrait_enhance": 8,
    }
    for tool in settings.tools.values():
        assert len(tool.webapp_id) == 19 and tool.webapp_id.isdigit()
    image = settings.tools["upscale_image"]
    assert list(image.inputs) == ["image", "scale"]
    assert (image.inputs["image"].node_id, image.inputs["image"].field) == ("12", "image")
    assert image.inputs["image"].default is None and image.inputs["image"].required
    assert (
        image.inputs["scale"].node_id,
        image.inputs["scale"].field,
        image.inputs["scale"].default,
    ) == (
        "15",
        "value",
        "2",
    )
    assert settings.tools["upscale_video"].inputs["video"].required
    assert settings.tools["upscale_video"].inputs["scale"].default == "2"
    assert list(settings.tools["remove_background"].inputs) == ["image"]
    assert settings.tools["portrait_enhance"].inputs["strength"].default == "0.6"
    assert settings.base_url == "https://www.runninghub.ai"
    assert settings.api_key is None  # commented out: the example prefers RUNNINGHUB_API_KEY


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    for key in (
        "url", "max_concurrent", "stale_after", "name", "base_url", "webhook_url",
        "api_key", "timeout", "webapp_id", "cost", "node_id", "field", "default",
        "RUNNINGHUB_API_KEY", "postgresql+psycopg://", "sqlite:///",
        "https://queue.example.org/hooks/runninghub?token=change-me",
    ):  # fmt: skip
        assert key in text, key


# --- parsing of good values -------------------------------------------------------------------


def test_full_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        """
        [queue]
        max_concurrent = 5
        stale_after = "90s"

        [provider]
        name = "runninghub"
        base_url = "https://rh.example/"
        webhook_url = "https://q.example/hook?token=abc"
        timeout = 2.5

        [tools.t-1]
        webapp_id = 1937264810573920481
        cost = 1
        inputs.img = { node_id = 12, field = "image" }
        inputs.n = { node_id = "4", field = "value", default = 3 }
        inputs.f = { node_id = "5", field = "value", default = 0.25 }
        inputs.b = { node_id = "6", field = "value", default = true }
        """,
    )
    settings = load_settings(path)
    assert settings.max_concurrent == 5
    assert settings.stale_after == timedelta(seconds=90)
    assert settings.base_url == "https://rh.example"  # trailing slash dropped for joining paths
    assert settings.webhook_url == "https://q.example/hook?token=abc"
    assert settings.request_timeout == 2.5
    tool = settings.tools["t-1"]
    assert tool.webapp_id == "1937264810573920481"
    assert [(i.name, i.node_id, i.default) for i in tool.inputs.values()] == [
        ("img", "12", None),
        ("n", "4", "3"),
        ("f", "5", "0.25"),
        ("b", "6", "true"),
    ]
    assert settings.sources["tools"] == "file"


@pytest.mark.parametrize(
    ("written", "seconds"), [('"10m"', 600), ('"1h"', 3600), ('"1h30m"', 5400), ("45", 45)]
)
def test_durations(tmp_path: Path, written: str, seconds: int) -> None:
    path = write(tmp_path / "c.toml", f"[queue]\nstale_after = {written}\n")
    assert load_settings(path).stale_after == timedelta(seconds=seconds)


def test_nineteen_digit_integer_webapp_id_keeps_every_digit(tmp_path: Path) -> None:
    big = 9_007_199_254_740_993_123  # > 2**53: would lose digits through a float
    path = write(tmp_path / "c.toml", f"[tools.x]\nwebapp_id = {big}\ncost = 1\n")
    assert load_settings(path).tools["x"].webapp_id == str(big) == "9007199254740993123"


def test_settings_are_frozen() -> None:
    settings = load_settings(EXAMPLE)
    with pytest.raises(AttributeError):
        settings.max_concurrent = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        settings.tools["new"] = settings.tools["upscale_image"]  # type: ignore[index]
    with pytest.raises(TypeError):
        settings.tools["upscale_image"].inputs["x"] = None  # type: ignore[index]


# --- validation errors ------------------------------------------------------------------------


X = '[tools.x]\nwebapp_id = "1"\ncost = 1\n'  # a valid tool to hang bad inputs on
I = X + "[tools.x.inputs.i]\n"  # noqa: E741


@pytest.mark.parametrize(
    ("text", "key", "shown"),
    [
        ("[tools.x]\ncost = 1\n", "tools.x.webapp_id", "is required"),
        ('[tools.x]\nwebapp_id = "1"\n', "tools.x.cost", "is required"),
        ('[tools.x]\nwebapp_id = "1"\ncost = 0\n', "tools.x.cost", "(got 0)"),
        ('[tools.x]\nwebapp_id = "1"\ncost = -5\n', "tools.x.cost", "(got -5)"),
        ('[tools.x]\nwebapp_id = "1"\ncost = 1.5\n', "tools.x.cost", "(got 1.5)"),
        ('[tools.x]\nwebapp_id = "1"\ncost = true\n', "tools.x.cost", "(got true)"),
        ('[tools.x]\nwebapp_id = "1"\ncost = "3"\n', "tools.x.cost", '(got "3")'),
        ('[tools.x]\nwebapp_id = "abc"\ncost = 1\n', "tools.x.webapp_id", "digits"),
        ("[tools.x]\nwebapp_id = 1.5\ncost = 1\n", "tools.x.webapp_id", "digits"),
        ("[tools.x]\nwebapp_id = -3\ncost = 1\n", "tools.x.webapp_id", "digits"),
        ('[queue]\nstale_after = "soon"\n', "queue.stale_after", '(got "soon")'),
        ('[queue]\nstale_after = "-5m"\n', "queue.stale_after", "duration"),
        ("[queue]\nmax_concurrent = 0\n", "queue.max_concurrent", "positive integer"),
        ('[queue]\nmax_concurrent = "3"\n', "queue.max_concurrent", "positive integer"),
        ('[provider]\nname = "replicate"\n', "provider.name", "runninghub"),
        ('[provider]\nbase_url = "www.runninghub.ai"\n', "provider.base_url", "http"),
        ('[provider]\nwebhook_url = "ftp://x"\n', "provider.webhook_url", "http"),
        ("[provider]\ntimeout = 0\n", "provider.timeout", "> 0"),
        ('[provider]\ntimeout = "10"\n', "provider.timeout", "> 0"),
        ("[provider]\ntimeout = true\n", "provider.timeout", "> 0"),
        ("[queue]\nmax_concurent = 3\n", "queue.max_concurent", "did you mean max_concurrent?"),
        ("[provider]\napi-key = 'x'\n", "provider.api-key", "did you mean api_key?"),
        ("[databse]\nurl = 'sqlite://'\n", "databse", "did you mean database?"),
        ("[extras]\n", "extras", "not a known key"),
        ("max_concurrent = 3\n", "max_concurrent", "not a known key"),
        ('queue = "fast"\n', "queue", "must be a table"),
        ("tools = 3\n", "tools", "must be a table"),
        ('[tools]\nx = "1234"\n', "tools.x", "must be a table"),
        (X + 'inputs = "image"\n', "tools.x.inputs", "must be a table"),
        (X + "inputs.image = 12\n", "tools.x.inputs.image", "must be a table"),
        (X + "cots = 1\n", "tools.x.cots", "not a known key"),
        ('[tools."bad name"]\nwebapp_id = "1"\ncost = 1\n', "tools.bad name", "tool name"),
        ('[tools."é"]\nwebapp_id = "1"\ncost = 1\n', "tools.é", "tool name"),
        (X + '[tools.x.inputs."a.b"]\nnode_id = "1"\nfield = "f"\n', "tools.x.inputs.a.b", "input"),
        (I + 'field = "f"\n', "tools.x.inputs.i.node_id", "is required"),
        (I + 'node_id = "1"\n', "tools.x.inputs.i.field", "is required"),
        (I + 'node_id = "1"\nfield = ""\n', "tools.x.inputs.i.field", "non-empty"),
        (I + 'node_id = 1.5\nfield = "f"\n', "tools.x.inputs.i.node_id", "string"),
        (I + 'node_id = "1"\nfield = "f"\ndefault = [1]\n', "tools.x.inputs.i.default", "array"),
        (I + 'node_id = "1"\nfield = "f"\nbogus = 1\n', "tools.x.inputs.i.bogus", "not a known"),
        ("[database]\nurl = 5\n", "database.url", "(got 5)"),
    ],
)
def test_validation_errors_name_file_and_key_on_one_line(
    tmp_path: Path, text: str, key: str, shown: str
) -> None:
    path = tmp_path / "aiqueue.toml"
    message = config_error(path, text)
    assert message.startswith(f"config {path}: {key} "), message
    assert shown in message, message


def test_error_carries_data_as_attributes(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[tools.upscale_image]\nwebapp_id = "1"\ncost = -5\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    error = info.value
    assert (
        str(error) == f"config {path}: tools.upscale_image.cost must be a positive integer (got -5)"
    )
    assert error.key == "tools.upscale_image.cost"  # type: ignore[attr-defined]
    assert error.to_dict()["path"] == str(path)
    json.dumps(error.to_dict())


def test_malformed_toml_names_file_and_line(tmp_path: Path) -> None:
    message = config_error(tmp_path / "c.toml", '[queue]\nmax_concurrent = 3\nstale_after = "10m\n')
    assert "line 3" in message
    message = config_error(tmp_path / "d.toml", "[queue]\n[queue]\n")
    assert "line 2" in message


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[provider]\napi_key = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(bad)
    assert str(bad) in str(info.value)
    with pytest.raises(ConfigError):
        load_settings(tmp_path)  # a directory


def test_bad_api_key_is_not_echoed(tmp_path: Path) -> None:
    message = config_error(tmp_path / "c.toml", "[provider]\napi_key = 123456789\n")
    assert "provider.api_key" in message
    assert "123456789" not in message


# --- secrets ----------------------------------------------------------------------------------


def test_api_key_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNINGHUB_API_KEY", "sk-very-secret-key")
    settings = load_settings(db_url="postgres://aiq:db-password@db:5432/aiqueue")
    assert settings.api_key == "sk-very-secret-key"
    for shown in (repr(settings), str(settings), f"{settings}", json.dumps(redacted(settings))):
        assert "sk-very-secret-key" not in shown
        assert "db-password" not in shown
    view = redacted(settings)
    assert view["api_key"] == "***"
    assert view["database_url"] == "postgresql+psycopg://aiq:***@db:5432/aiqueue"
    assert "api_key='***'" in repr(settings)


def test_redacted_view_is_json_and_masks_webhook_token(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        '[provider]\nwebhook_url = "https://q.example/hook?x=1&token=abc123"\n' + TOOL,
    )
    view = json.loads(json.dumps(redacted(load_settings(path))))
    assert view["webhook_url"] == "https://q.example/hook?x=1&token=***"
    assert view["api_key"] is None
    assert view["stale_after_seconds"] == 600
    assert view["config_path"] == str(path)
    assert view["tools"]["upscale_image"]["webapp_id"] == "1937264810573920481"
    assert view["tools"]["upscale_image"]["inputs"]["image"]["required"] is True
    assert view["sources"]["database.url"] == "default"


def test_password_with_at_sign_is_still_masked() -> None:
    settings = load_settings(db_url="postgresql://me:p@ss/w@rd@db/x")
    assert "ss/w" not in repr(settings)
    assert "p@ss" not in redacted(settings)["database_url"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://u:pw@db:5432/a?x=1", "postgresql+psycopg://u:***@db:5432/a?x=1"),
        ("postgresql+psycopg://u:pa?ss@h/db", "postgresql+psycopg://u:***@h/db"),
        ("postgresql+psycopg://h/db?password=zz", "postgresql+psycopg://h/db?password=***"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("https://h:8080/x?to=a@b&token=t", "https://h:8080/x?to=a@b&token=***"),
        ("sqlite:////srv/jobs.db", "sqlite:////srv/jobs.db"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_settings_can_be_built_directly() -> None:
    settings = Settings(database_url="sqlite://")
    assert settings.max_concurrent == 3 and dict(settings.tools) == {}
    assert "sqlite://" in repr(settings)


# --- saving -----------------------------------------------------------------------------------


def test_save_config_writes_0600_and_round_trips(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "aiqueue.toml"
    data = {
        "database": {"url": "sqlite:///jobs.db"},
        "provider": {"api_key": "sk-secret"},
        "tools": {
            "x": {
                "webapp_id": "1937264810573920481",
                "cost": 2,
                "inputs": {"i": {"node_id": "1", "field": "f"}},
            }
        },
    }
    assert save_config(target, data) == target
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    settings = load_settings(target)
    assert settings.api_key == "sk-secret"
    assert settings.database_url == f"sqlite:///{target.parent}/jobs.db"
    assert settings.tools["x"].inputs["i"].required


def test_save_config_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    target = tmp_path / "conf" / "aiqueue.toml"
    target.parent.mkdir()
    target.write_text("# keep me\n")
    target.chmod(0o644)
    with pytest.raises(ConflictError) as info:
        save_config(target, {"queue": {"max_concurrent": 2}})
    assert str(target) in str(info.value)
    assert target.read_text() == "# keep me\n"

    save_config(target, {"queue": {"max_concurrent": 2}}, force=True)
    assert load_settings(target).max_concurrent == 2
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # the old, wider mode does not survive
    assert [p.name for p in target.parent.iterdir()] == ["aiqueue.toml"]  # no temporary left behind


def test_save_config_with_unserialisable_data_creates_no_file(tmp_path: Path) -> None:
    target = tmp_path / "aiqueue.toml"
    with pytest.raises(TypeError):
        save_config(target, {"queue": {"x": object()}})
    assert not target.exists()


# --- import cost ------------------------------------------------------------------------------


def test_import_is_cheap() -> None:
    code = (
        "import sys, aiqueue.settings; "
        "heavy = ('sqlmodel', 'sqlalchemy', 'httpx', 'rich', 'typer', 'tomli_w'); "
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_with_api_key_must_be_private(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[provider]\napi_key = "sk-private-123"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    message = str(err.value)
    assert "chmod 600" in message and "0644" in message and "sk-private-123" not in message
    assert "\n" not in message
    path.chmod(0o640)
    with pytest.raises(ConfigError):
        load_settings(path, env={})
    assert load_settings(path, env={"AIQUEUE_ALLOW_INSECURE_CONFIG": "1"}).api_key == "sk-private-123"
    path.chmod(0o600)
    assert load_settings(path, env={}).api_key == "sk-private-123"
    no_key = write(tmp_path / "open.toml", '[queue]\nmax_concurrent = 2\n')
    no_key.chmod(0o644)  # nothing secret in it: readable is fine
    assert load_settings(no_key, env={}).max_concurrent == 2


# --- the webhook receiver's section ---------------------------------------------------------------

WEBHOOK_TOKEN = "wh-tok_0123456789abcdefghijklmnopqrstuv"


def test_webhook_section_builds_each_submits_url(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", f"""
        [webhook]
        public_url = "https://queue.example.org/aiqueue/"
        token = "{WEBHOOK_TOKEN}"
        """)
    settings = load_settings(path, env={})
    assert settings.webhook_public_url == "https://queue.example.org/aiqueue"
    assert settings.sources["webhook.token"] == "file" and settings.sources["webhook.public_url"] == "file"
    assert settings.submit_webhook_url(42) == (
        f"https://queue.example.org/aiqueue/runninghub/webhook/{WEBHOOK_TOKEN}?job=42")
    assert WEBHOOK_TOKEN not in repr(settings)
    view = json.loads(json.dumps(redacted(settings)))
    assert view["webhook"] == {
        "public_url": "https://queue.example.org/aiqueue", "token": "***",
        "submit_url": "https://queue.example.org/aiqueue/runninghub/webhook/***?job=ID"}
    assert WEBHOOK_TOKEN not in json.dumps(view)


def test_webhook_token_from_env_wins_and_provider_webhook_url_still_works(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", f"""
        [provider]
        webhook_url = "https://q.example/hooks/{WEBHOOK_TOKEN}"
        [webhook]
        token = "{'f' * 40}"
        """)
    settings = load_settings(path, env={"AIQUEUE_WEBHOOK_TOKEN": WEBHOOK_TOKEN})
    assert settings.webhook_token == WEBHOOK_TOKEN and settings.sources["webhook.token"] == "env"
    # Without public_url, submits send provider.webhook_url as it is (no job id added).
    assert settings.submit_webhook_url(7) == f"https://q.example/hooks/{WEBHOOK_TOKEN}"
    view = redacted(settings)
    assert view["webhook_url"] == "https://q.example/hooks/***" and view["webhook"]["token"] == "***"
    assert load_settings(env={}).submit_webhook_url(7) is None


@pytest.mark.parametrize("value, problem", [
    ('"short-token"', "32 to 256 characters"),
    (f'"{"x" * 257}"', "32 to 256 characters"),
    (f'"{WEBHOOK_TOKEN[:-1]}/"', "letters, digits, _ and -"),
    (f'"{WEBHOOK_TOKEN[:-1]}?"', "letters, digits, _ and -"),
    ('""', "non-empty string"),
    ("12345", "non-empty string"),
])
def test_bad_webhook_tokens_are_refused_without_echo(tmp_path: Path, value: str, problem: str) -> None:
    message = config_error(tmp_path / "c.toml", f"[webhook]\ntoken = {value}\n")
    assert "webhook.token" in message and problem in message
    assert value.strip('"') not in message or value == '""'


def test_bad_webhook_token_in_env_is_refused_without_echo(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"AIQUEUE_WEBHOOK_TOKEN": "tiny-secret"})
    assert "AIQUEUE_WEBHOOK_TOKEN" in str(info.value) and "tiny-secret" not in str(info.value)


@pytest.mark.parametrize("text, problem", [
    ('[webhook]\npublic_url = "https://q.example"\n', "webhook.token is not"),
    (f'[webhook]\npublic_url = "ftp://q.example"\ntoken = "{WEBHOOK_TOKEN}"\n', "http:// or https://"),
    (f'[webhook]\npublic_url = "https://q.example/?a=1"\ntoken = "{WEBHOOK_TOKEN}"\n', "no user, query"),
    (f'[webhook]\npublic_url = "https://u:p@q.example"\ntoken = "{WEBHOOK_TOKEN}"\n', "no user, query"),
    ((f'[provider]\nwebhook_url = "https://a.example/h"\n[webhook]\npublic_url = "https://q.example"\n'
      f'token = "{WEBHOOK_TOKEN}"\n'), "not both"),
    ('[webhook]\ntokn = "x"\n', "did you mean token?"),
])
def test_webhook_section_errors_name_the_key(tmp_path: Path, text: str, problem: str) -> None:
    message = config_error(tmp_path / "c.toml", text)
    assert problem in message and WEBHOOK_TOKEN not in message


def test_config_with_webhook_token_must_be_private(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", f'[webhook]\ntoken = "{WEBHOOK_TOKEN}"\n')
    path.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        load_settings(path, env={})
    message = str(err.value)
    assert "webhook.token" in message and "AIQUEUE_WEBHOOK_TOKEN" in message and WEBHOOK_TOKEN not in message
    path.chmod(0o600)
    assert load_settings(path, env={}).webhook_token == WEBHOOK_TOKEN


def test_example_documents_the_webhook_section() -> None:
    text = EXAMPLE.read_text()
    for key in ("[webhook]", "public_url", "token", "AIQUEUE_WEBHOOK_TOKEN", "/runninghub/webhook/{token}?job="):
        assert key in text, key
    settings = load_settings(EXAMPLE)
    assert settings.webhook_public_url is None and settings.webhook_token is None  # commented out

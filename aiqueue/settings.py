"""Load TOML + environment + flags into one frozen Settings; save with tomli-w; a redacted view.

Cheap to import on purpose: stdlib only (plus aiqueue.clock / aiqueue.errors), so `--help`,
completions and config commands never pay for sqlmodel, httpx or rich.

Precedence, highest first: flag > environment > config file > default. `Settings.sources`
records which one won for every dotted key.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from aiqueue.clock import parse_duration
from aiqueue.errors import ConfigError, ConflictError

ENV_CONFIG = "AIQUEUE_CONFIG"
ENV_DATABASE_URL = "AIQUEUE_DATABASE_URL"
ENV_MAX_CONCURRENT = "AIQUEUE_MAX_CONCURRENT"
ENV_API_KEY = "RUNNINGHUB_API_KEY"
ENV_ALLOW_INSECURE = "AIQUEUE_ALLOW_INSECURE_CONFIG"
ENV_WEBHOOK_TOKEN = "AIQUEUE_WEBHOOK_TOKEN"

PROVIDERS = ("runninghub",)
DEFAULT_BASE_URL = "https://www.runninghub.ai"
MASK = "***"
# The receiver's route; the token follows it: {public_url}/runninghub/webhook/{token}?job={id}
WEBHOOK_ROUTE = "/runninghub/webhook/"
MIN_TOKEN_LENGTH = 32

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_KEY_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+")  # URL-safe: it travels in a URL path
_SECRET_PARAM = re.compile(r"token|secret|key|pass|sig|auth", re.IGNORECASE)
# Greedy up to the last '@': a raw '@', '/' or '?' inside a password must still be masked.
_USERINFO = re.compile(r"(?P<user>[^:/?#@]*):(?P<password>.*)@")


@dataclass(frozen=True)
class InputSpec:
    name: str
    node_id: str
    field: str
    default: str | None  # None means the input is required

    @property
    def required(self) -> bool:
        return self.default is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "node_id": self.node_id,
            "field": self.field,
            "default": self.default,
            "required": self.required,
        }


@dataclass(frozen=True)
class ToolSpec:
    name: str
    webapp_id: str  # a string: RunningHub ids are 19 digits, beyond a JSON double's precision
    cost: int
    inputs: Mapping[str, InputSpec]  # in file order

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "webapp_id": self.webapp_id,
            "cost": self.cost,
            "inputs": {name: spec.to_dict() for name, spec in self.inputs.items()},
        }


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True, repr=False)
class Settings:
    database_url: str
    max_concurrent: int = 3
    stale_after: timedelta = timedelta(minutes=10)
    provider_name: str = "runninghub"
    base_url: str = DEFAULT_BASE_URL
    webhook_url: str | None = None  # [provider] webhook_url, sent as is
    webhook_public_url: str | None = None  # [webhook] public_url: the receiver's public root
    webhook_token: str | None = None  # never shown: repr/redacted mask it
    api_key: str | None = None  # never shown: repr/str/redacted mask it
    request_timeout: float = 10.0  # seconds, [provider] timeout
    # `aiqueue doctor` thresholds ([doctor]): the FIFO head's wait and the number queued.
    queue_age_warning: timedelta = timedelta(minutes=30)
    queue_age_critical: timedelta = timedelta(hours=2)
    queue_depth_warning: int = 1000
    queue_depth_critical: int = 10000
    tools: Mapping[str, ToolSpec] = field(default_factory=_empty)
    config_path: Path | None = None  # the file actually loaded, if any
    # dotted key ("database.url", "tools") -> "flag" | "env" | "file" | "default"
    sources: Mapping[str, str] = field(default_factory=_empty)

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("api_key", "webhook_token") and value is not None:
                text = repr(MASK)
            elif f.name in ("database_url", "webhook_url") and value is not None:
                text = repr(mask_url(value))
            elif isinstance(value, MappingProxyType):
                text = repr(dict(value))
            else:
                text = repr(value)
            shown.append(f"{f.name}={text}")
        return f"Settings({', '.join(shown)})"

    @property
    def receives_webhooks(self) -> bool:
        """Whether submits name a webhook URL (else results are fetched by asking RunningHub)."""
        return bool(self.webhook_public_url and self.webhook_token) or self.webhook_url is not None

    def submit_webhook_url(self, job_id: int) -> str | None:
        """The webhookUrl a submit of this job sends: the receiver's URL with the token and the
        job id when [webhook] public_url is set, else [provider] webhook_url as it is (or None)."""
        if self.webhook_public_url and self.webhook_token:
            return f"{self.webhook_public_url}{WEBHOOK_ROUTE}{self.webhook_token}?job={job_id}"
        return self.webhook_url


# Dotted key -> Settings field, for everything but tools.
_FIELDS = {
    "database.url": "database_url",
    "queue.max_concurrent": "max_concurrent",
    "queue.stale_after": "stale_after",
    "provider.name": "provider_name",
    "provider.base_url": "base_url",
    "provider.webhook_url": "webhook_url",
    "provider.api_key": "api_key",
    "provider.timeout": "request_timeout",
    "webhook.public_url": "webhook_public_url",
    "webhook.token": "webhook_token",
    "doctor.queue_age_warning": "queue_age_warning",
    "doctor.queue_age_critical": "queue_age_critical",
    "doctor.queue_depth_warning": "queue_depth_warning",
    "doctor.queue_depth_critical": "queue_depth_critical",
}
_SECTIONS = ("database", "queue", "provider", "doctor", "webhook", "tools")
_TOOL_KEYS = ("webapp_id", "cost", "inputs")
_INPUT_KEYS = ("node_id", "field", "default")


# --- messages ---------------------------------------------------------------------------------

_UNSET: Any = object()


@dataclass(frozen=True)
class _Origin:
    """Where a value came from, for messages, and the directory relative SQLite paths use."""

    label: str  # "config /x/aiqueue.toml", "environment AIQUEUE_DATABASE_URL", "--db"
    source: str  # "file" | "env" | "flag"
    base: Path | None = None
    path: Path | None = None

    def error(self, key: str, problem: str, got: Any = _UNSET) -> ConfigError:
        message = f"{self.label}: {key} {problem}"
        if got is not _UNSET:
            message += f" (got {_show(got)})"
        # One line, always: the CLI prints it as is.
        message = " ".join(message.split("\n"))
        path = str(self.path) if self.path else None
        return ConfigError(message, key=key, path=path, source=self.source)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        value = _mask_anything(value)  # a mistyped URL may still carry a password or token
        text = value if len(value) <= 60 else value[:57] + "..."
        return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


# --- small validators: (value, key, origin) -> converted value ---------------------------------


def _table(value: Any, key: str, origin: _Origin) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise origin.error(key, "must be a table", value)
    return value


def _known_keys(
    table: dict[str, Any], allowed: tuple[str, ...], prefix: str, origin: _Origin
) -> None:
    for name in table:
        if name not in allowed:
            key = f"{prefix}.{name}" if prefix else name
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"did you mean {close[0]}?" if close else "expected: " + ", ".join(allowed)
            raise origin.error(key, f"is not a known key ({hint})")


def _text(value: Any, key: str, origin: _Origin) -> str:
    if not isinstance(value, str) or not value.strip():
        raise origin.error(key, "must be a non-empty string", value)
    return value.strip()


def _int_text(value: Any, key: str, origin: _Origin, what: str) -> str:
    """A string, or a TOML integer converted exactly (never through float)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise origin.error(key, f"must be {what}", value)


MAX_INT = 10**12  # costs and limits: far above any real value, far below a 64-bit column


def _positive_int(value: Any, key: str, origin: _Origin) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_INT:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_INT:
        raise origin.error(key, f"must be a positive integer of at most {MAX_INT}", value)
    raise origin.error(key, "must be a positive integer", value)


MAX_SLOTS = 1000  # RunningHub's enterprise default is 50 concurrent tasks


def _slot_limit(value: Any, key: str, origin: _Origin) -> int:
    limit = _positive_int(value, key, origin)
    if limit > MAX_SLOTS:
        raise origin.error(key, f"must be at most {MAX_SLOTS}", value)
    return limit


def _duration(value: Any, key: str, origin: _Origin) -> timedelta:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a bare number means seconds, as parse_duration reads it
    if not isinstance(value, str):
        raise origin.error(key, 'must be a duration such as "90s", "10m" or "1h"', value)
    try:
        return parse_duration(value)
    except ValueError:
        raise origin.error(key, 'must be a duration such as "90s", "10m" or "1h"', value) from None


def _provider_name(value: Any, key: str, origin: _Origin) -> str:
    if value not in PROVIDERS:
        raise origin.error(key, f"must be one of: {', '.join(PROVIDERS)}", value)
    return str(value)


def _http_url(value: Any, key: str, origin: _Origin) -> str:
    text = _text(value, key, origin)
    if not re.match(r"https?://[^/\s]+", text) or any(c.isspace() for c in text):
        raise origin.error(key, "must be an http:// or https:// URL", value)
    return text


def _base_url(value: Any, key: str, origin: _Origin) -> str:
    return _http_url(value, key, origin).rstrip("/")


def _secret(value: Any, key: str, origin: _Origin) -> str:
    # Never echo a secret back, even a malformed one.
    if not isinstance(value, str) or not value.strip():
        raise origin.error(key, "must be a non-empty string")
    value = value.strip()
    if not _KEY_CHARS.fullmatch(value):
        # It goes into an HTTP header and a JSON body: an HTTP library would quote it back in
        # its error, so refuse it here, where the message can stay silent about the value.
        raise origin.error(key, "may hold only letters, digits and . _ ~ + / = -")
    return value


def _public_url(value: Any, key: str, origin: _Origin) -> str:
    text = _http_url(value, key, origin).rstrip("/")
    parts = urlsplit(text)
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise origin.error(key, "must be a plain http(s) URL: no user, query or fragment", value)
    return text


def _token(value: Any, key: str, origin: _Origin) -> str:
    # A secret: never echoed, even a malformed one. It goes into a URL path, so URL-safe only.
    if not isinstance(value, str) or not value.strip():
        raise origin.error(key, "must be a non-empty string")
    value = value.strip()
    if not _TOKEN_CHARS.fullmatch(value):
        raise origin.error(key, "may hold only letters, digits, _ and - (try: python3 -c "
                                "'import secrets; print(secrets.token_urlsafe(32))')")
    if not MIN_TOKEN_LENGTH <= len(value) <= 256:
        raise origin.error(key, f"must be {MIN_TOKEN_LENGTH} to 256 characters long (try: python3 -c "
                                "'import secrets; print(secrets.token_urlsafe(32))')")
    return value


def _timeout(value: Any, key: str, origin: _Origin) -> float:
    if (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    ):
        return float(value)
    raise origin.error(key, "must be a number of seconds > 0", value)


def _database_url(value: Any, key: str, origin: _Origin) -> str:
    return _normalise_database_url(_text(value, key, origin), origin)


_VALIDATORS: dict[str, Callable[[Any, str, _Origin], Any]] = {
    "database.url": _database_url,
    "queue.max_concurrent": _slot_limit,
    "queue.stale_after": _duration,
    "provider.name": _provider_name,
    "provider.base_url": _base_url,
    "provider.webhook_url": _http_url,
    "provider.api_key": _secret,
    "provider.timeout": _timeout,
    "webhook.public_url": _public_url,
    "webhook.token": _token,
    "doctor.queue_age_warning": _duration,
    "doctor.queue_age_critical": _duration,
    "doctor.queue_depth_warning": _positive_int,
    "doctor.queue_depth_critical": _positive_int,
}


# --- database URLs ---------------------------------------------------------------------------


def _normalise_database_url(url: str, origin: _Origin) -> str:
    """postgres:// and postgresql:// -> postgresql+psycopg://; relative SQLite paths from a config
    file resolve against its directory (cron runs from $HOME and must find the same file)."""
    key = "database.url"
    lowered = url.lower()
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if lowered.startswith(prefix):
            try:
                urlsplit(url).port  # noqa: B018 - parsing it is the check
            except ValueError:
                raise origin.error(key, "has an invalid port", mask_url(url)) from None
            return "postgresql+psycopg://" + url[len(prefix) :]
    if lowered == "sqlite://":
        return "sqlite://"  # SQLAlchemy's in-memory database
    if lowered.startswith("sqlite:///"):
        rest = url[len("sqlite:///") :]
        target, question, query = rest.partition("?")
        if not target:
            raise origin.error(key, "needs a file path after sqlite:///", mask_url(url))
        if target != ":memory:" and not target.startswith("file:"):
            path = Path(target).expanduser()
            if not path.is_absolute() and origin.base is not None:
                path = origin.base / path
            target = str(path)
        return f"sqlite:///{target}{question}{query}"
    raise origin.error(
        key, "must start with sqlite:/// or postgresql+psycopg:// (or postgres://)", mask_url(url)
    )


def default_database_url(env: Mapping[str, str] | None = None) -> str:
    """sqlite:///$XDG_DATA_HOME/aiqueue/aiqueue.db (default ~/.local/share/aiqueue/aiqueue.db)."""
    env = os.environ if env is None else env
    data_home = _xdg_dir(env, "XDG_DATA_HOME", ".local/share")
    return f"sqlite:///{data_home / 'aiqueue' / 'aiqueue.db'}"


_LOOSE_USERINFO = re.compile(r"(?P<head>[^\s:/?#@]+):[^\s@/]+@")
_LOOSE_SECRET_PARAM = re.compile(r"(?P<name>[A-Za-z_]*(?:token|secret|key|pass|sig|auth)[A-Za-z_]*)=[^&#\s]*",
                                 re.IGNORECASE)


def _mask_anything(text: str) -> str:
    """mask_url for text that may not even parse as a URL."""
    text = _LOOSE_USERINFO.sub(rf"\g<head>:{MASK}@", text)
    return _LOOSE_SECRET_PARAM.sub(rf"\g<name>={MASK}", text)


def mask_url(url: str) -> str:
    """Hide a password in the user info and secret-looking query values (token=, key=...)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo = _USERINFO.match(rest)
    if userinfo:
        after_colon = rest[userinfo.end("user") + 1 :]
        if not re.fullmatch(r"\d+", re.split(r"[/?#]", after_colon, maxsplit=1)[0]):  # not a port
            rest = f"{userinfo['user']}:{MASK}@{rest[userinfo.end() :]}"
    before_query, question, query = rest.partition("?")
    if question:
        query, hash_sign, fragment = query.partition("#")
        pairs = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            pairs.append(f"{name}={MASK}" if eq and _SECRET_PARAM.search(name) else item)
        query = "&".join(pairs) + hash_sign + fragment
    return f"{scheme}://{before_query}{question}{query}"


# --- finding and reading the file ------------------------------------------------------------


def _xdg_dir(env: Mapping[str, str], name: str, fallback: str) -> Path:
    value = env.get(name, "")
    if value and os.path.isabs(value):  # the XDG spec says to ignore relative paths
        return Path(value)
    home = env.get("HOME") or str(Path.home())
    return Path(home) / fallback


def _absolute(path: str | os.PathLike[str]) -> Path:
    # abspath, not resolve(): a symlinked config keeps relative paths next to the link.
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def find_config(
    config_path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Path | None:
    """--config, else $AIQUEUE_CONFIG, else ./aiqueue.toml, else
    $XDG_CONFIG_HOME/aiqueue/config.toml, else None. A file named explicitly must exist."""
    env = os.environ if env is None else env
    named = [(config_path, "--config"), (env.get(ENV_CONFIG) or None, f"environment {ENV_CONFIG}")]
    for candidate, label in named:
        if candidate is not None and os.fspath(candidate) != "":
            path = _absolute(candidate)
            if not path.exists():
                raise ConfigError(f"{label}: config file {path} does not exist", path=str(path))
            if not path.is_file():
                raise ConfigError(f"{label}: config file {path} is not a file", path=str(path))
            return path
    for path in (
        Path.cwd() / "aiqueue.toml",
        _xdg_dir(env, "XDG_CONFIG_HOME", ".config") / "aiqueue" / "config.toml",
    ):
        if path.is_file():
            return path
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already says "(at line N, column M)".
        raise ConfigError(f"config {path}: invalid TOML: {exc}", path=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path}: not UTF-8 text ({exc.reason})", path=str(path)) from exc
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read: {exc.strerror}", path=str(path)) from exc


# --- the file's contents ---------------------------------------------------------------------


def _parse_file(
    data: dict[str, Any], origin: _Origin
) -> tuple[dict[str, Any], dict[str, ToolSpec] | None]:
    _known_keys(data, _SECTIONS, "", origin)
    values: dict[str, Any] = {}
    for section in ("database", "queue", "provider", "doctor", "webhook"):
        if section not in data:
            continue
        table = _table(data[section], section, origin)
        allowed = tuple(k.split(".", 1)[1] for k in _FIELDS if k.startswith(section + "."))
        _known_keys(table, allowed, section, origin)
        for name, value in table.items():
            key = f"{section}.{name}"
            values[key] = _VALIDATORS[key](value, key, origin)
    _check_thresholds(values, origin)
    tools = None
    if "tools" in data:
        tools = {
            name: _tool(name, spec, origin)
            for name, spec in _table(data["tools"], "tools", origin).items()
        }
    return values, tools


def _check_thresholds(values: dict[str, Any], origin: _Origin) -> None:
    """A doctor's warning level must not lie above its critical level (defaults fill the gaps)."""
    defaults = Settings(database_url="")
    for what in ("queue_age", "queue_depth"):
        warning, critical = f"doctor.{what}_warning", f"doctor.{what}_critical"
        if warning not in values and critical not in values:
            continue
        low = values.get(warning, getattr(defaults, f"{what}_warning"))
        high = values.get(critical, getattr(defaults, f"{what}_critical"))
        if low > high:
            shown = [f"{v.total_seconds():g}s" if isinstance(v, timedelta) else str(v) for v in (low, high)]
            if warning in values:
                raise origin.error(warning, f"must not exceed {critical} ({shown[0]} > {shown[1]})")
            raise origin.error(critical, f"must not be below {warning} ({shown[1]} < {shown[0]})")


def _tool(name: str, spec: Any, origin: _Origin) -> ToolSpec:
    prefix = f"tools.{name}"
    if not _NAME.fullmatch(name):
        raise origin.error(prefix, "is not a valid tool name (use letters, digits, _ and -)")
    table = _table(spec, prefix, origin)
    _known_keys(table, _TOOL_KEYS, prefix, origin)
    for required in ("webapp_id", "cost"):
        if required not in table:
            raise origin.error(f"{prefix}.{required}", "is required")
    key = f"{prefix}.webapp_id"
    webapp_id = _int_text(table["webapp_id"], key, origin, "a string of digits")
    if not webapp_id.isdigit() or not webapp_id.isascii():
        raise origin.error(key, "must be a string of digits", table["webapp_id"])
    cost = _positive_int(table["cost"], f"{prefix}.cost", origin)
    inputs = {
        input_name: _input(input_name, value, f"{prefix}.inputs", origin)
        for input_name, value in _table(table.get("inputs", {}), f"{prefix}.inputs", origin).items()
    }
    return ToolSpec(name=name, webapp_id=webapp_id, cost=cost, inputs=MappingProxyType(inputs))


def _input(name: str, spec: Any, parent: str, origin: _Origin) -> InputSpec:
    prefix = f"{parent}.{name}"
    if not _NAME.fullmatch(name):
        raise origin.error(prefix, "is not a valid input name (use letters, digits, _ and -)")
    table = _table(spec, prefix, origin)
    _known_keys(table, _INPUT_KEYS, prefix, origin)
    for required in ("node_id", "field"):
        if required not in table:
            raise origin.error(f"{prefix}.{required}", "is required")
    node_id = _int_text(table["node_id"], f"{prefix}.node_id", origin, "a non-empty string")
    input_field = _text(table["field"], f"{prefix}.field", origin)
    default = None
    if "default" in table:
        default = _default_text(table["default"], f"{prefix}.default", origin)
    return InputSpec(name=name, node_id=node_id, field=input_field, default=default)


def _default_text(value: Any, key: str, origin: _Origin) -> str:
    # Inputs travel to RunningHub as strings; booleans spelled as TOML/JSON spell them.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    raise origin.error(key, "must be a string, number or boolean", value)


# --- the public entry points -----------------------------------------------------------------


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    db_url: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """One frozen Settings from flags (`config_path`, `db_url`), environment, file and defaults."""
    env = os.environ if env is None else env
    path = find_config(config_path, env)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    tools: dict[str, ToolSpec] | None = None

    if path is not None:
        origin = _Origin(label=f"config {path}", source="file", base=path.parent, path=path)
        values, tools = _parse_file(_read(path), origin)
        sources = dict.fromkeys(values, "file")
        private = [key for key in ("provider.api_key", "webhook.token") if key in values]
        if private:
            _check_private(path, env, private[0])

    # Environment: empty variables count as unset, as shells make them easy to leave behind.
    for key, variable in (
        ("database.url", ENV_DATABASE_URL),
        ("queue.max_concurrent", ENV_MAX_CONCURRENT),
        ("provider.api_key", ENV_API_KEY),
        ("webhook.token", ENV_WEBHOOK_TOKEN),
    ):
        raw = env.get(variable, "")
        if raw.strip():
            origin = _Origin(label=f"environment {variable}", source="env")
            value: Any = int(raw) if key == "queue.max_concurrent" and _is_int(raw) else raw
            values[key] = _VALIDATORS[key](value, key, origin)
            sources[key] = "env"

    if db_url is not None:
        values["database.url"] = _database_url(db_url, "database.url", _Origin("--db", "flag"))
        sources["database.url"] = "flag"

    _check_webhook(values, sources, path)
    if "database.url" not in values:
        values["database.url"] = default_database_url(env)
    for key in _FIELDS:
        sources.setdefault(key, "default")
    sources["tools"] = "file" if tools is not None else "default"

    return Settings(
        **{_FIELDS[key]: value for key, value in values.items()},
        tools=MappingProxyType(tools or {}),
        config_path=path,
        sources=MappingProxyType({key: sources[key] for key in (*_FIELDS, "tools")}),
    )


def _check_webhook(values: dict[str, Any], sources: dict[str, str], path: Path | None) -> None:
    """webhook.public_url needs the token it builds URLs with, and replaces provider.webhook_url
    (two places saying where RunningHub posts would leave one of them silently unused)."""
    where = f"config {path}" if path else "settings"
    if "webhook.public_url" in values and "webhook.token" not in values:
        raise ConfigError(f"{where}: webhook.public_url is set but webhook.token is not "
                          f"(set it in [webhook] or {ENV_WEBHOOK_TOKEN})", key="webhook.token")
    if "webhook.public_url" in values and "provider.webhook_url" in values:
        raise ConfigError(f"{where}: set webhook.public_url or provider.webhook_url, not both "
                          "(public_url builds each submit's URL with the token and the job id)",
                          key="provider.webhook_url")


def _check_private(path: Path, env: Mapping[str, str], key: str = "provider.api_key") -> None:
    """A file holding the API key or the webhook token must not be readable by group or others
    (as ssh and libpq insist for their keys), unless AIQUEUE_ALLOW_INSECURE_CONFIG=1 says so."""
    if os.name != "posix" or env.get(ENV_ALLOW_INSECURE, "").strip() == "1":
        return
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(
            f"config {path} holds {key} but is readable by others (mode {mode:04o}): "
            f"run `chmod 600 {path}`, move the secret to "
            f"{ENV_API_KEY if key == 'provider.api_key' else ENV_WEBHOOK_TOKEN}, "
            f"or set {ENV_ALLOW_INSECURE}=1",
            path=str(path), key=key,
        )


def _is_int(text: str) -> bool:
    return text.strip().lstrip("+-").isdigit()


def redacted(settings: Settings) -> dict[str, Any]:
    """A JSON-able view for `config show`: secrets become "***", durations are seconds."""
    return {
        "config_path": str(settings.config_path) if settings.config_path else None,
        "database_url": mask_url(settings.database_url),
        "max_concurrent": settings.max_concurrent,
        "stale_after_seconds": settings.stale_after.total_seconds(),
        "provider_name": settings.provider_name,
        "base_url": settings.base_url,
        "webhook_url": _mask_token(settings, mask_url(settings.webhook_url)) if settings.webhook_url else None,
        "api_key": MASK if settings.api_key else None,
        "webhook": {
            "public_url": settings.webhook_public_url,
            "token": MASK if settings.webhook_token else None,
            "submit_url": _mask_token(settings, settings.submit_webhook_url(0) or "").replace("job=0", "job=ID")
            or None,
        },
        "request_timeout": settings.request_timeout,
        "doctor": {
            "queue_age_warning_seconds": settings.queue_age_warning.total_seconds(),
            "queue_age_critical_seconds": settings.queue_age_critical.total_seconds(),
            "queue_depth_warning": settings.queue_depth_warning,
            "queue_depth_critical": settings.queue_depth_critical,
        },
        "tools": {name: tool.to_dict() for name, tool in settings.tools.items()},
        "sources": dict(settings.sources),
    }


def _mask_token(settings: Settings, text: str) -> str:
    return text.replace(settings.webhook_token, MASK) if settings.webhook_token else text


def save_config(path: str | os.PathLike[str], data: dict[str, Any], *, force: bool = False) -> Path:
    """Write `data` as TOML, readable by its owner only (0600 from the moment it exists)."""
    import tomli_w  # only the commands that write config pay for it

    target = _absolute(path)
    text = tomli_w.dumps(data).encode("utf-8")  # before touching the disk: bad data, no file
    exists = ConflictError(  # a conflict with what is on disk, not an invalid config
        f"config {target}: already exists (use --force to overwrite)", path=str(target)
    )
    if target.exists() and not force:
        raise exists
    target.parent.mkdir(parents=True, exist_ok=True)
    if not force:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # created since the check above
            raise exists from None
        try:
            _write_all(fd, text, target)
        except ConfigError:
            target.unlink(missing_ok=True)  # ours: we created it a moment ago
            raise
        return target
    # Overwrite through a private temporary file and an atomic rename, so a crash never leaves a
    # half-written config and the old file's (maybe wider) mode does not survive.
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, text, temporary)
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()
    return target


def _write_all(fd: int, data: bytes, path: Path) -> None:
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot write: {exc.strerror}", path=str(path)) from exc

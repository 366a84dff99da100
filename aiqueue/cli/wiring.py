"""The one place that builds concrete objects (store, provider, manager) from Settings.

Heavy imports (sqlmodel/SQLAlchemy through the store, httpx through the provider) happen inside
these functions, so `aiqueue --help` and argument errors never pay for them, and a command that
never talks to RunningHub never imports httpx.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from aiqueue.errors import ConfigError
from aiqueue.settings import Settings, load_settings

if TYPE_CHECKING:
    import httpx

    from aiqueue.manager import QueueManager
    from aiqueue.provider.runninghub import RunningHubClient

# Every secret this process has loaded, so the CLI's catch point can mask them in messages and
# --debug tracebacks that come from libraries (which may quote a DSN or a header).
SECRETS: set[str] = set()

MISSING_API_KEY = "provider.api_key is not set: export RUNNINGHUB_API_KEY or set it in the config"


class LazyRunningHub:
    """A provider factory: builds the RunningHub client on first use and closes what it built.

    The manager calls it only on the paths that reach the provider, so a missing API key is an
    error for `enqueue` or `process-next`, never for `status` or `credits balance`.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._http: httpx.Client | None = None
        self._client: RunningHubClient | None = None

    def __call__(self) -> RunningHubClient:
        if self._client is None:
            if not self._settings.api_key:
                raise ConfigError(MISSING_API_KEY, key="provider.api_key")
            import httpx

            from aiqueue.provider.runninghub import RunningHubClient

            timeout = self._settings.request_timeout
            # A plain-HTTP base URL (a rehearsal against the fake) has no TLS to verify: skip
            # building the certificate store (20-50 ms of every command that submits). https://
            # (RunningHub itself) always verifies; the client follows no redirects.
            tls = self._settings.base_url.lower().startswith("https://")
            self._http = httpx.Client(timeout=timeout, verify=True if tls else False)
            self._client = RunningHubClient(
                self._settings.base_url, self._settings.api_key, http=self._http, timeout=timeout,
                secrets=[self._settings.webhook_token] if self._settings.webhook_token else [],
            )
        return self._client

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        self._http = self._client = None


def build_manager(
    config: str | os.PathLike[str] | None = None, db: str | None = None
) -> QueueManager:
    """A QueueManager over Settings loaded from flags, environment and the config file."""
    settings = load_settings(config, db)
    return manager_for(settings, LazyRunningHub(settings))


def manager_for(settings: Settings, provider: LazyRunningHub, *, long_lived: bool = False) -> QueueManager:
    """long_lived (`webhook serve`, `status --watch`): the store checks a pooled connection before
    each use, so one a failover or a restart closed is replaced instead of failing the next request.
    One-shot commands open a fresh pool per process and do not pay that round trip."""
    from urllib.parse import unquote, urlsplit

    from aiqueue.manager import QueueManager
    from aiqueue.store import Store

    if settings.api_key:
        SECRETS.add(settings.api_key)
    if settings.webhook_token:
        SECRETS.add(settings.webhook_token)
    password = urlsplit(settings.database_url).password
    if password:
        SECRETS.update({password, unquote(password)})

    return QueueManager(Store(settings.database_url, pre_ping=long_lived), settings, provider=provider)


@contextmanager
def managed(
    config: str | os.PathLike[str] | None = None, db: str | None = None, *, long_lived: bool = False
) -> Iterator[QueueManager]:
    """build_manager, then dispose of the engine and the HTTP client when the command is done."""
    settings = load_settings(config, db)
    provider = LazyRunningHub(settings)
    manager = manager_for(settings, provider, long_lived=long_lived)
    try:
        yield manager
    finally:
        provider.close()
        manager.store.dispose()


def scrub(text: str) -> str:
    """Mask every secret this process has loaded (a message shown while it keeps running)."""
    for secret in sorted(filter(None, SECRETS), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text

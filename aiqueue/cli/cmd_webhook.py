"""Commands: webhook serve (see common.py for the shared options and helpers)."""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from aiqueue.cli import render
from aiqueue.cli.common import JsonOpt, app, manager_of, options_of
from aiqueue.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from rich.console import Console

webhook_app = typer.Typer(help="The webhook receiver RunningHub posts each task's result to.",
                          no_args_is_help=True)
app.add_typer(webhook_app, name="webhook")

HostOpt = Annotated[str, typer.Option("--host", metavar="HOST",
                                      help="Address to listen on (a reverse proxy in front: keep 127.0.0.1).")]
ServePortOpt = Annotated[int, typer.Option("--port", metavar="N", min=0, max=65535, help="0 picks a free port.")]


@dataclass(frozen=True)
class Listening:
    """`webhook serve`'s start-up line."""

    url: str
    host: str
    port: int
    path: str  # the route with the token masked
    public_url: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"listening": self.url, "host": self.host, "port": self.port, "path": self.path,
                "public_url": self.public_url}


def render_listening(console: Console, info: Listening) -> None:
    console.print(info.url, soft_wrap=True)  # stdout holds only the address, for scripts
    render.note(f"receiving RunningHub webhooks: POST {info.path}[?job=ID]; Ctrl-C or SIGTERM to stop")


@webhook_app.command("serve")
def serve(
    ctx: typer.Context, host: HostOpt = "127.0.0.1", port: ServePortOpt = 8787, as_json: JsonOpt = False
) -> None:
    """Receive RunningHub's webhooks over HTTP and apply them as `finish --webhook` does.

    Needs webhook.token (or AIQUEUE_WEBHOOK_TOKEN) and, for submits to send its URL, webhook.public_url.

    RunningHub then posts to {public_url}/runninghub/webhook/{token}?job=ID.

    One log line per request on stderr; SIGTERM or Ctrl-C stops it cleanly (exit 0).

    Example: AIQUEUE_WEBHOOK_TOKEN=... aiqueue webhook serve --host 127.0.0.1 --port 8787
    """
    from urllib.parse import urlsplit

    from aiqueue.receiver import WebhookReceiver
    from aiqueue.settings import ENV_WEBHOOK_TOKEN, WEBHOOK_ROUTE

    manager = manager_of(ctx, long_lived=True)  # pooled connections checked before use
    settings = manager.settings
    if not settings.webhook_token:
        raise ConfigError(f"webhook.token is not set: set it in [webhook] or export {ENV_WEBHOOK_TOKEN}",
                          key="webhook.token")
    manager.status(limit=1)  # the database answers and has the schema, before we listen
    prefix = urlsplit(settings.webhook_public_url).path if settings.webhook_public_url else ""
    try:
        receiver = WebhookReceiver(manager, settings.webhook_token, host=host, port=port, prefix=prefix,
                                   log=_log)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", host=host, port=port) from None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        receiver.start()
        info = Listening(url=receiver.base_url, host=receiver.host, port=receiver.port,
                         path=f"{prefix}{WEBHOOK_ROUTE}***", public_url=settings.webhook_public_url)
        render.show(as_json or options_of(ctx).json, info, render_listening)
        if not settings.webhook_public_url:
            render.note("warning: webhook.public_url is not set: submits do not send this receiver's URL")
        if not settings.api_key:
            render.note("warning: no RunningHub API key: webhooks are applied, freed slots are not filled here")
        while not stop.wait(0.5):
            pass
    finally:
        receiver.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _log("webhook receiver stopped")


def _log(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()

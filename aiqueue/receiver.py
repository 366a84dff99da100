"""The webhook receiver: a small HTTP server that applies RunningHub's TASK_END POSTs through
QueueManager.finish_webhook (the same path as `aiqueue finish --webhook FILE`).

Standard library (http.server.ThreadingHTTPServer): the job is one POST route with a tiny body,
so a framework would add a dependency and an import cost for nothing, and the fake RunningHub
already runs on the same server. What the standard server lacks is added here: a body cap checked
on Content-Length before anything is read, chunked bodies read under the same cap, a read timeout
per connection, a cap on concurrent connections, a lingering close (so a client still sending a
refused body reads our answer instead of a reset), and log lines that never hold the path.

RunningHub signs nothing, so the URL carries a secret: POST {prefix}/runninghub/webhook/{token}
(?job=ID). The token is compared in constant time; a wrong token or path is a plain 404 that
does not say which part was wrong. Status codes: 200 for every well-formed body (applied,
duplicate or unknown task: RunningHub must stop retrying), 400 malformed, 404 unauthenticated,
405 other methods, 408 too slow, 411 no length, 413 above webhooks.MAX_BODY_BYTES, 503 when the
database cannot be used (RunningHub retries). The slots a webhook frees are filled by one
background thread, after the answer is sent: submits to RunningHub never delay an answer.

This module sits at the manager's level: it never prints (lines go to the `log` callable) and
imports neither typer nor rich.
"""

from __future__ import annotations

import hmac
import json
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import parse_qs, urlsplit

from aiqueue.errors import (
    AiqueueError,
    ConflictError,
    DatabaseError,
    InvalidWebhookError,
)
from aiqueue.settings import WEBHOOK_ROUTE
from aiqueue.webhooks import MAX_BODY_BYTES

if TYPE_CHECKING:
    from aiqueue.domain import FinishResult
    from aiqueue.manager import QueueManager

READ_TIMEOUT = 10.0  # seconds a client may take per read: a slow one cannot hold a thread for ever
MAX_CONNECTIONS = 64  # handled at once; beyond that a connection gets 503 at once
DB_WORKERS = 4  # webhooks applied at once: below the engine's pool (5), so no pool timeouts
LINGER_SECONDS = 2.0  # after refusing an unread body, read and drop what the client still sends
LINGER_BYTES = 4 * MAX_BODY_BYTES
MAX_CHUNK_LINE = 1024
MAX_TRAILERS = 32

Log = Callable[[str], None]


class _Refuse(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class WebhookReceiver:
    """Serve until shutdown(): `with WebhookReceiver(...) as r: r.serve_forever()`, or start() in
    a thread (tests). One manager is shared by every handler thread: the store gives each
    transaction its own pooled connection."""

    def __init__(
        self,
        manager: QueueManager,
        token: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        prefix: str = "",
        log: Log | None = None,
        fill: bool = True,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        if not token:
            raise ValueError("a webhook token is required")
        self.manager = manager
        self._token = token.encode("ascii")
        self._prefixes = tuple(dict.fromkeys(("", prefix.rstrip("/"))))
        self._log = log or (lambda line: None)
        self.read_timeout = read_timeout
        self._db = threading.BoundedSemaphore(DB_WORKERS)
        self._filler = _Filler(manager, self._log) if fill else None
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), _Handler)
        self._server.receiver = self
        self._thread: threading.Thread | None = None
        self._serving = False

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def path_for(self, job_id: int | None = None) -> str:
        """The path RunningHub posts to (holds the token: for tests and the caller's own use)."""
        path = f"{WEBHOOK_ROUTE}{self._token.decode('ascii')}"
        return path if job_id is None else f"{path}?job={job_id}"

    def serve_forever(self) -> None:
        self._serving = True
        if self._filler is not None:
            self._filler.start()
        self._server.serve_forever(poll_interval=0.2)

    def start(self) -> Self:
        self._serving = True  # before the thread runs: a shutdown() right after must wait for it
        self._thread = threading.Thread(target=self.serve_forever, name="aiqueue-webhook", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop accepting, finish the requests in flight and the fill under way, close."""
        if self._serving:
            self._server.shutdown()  # returns once serve_forever's loop has stopped
        self.close()

    def close(self) -> None:
        self._server.server_close()  # joins the handler threads still running
        if self._filler is not None:
            self._filler.stop()
        if self._thread is not None:
            self._thread.join(timeout=READ_TIMEOUT)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- what a request means (called from handler threads) --------------------------------

    def authorise(self, target: str) -> int | None:
        """The job hint of an authenticated request target, None without one. Raises _Refuse
        404 for any other path or token (without saying which), 400 for a bad job parameter."""
        parts = urlsplit(target)
        path = parts.path
        authorised = False
        for prefix in self._prefixes:
            route = f"{prefix}{WEBHOOK_ROUTE}"
            if path.startswith(route):
                given = path[len(route):].encode("utf-8", "surrogateescape")
                authorised = hmac.compare_digest(given, self._token) or authorised
        if not authorised or parts.scheme or parts.netloc:
            raise _Refuse(404, "not found")
        try:
            query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False, max_num_fields=8)
        except ValueError:
            raise _Refuse(400, "too many query parameters") from None
        values = query.get("job")
        if values is None:
            return None
        text = values[0]
        if len(values) != 1 or not (text.isascii() and text.isdigit()) or not 1 <= int(text) < 2**63:
            raise _Refuse(400, "job must be one positive integer job id")
        return int(text)

    def apply(self, body: bytes, job_hint: int | None) -> FinishResult:
        if not self._db.acquire(timeout=READ_TIMEOUT):
            raise _Refuse(503, "busy: try again")
        try:
            result = self.manager.finish_webhook(body, job_hint, fill=False)
        finally:
            self._db.release()
        if result.changed and self._filler is not None:
            self._filler.wake()
        return result

    def log(self, line: str) -> None:
        self._log(line.replace(self._token.decode("ascii"), "***"))


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for the requests in flight
    block_on_close = True
    request_queue_size = 128
    receiver: WebhookReceiver

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._active = 0
        self._active_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            full = self._active >= MAX_CONNECTIONS
            if not full:
                self._active += 1
        if full:
            self.receiver.log(_line(client_address[0], "-", "-", 503, 0.0, "too many connections"))
            _overloaded(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active -= 1


class _Server6(_Server):
    address_family = socket.AF_INET6


def _overloaded(request: socket.socket) -> None:
    try:
        request.settimeout(1.0)
        request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 5\r\n"
                        b"Connection: close\r\n\r\n")
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "aiqueue-webhook"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # a broken request line still gets a status line back
    timeout = READ_TIMEOUT

    def setup(self) -> None:
        self.timeout = self.server.receiver.read_timeout  # StreamRequestHandler sets it on the socket
        self._expects_continue = False
        super().setup()

    def handle_expect_100(self) -> bool:
        # http.server would say "100 Continue" before we look at the token and the length: say it
        # only once both are accepted (in _read_body), so a refused client never sends its body.
        self._expects_continue = True
        return True

    def do_POST(self) -> None:
        started = time.monotonic()
        receiver = self.server.receiver
        body_read = False
        options: dict[str, Any] = {}
        try:
            job_hint = receiver.authorise(self.path)
            body = self._read_body()
            body_read = True
            result = receiver.apply(body, job_hint)
        except _Refuse as refusal:
            status, note, payload = refusal.status, refusal.message, {"error": refusal.message}
            options["linger"] = not body_read
        except InvalidWebhookError as exc:
            status, note, payload = 400, exc.message, {"error": exc.message}
        except (DatabaseError, ConflictError) as exc:
            # The provider retries a 5xx: the database may be back, the race over.
            status, note, payload = 503, f"{exc.slug}: {exc.message}", {"error": "temporarily unavailable: try again"}
            options["retry_after"] = 30
        except AiqueueError as exc:
            status, note, payload = 500, f"{exc.slug}: {exc.message}", {"error": "internal error"}
        except TimeoutError:
            status, note, payload = 408, "client too slow", {"error": "request timeout"}
            options["linger"] = True
        except Exception as exc:  # noqa: BLE001 - one line in the log, never a traceback to the client
            status, note, payload = 500, f"unexpected {type(exc).__name__}", {"error": "internal error"}
        else:
            status, note = 200, _describe(result)
            payload = {"ok": True, "changed": result.changed, "job_id": None if result.job is None else result.job.id}
        # Logged before the answer goes out: whoever has the answer finds the line written.
        receiver.log(_line(self.client_address[0], "POST", _shown_path(self.path), status,
                           time.monotonic() - started, note))
        self._answer(status, payload, **options)

    def __getattr__(self, name: str) -> Any:
        # Every other method (GET, PUT, HEAD, or any token) gets 405, whatever the path.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self.server.receiver.log(_line(self.client_address[0], _safe(self.command, 16), _shown_path(self.path),
                                       405, 0.0, "method not allowed"))
        self._answer(405, {"error": "only POST"}, linger=True, allow="POST", head=self.command == "HEAD")

    # --- the body -----------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        encodings = self.headers.get_all("Transfer-Encoding") or []
        lengths = self.headers.get_all("Content-Length") or []
        if encodings:
            if lengths:  # both: a smuggling attempt or a broken proxy; refuse, never guess
                raise _Refuse(400, "both Content-Length and Transfer-Encoding")
            codings = [c.strip().lower() for c in ",".join(encodings).split(",") if c.strip()]
            if codings != ["chunked"]:
                raise _Refuse(400, "unsupported Transfer-Encoding (only chunked)")
            self._continue()
            return self._read_chunked()
        if not lengths:
            raise _Refuse(411, "Content-Length required")
        values = {v.strip() for v in lengths}
        text = values.pop()
        if values or not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise _Refuse(400, "invalid Content-Length")
        length = int(text)
        if length > MAX_BODY_BYTES:
            raise _Refuse(413, f"body above {MAX_BODY_BYTES} bytes")
        self._continue()
        body = self.rfile.read(length)
        if len(body) != length:
            raise _Refuse(400, "body shorter than Content-Length")
        return body

    def _continue(self) -> None:
        if self._expects_continue:
            self._expects_continue = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            line = self.rfile.readline(MAX_CHUNK_LINE)
            if not line.endswith(b"\n"):
                raise _Refuse(400, "malformed chunk")
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 8 or size_text.strip(b"0123456789abcdefABCDEF"):
                raise _Refuse(400, "malformed chunk size")
            size = int(size_text, 16)
            if size == 0:
                break
            if len(body) + size > MAX_BODY_BYTES:
                raise _Refuse(413, f"body above {MAX_BODY_BYTES} bytes")
            chunk = self.rfile.read(size)
            if len(chunk) != size or self.rfile.read(2) not in (b"\r\n",):
                raise _Refuse(400, "malformed chunk")
            body += chunk
        for _ in range(MAX_TRAILERS):
            if self.rfile.readline(MAX_CHUNK_LINE) in (b"\r\n", b"\n", b""):
                return bytes(body)
        raise _Refuse(400, "too many trailers")

    # --- the answer ---------------------------------------------------------------------------

    def _answer(self, status: int, payload: dict[str, Any], *, linger: bool = False, allow: str | None = None,
                retry_after: int | None = None, head: bool = False) -> None:
        data = (json.dumps(payload) + "\n").encode("utf-8")
        try:
            self.send_response_only(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            if allow:
                self.send_header("Allow", allow)
            if retry_after:
                self.send_header("Retry-After", str(retry_after))
            self.end_headers()
            if not head:
                self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            pass  # the client left: nothing to tell it
        self.close_connection = True
        if linger:
            self._linger()

    def _linger(self) -> None:
        """Half-close, then drop what the client still sends (bounded), so that it reads our
        answer rather than a connection reset caused by its unread body."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_SECONDS
            seen = 0
            while seen < LINGER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.connection.settimeout(left)
                data = self.connection.recv(65536)
                if not data:
                    break
                seen += len(data)
        except OSError:
            pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own errors (bad request line, headers too long): a fixed answer that
        # never echoes the request line, which holds the token.
        self.server.receiver.log(_line(self.client_address[0], "-", "-", code, 0.0, "unreadable request"))
        self._answer(code, {"error": "bad request" if code < 500 else "error"})

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the stock lines hold the request line, and with it the token; ours are in do_POST


def _shown_path(target: str) -> str:
    """A request path safe to log: the route, never the token or a client's made-up path."""
    path = urlsplit(target).path
    if WEBHOOK_ROUTE in path:
        return path[: path.index(WEBHOOK_ROUTE) + len(WEBHOOK_ROUTE)] + "***"
    return "(other path)"


def _describe(result: FinishResult) -> str:
    if result.job is None:
        return result.message or "no job"
    text = f"job {result.job.id} {result.job.status}"
    if result.refunded:
        text += f", refunded {result.refunded}"
    if not result.changed:
        text += " (nothing changed)"
    return text


def _line(client: str, method: str, path: str, status: int, seconds: float, note: str) -> str:
    at = datetime.now(UTC).isoformat(timespec="seconds")
    return f"{at} {client} {method} {_safe(path, 200)} {status} {seconds * 1000:.0f}ms {_safe(note, 300)}"


def _safe(text: str, limit: int) -> str:
    """One printable line (a client chooses the method and the path)."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Filler:
    """Starts the next jobs after webhooks freed slots: one background thread, woken per change,
    so bursts of webhooks give one fill at a time and no answer waits for RunningHub."""

    def __init__(self, manager: QueueManager, log: Log) -> None:
        self._manager = manager
        self._log = log
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="aiqueue-webhook-fill", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._stopping:
                return
            self._wake.clear()
            try:
                result = self._manager.process_next()
            except AiqueueError as exc:
                self._log(f"{_now()} fill failed: {exc.slug}: {_safe(exc.message, 300)}")
                continue
            except Exception as exc:  # noqa: BLE001 - keep serving; say what broke
                self._log(f"{_now()} fill failed: unexpected {type(exc).__name__}")
                continue
            done = {name: len(getattr(result, name)) for name in ("started", "requeued", "failed", "unknown",
                                                                   "expired")}
            if any(done.values()) or result.halted:
                counts = ", ".join(f"{n} {name}" for name, n in done.items() if n)
                halted = f"; queue halted: {_safe(result.halted, 200)}" if result.halted else ""
                self._log(f"{_now()} fill: {counts or 'nothing started'}{halted}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

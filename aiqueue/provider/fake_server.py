"""A fake RunningHub server (standard library only) for tests, the demo and rehearsals.

It answers with the documented shapes of /work/shared/runninghub/API.md: HTTP 200 with a
`{code, msg, data}` envelope on v1, the flat object on v2, and 19-digit task ids as JSON strings.
Any Host header is accepted. The key may come in the body (`apiKey`; `apikey` on accountStatus)
or as `Authorization: Bearer`; when the fake was given `api_key`, a wrong or missing key gets
`802 APIKEY_UNAUTHORIZED` (every key presented must match).

Endpoints: v1 `/task/openapi/ai-app/run`, `/task/openapi/create`, `/task/openapi/status`,
`/task/openapi/outputs`, `/task/openapi/cancel`, `/uc/openapi/accountStatus`; v2
`/openapi/v2/run/ai-app/{webappId}`, `/openapi/v2/run/workflow/{workflowId}`, `/openapi/v2/query`.

Choices where the docs are silent:
* An unknown path, or a method other than POST on an API path, gets HTTP 200 with
  `{"code": 412, "msg": "TOKEN_INVALID", "data": null}` (API.md: 412 in practice means a wrongly
  spelled path). A body that is not a JSON object gets `301 PARAMS_INVALID`.
* Cancel answers `code 0` for any known task and turns a QUEUED/RUNNING one into CANCEL (v1 status
  then says FAILED, outputs give 805 with "task was cancelled"); an unknown task gets 807. No
  webhook is sent for a cancel.
* "hang" and "drop" create no task. A v2-created task gets a v2-shaped webhook (eventData object);
  a v1 task gets the v1 body (eventData a JSON string).

Control it from Python (`script_submits`, `set_default_submit`, `finish_task`, `set_running`,
`tasks`, `requests`, `deliveries`, `reset`) or over HTTP from another process:
  POST /__fake__/script   {"submits": [...], "default": "..."}
  POST /__fake__/finish   {"taskId", "success", "error", "outputs", "deliver"} -> {"webhook": "...", "delivery": ...}
  POST /__fake__/running  {"taskId"}
  GET  /__fake__/tasks | /__fake__/requests | /__fake__/deliveries
  POST /__fake__/reset
Admin errors are HTTP 400 (bad value) or 404 (unknown task or endpoint) with `{"error": "..."}`.

Submit behaviours: accept, busy (421), busy415, reject:<code>, delay:<seconds>, hang (60 s or until
stop, then the socket closes), drop (socket closed without an answer), http500, html; and two where
the task IS created: lost (then the socket closes unanswered) and late:<seconds> (the answer comes
only after that long, so the task can finish and its webhook arrive first).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

from aiqueue.provider.codes import CODES

SUBMIT_BEHAVIOURS = ("accept", "busy", "busy415", "hang", "drop", "http500", "html", "lost")
HANG_SECONDS = 60.0
MAX_REQUEST_BYTES = 8 * 1024 * 1024
DELIVERY_TIMEOUT = 5.0
REMAIN_COINS = "1200"

_V2_RUN_PREFIXES = {"/openapi/v2/run/ai-app/": "v2-ai-app", "/openapi/v2/run/workflow/": "v2-workflow"}
_HTML_PAGE = (
    "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


def check_behaviour(behaviour: str) -> str:
    """Validate one submit behaviour; raises ValueError naming the problem."""
    name, _, argument = behaviour.partition(":") if isinstance(behaviour, str) else ("", "", "")
    if name in SUBMIT_BEHAVIOURS and not argument:
        return behaviour
    if name == "reject" and argument.isdigit() and int(argument) != 0:
        return behaviour
    if name in ("delay", "late"):
        try:
            seconds = float(argument)
        except ValueError:
            seconds = -1.0
        if 0 <= seconds <= HANG_SECONDS:
            return behaviour
    raise ValueError(
        f"unknown submit behaviour {behaviour!r}; expected one of {', '.join(SUBMIT_BEHAVIOURS)}, "
        "reject:<code>, delay:<seconds>, late:<seconds>"
    )


@dataclass
class FakeTask:
    task_id: str
    api: str  # "ai-app", "workflow", "v2-ai-app" or "v2-workflow"
    webapp_id: str | None
    workflow_id: str | None
    node_info_list: list[Any]
    webhook_url: str | None
    status: str = "QUEUED"  # QUEUED, RUNNING, SUCCESS, FAILED, CANCEL
    cancelled: bool = False
    outputs: list[str] = field(default_factory=list)
    failed_reason: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    drop: bool = False  # close the socket without answering


class FakeRunningHub:
    """A RunningHub look-alike on 127.0.0.1. Use as a context manager or start()/stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Time-based first id, so a restarted fake does not reuse ids a database still holds.
        self._next_id = 1_990_000_000_000_000_000 + (time.time_ns() // 1_000_000 % 10**12) * 1000
        self._tasks: dict[str, FakeTask] = {}
        self._requests: list[dict[str, Any]] = []
        self._deliveries: list[dict[str, Any]] = []
        self._script: deque[str] = deque()
        self._default_submit = "accept"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = ThreadingHTTPServer((self.host, self.port), _Handler)
        server.daemon_threads = True
        server.fake = self  # type: ignore[attr-defined]
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-runninghub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; hanging and delayed answers end now (their sockets close unanswered)."""
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def wait(self) -> None:
        """Block until stop() is called (from a signal handler or another thread)."""
        self._stopping.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    # -- control ---------------------------------------------------------------------------

    def script_submits(self, behaviours: list[str]) -> None:
        """Behaviours used one per submit (any run endpoint), in order; then the default applies."""
        checked = [check_behaviour(b) for b in behaviours]
        with self._lock:
            self._script = deque(checked)

    def set_default_submit(self, behaviour: str) -> None:
        checked = check_behaviour(behaviour)
        with self._lock:
            self._default_submit = checked

    def set_running(self, task_id: str) -> None:
        with self._lock:
            self._task(task_id).status = "RUNNING"

    def finish_task(
        self,
        task_id: str,
        success: bool = True,
        outputs: list[str] | None = None,
        error: str | None = None,
        node_id: str = "31",
        node_name: str = "KSampler",
        exception_type: str = "RuntimeError",
        deliver: bool = True,
    ) -> bytes:
        """End a task and return its TASK_END webhook body; POST it to the task's webhookUrl if asked."""
        with self._lock:
            task = self._task(task_id)
            if success:
                task.status = "SUCCESS"
                task.outputs = list(outputs) if outputs else [_default_output(task_id)]
                task.failed_reason = None
            else:
                task.status = "FAILED"
                task.failed_reason = _failed_reason(
                    node_id, node_name, exception_type, error or "CUDA out of memory"
                )
            body = _webhook_body(task)
            url = task.webhook_url
        if deliver and url:
            self._deliver(task_id, url, body)
        return body

    @property
    def tasks(self) -> dict[str, FakeTask]:
        with self._lock:
            return dict(self._tasks)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """API calls received (not admin calls): method, path, host, body (key masked), key_in, authorized."""
        with self._lock:
            return list(self._requests)

    @property
    def deliveries(self) -> list[dict[str, Any]]:
        """Webhook POSTs attempted: task_id, url, status (HTTP status or None), error."""
        with self._lock:
            return list(self._deliveries)

    def reset(self) -> None:
        with self._lock:
            self._tasks.clear()
            self._requests.clear()
            self._deliveries.clear()
            self._script.clear()
            self._default_submit = "accept"

    # -- request handling (called from handler threads) ------------------------------------

    def _dispatch(self, method: str, raw_path: str, headers: dict[str, str], raw: bytes) -> _Reply:
        path = urlsplit(raw_path).path
        if path.startswith("/__fake__/"):
            return self._admin(method, path, raw)
        body = _parse_json(raw)
        bearer = _bearer(headers.get("authorization", ""))
        key_field = "apikey" if path == "/uc/openapi/accountStatus" else "apiKey"
        authorized = self._authorized(body, bearer, key_field)
        self._record(method, path, headers, body, raw, bearer, key_field, authorized)

        v2_api = next((api for prefix, api in _V2_RUN_PREFIXES.items() if path.startswith(prefix)), None)
        v2 = v2_api is not None or path == "/openapi/v2/query"
        if method != "POST" or not (v2 or path in _V1_ROUTES):
            return _envelope(412)
        if not isinstance(body, dict):
            return _v2_error(301) if v2 else _envelope(301)
        if not authorized:
            return _v2_error(802) if v2 else _envelope(802)
        if v2_api is not None:
            return self._run(body, v2_api, path.rsplit("/", 1)[1])
        if path == "/openapi/v2/query":
            return self._v2_query(body)
        return _V1_ROUTES[path](self, body)

    def _authorized(self, body: Any, bearer: str | None, key_field: str) -> bool:
        if self.api_key is None:
            return True
        presented = [bearer] if bearer is not None else []
        if isinstance(body, dict):
            presented += [str(body[k]) for k in {key_field, "apiKey"} if k in body]
        return bool(presented) and all(key == self.api_key for key in presented)

    def _record(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: Any,
        raw: bytes,
        bearer: str | None,
        key_field: str,
        authorized: bool,
    ) -> None:
        key_in = []
        shown: Any = body
        if isinstance(body, dict):
            shown = {k: ("***" if k in ("apiKey", "apikey") else v) for k, v in body.items()}
            if key_field in body or "apiKey" in body:
                key_in.append("body")
        elif body is None and raw:
            text = raw[:200].decode("utf-8", "replace")
            for secret in (self.api_key, bearer):
                text = text.replace(secret, "***") if secret else text
            shown = {"raw": text}
        if bearer is not None:
            key_in.append("bearer")
        entry = {
            "method": method,
            "path": path,
            "host": headers.get("host"),
            "body": shown,
            "key_in": key_in,
            "authorized": authorized,
        }
        with self._lock:
            self._requests.append(entry)

    def _run(self, body: dict[str, Any], api: str, path_id: str | None = None) -> _Reply:
        v2 = api.startswith("v2")
        behaviour = self._next_behaviour()
        name, _, argument = behaviour.partition(":")
        if name == "busy":
            return _v2_error(421) if v2 else _envelope(421)
        if name == "busy415":
            return _v2_error(415) if v2 else _envelope(415)
        if name == "reject":
            return _v2_error(int(argument)) if v2 else _envelope(int(argument))
        if name == "http500":
            return _Reply(500, b"<html><body><h1>500 Internal Server Error</h1></body></html>", "text/html")
        if name == "html":
            return _Reply(200, _HTML_PAGE.encode(), "text/html")
        if name in ("hang", "drop"):
            if name == "hang":
                self._stopping.wait(HANG_SECONDS)
            return _Reply(drop=True)
        if name == "delay" and self._stopping.wait(float(argument)):
            return _Reply(drop=True)

        problem = _check_run_body(body, api, path_id)
        if problem is not None:
            return _v2_error(problem) if v2 else _envelope(problem)
        app_id = path_id if v2 else str(body.get("webappId" if api == "ai-app" else "workflowId"))
        webhook = body.get("webhookUrl")
        with self._lock:
            task_id = str(self._next_id)
            self._next_id += 1
            self._tasks[task_id] = FakeTask(
                task_id=task_id,
                api=api,
                webapp_id=app_id if api.endswith("ai-app") else None,
                workflow_id=app_id if api.endswith("workflow") else None,
                node_info_list=list(body.get("nodeInfoList") or []),
                webhook_url=webhook if isinstance(webhook, str) and webhook else None,
            )
        # The task exists from here on: "lost" drops the answer (an unknown outcome for the client),
        # "late" answers only after a while (a webhook may arrive before the answer does).
        if name == "lost":
            return _Reply(drop=True)
        if name == "late" and self._stopping.wait(float(argument)):
            return _Reply(drop=True)
        tips = json.dumps({"result": True, "error": None, "outputs_to_execute": ["9"], "node_errors": {}})
        client_id = uuid.uuid4().hex
        if v2:
            return _json(
                {
                    "taskId": task_id,
                    "status": "QUEUED",
                    "errorCode": "",
                    "errorMessage": "",
                    "results": None,
                    "clientId": client_id,
                    "promptTips": tips,
                }
            )
        data = {
            "netWssUrl": None,
            "taskId": task_id,
            "clientId": client_id,
            "taskStatus": "QUEUED",
            "promptTips": tips,
        }
        return _envelope(0, data)

    def _status(self, body: dict[str, Any]) -> _Reply:
        with self._lock:
            task = self._tasks.get(str(body.get("taskId")))
            if task is None:
                return _envelope(807)
            return _envelope(0, "FAILED" if task.status == "CANCEL" else task.status)

    def _outputs(self, body: dict[str, Any]) -> _Reply:
        with self._lock:
            task = self._tasks.get(str(body.get("taskId")))
            if task is None:
                return _envelope(807)
            return _json(_outputs_envelope(task, webhook=False))

    def _cancel(self, body: dict[str, Any]) -> _Reply:
        with self._lock:
            task = self._tasks.get(str(body.get("taskId")))
            if task is None:
                return _envelope(807)
            if task.status in ("QUEUED", "RUNNING"):
                task.status = "CANCEL"
                task.cancelled = True
                task.failed_reason = _failed_reason("", "", "Cancelled", "task was cancelled")
            return _envelope(0)

    def _account_status(self, body: dict[str, Any]) -> _Reply:
        with self._lock:
            active = sum(1 for t in self._tasks.values() if t.status in ("QUEUED", "RUNNING"))
        data = {
            "remainCoins": REMAIN_COINS,
            "currentTaskCounts": str(active),
            "remainMoney": None,
            "currency": None,
            "apiType": "NORMAL",
        }
        return _envelope(0, data)

    def _v2_query(self, body: dict[str, Any]) -> _Reply:
        task_id = str(body.get("taskId") or "")
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return _v2_error(807, task_id)
            return _json(_query_result(task))

    def _next_behaviour(self) -> str:
        with self._lock:
            return self._script.popleft() if self._script else self._default_submit

    def _task(self, task_id: str) -> FakeTask:
        task = self._tasks.get(str(task_id))
        if task is None:
            raise KeyError(f"unknown task {task_id}")
        return task

    def _deliver(self, task_id: str, url: str, body: bytes) -> dict[str, Any]:
        record: dict[str, Any] = {"task_id": task_id, "url": url, "status": None, "error": None}
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=DELIVERY_TIMEOUT) as response:
                record["status"] = response.status
        except urllib.error.HTTPError as exc:
            record["status"] = exc.code
            record["error"] = f"HTTP {exc.code} {exc.reason}"
        except (OSError, ValueError) as exc:
            record["error"] = str(exc) or type(exc).__name__
        with self._lock:
            self._deliveries.append(record)
        return record

    # -- admin over HTTP -------------------------------------------------------------------

    def _admin(self, method: str, path: str, raw: bytes) -> _Reply:
        name = path[len("/__fake__/") :].rstrip("/")
        if method == "GET" and name in ("tasks", "requests", "deliveries"):
            if name == "tasks":
                return _json({"tasks": {k: t.to_dict() for k, t in self.tasks.items()}})
            return _json({name: getattr(self, name)})
        if method != "POST" or name not in ("script", "finish", "running", "reset"):
            return _json({"error": f"unknown admin endpoint {method} {path}"}, 404)
        body = _parse_json(raw) if raw.strip() else {}
        if not isinstance(body, dict):
            return _json({"error": "admin body must be a JSON object"}, 400)
        try:
            if name == "reset":
                self.reset()
                return _json({"ok": True})
            if name == "script":
                if "submits" in body:
                    if not isinstance(body["submits"], list):
                        raise ValueError("submits must be a list of behaviours")
                    self.script_submits(body["submits"])
                if "default" in body:
                    self.set_default_submit(body["default"])
                with self._lock:
                    return _json({"ok": True, "submits": list(self._script), "default": self._default_submit})
            task_id = body.get("taskId")
            if not isinstance(task_id, (str, int)) or isinstance(task_id, bool) or not str(task_id):
                raise ValueError("taskId is required")
            if name == "running":
                self.set_running(str(task_id))
                return _json({"ok": True})
            outputs = body.get("outputs")
            if outputs is not None and not (
                isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)
            ):
                raise ValueError("outputs must be a list of URLs")
            before = len(self.deliveries)
            webhook = self.finish_task(
                str(task_id),
                success=bool(body.get("success", True)),
                outputs=outputs,
                error=None if body.get("error") is None else str(body["error"]),
                node_id=str(body.get("nodeId", "31")),
                node_name=str(body.get("nodeName", "KSampler")),
                exception_type=str(body.get("exceptionType", "RuntimeError")),
                deliver=bool(body.get("deliver", True)),
            )
            after = self.deliveries
            delivery = after[-1] if len(after) > before else None
            return _json({"webhook": webhook.decode("utf-8"), "delivery": delivery})
        except KeyError as exc:
            return _json({"error": str(exc.args[0]) if exc.args else "unknown task"}, 404)
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)


_V1_ROUTES: dict[str, Callable[[FakeRunningHub, dict[str, Any]], _Reply]] = {
    "/task/openapi/ai-app/run": lambda fake, body: fake._run(body, "ai-app"),
    "/task/openapi/create": lambda fake, body: fake._run(body, "workflow"),
    "/task/openapi/status": FakeRunningHub._status,
    "/task/openapi/outputs": FakeRunningHub._outputs,
    "/task/openapi/cancel": FakeRunningHub._cancel,
    "/uc/openapi/accountStatus": FakeRunningHub._account_status,
}


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeRunningHub/1.0"

    def do_POST(self) -> None:
        self._serve("POST")

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        fake: FakeRunningHub = self.server.fake  # type: ignore[attr-defined]
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REQUEST_BYTES:
            self._send(_json({"error": "bad Content-Length"}, 400))
            return
        raw = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            reply = fake._dispatch(method, self.path, headers, raw)
        except Exception as exc:  # noqa: BLE001 -- a bug in the fake: answer visibly, never hang the client
            reply = _json({"error": f"fake server error: {type(exc).__name__}: {exc}"}, 500)
        if reply.drop:
            self.close_connection = True
            return
        self._send(reply)

    def _send(self, reply: _Reply) -> None:
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except OSError:
            pass  # the client gave up (e.g. it timed out on a delay)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests and the CLI own the terminal


def serve_forever_cli(port: int, api_key: str | None = None) -> FakeRunningHub:
    """Start a fake on 127.0.0.1:port and return it; the caller prints base_url and calls wait()."""
    return FakeRunningHub(port=port, api_key=api_key).start()


# -- answer builders ---------------------------------------------------------------------


def _identifier(code: int) -> str:
    identifier, meaning = CODES.get(code, (None, "error"))
    return identifier or meaning


def _json(payload: Any, status: int = 200) -> _Reply:
    return _Reply(status, json.dumps(payload).encode("utf-8"))


def _envelope(code: int, data: Any = None) -> _Reply:
    return _json({"code": code, "msg": "success" if code == 0 else _identifier(code), "data": data})


def _v2_error(code: int, task_id: str = "") -> _Reply:
    return _json(
        {
            "taskId": task_id,
            "status": "",
            "errorCode": str(code),
            "errorMessage": _identifier(code),
            "results": None,
            "clientId": "",
            "promptTips": "",
        }
    )


def _check_run_body(body: dict[str, Any], api: str, path_id: str | None) -> int | None:
    """The business code a bad run request gets, or None when it is fine."""
    app_id = path_id if path_id is not None else body.get("webappId" if api == "ai-app" else "workflowId")
    if isinstance(app_id, bool) or not isinstance(app_id, (str, int)) or not str(app_id).isdigit():
        return 301
    nodes = body.get("nodeInfoList")
    if nodes is None:
        return 301 if api.endswith("ai-app") else None
    if not isinstance(nodes, list):
        return 803
    for node in nodes:
        if not isinstance(node, dict) or not {"nodeId", "fieldName", "fieldValue"} <= node.keys():
            return 803
    webhook = body.get("webhookUrl")
    if webhook is not None and not isinstance(webhook, str):
        return 301
    return None


def _failed_reason(node_id: str, node_name: str, exception_type: str, message: str) -> dict[str, Any]:
    traceback = [
        '  File "/comfyui/execution.py", line 151, in recursive_execute\n',
        f"{exception_type}: {message}\n",
    ]
    return {
        "node_id": node_id,
        "node_name": node_name,
        "exception_type": exception_type,
        "exception_message": message,
        "traceback": json.dumps(traceback),
        "current_inputs": "{}",
        "current_outputs": "{}",
    }


def _default_output(task_id: str) -> str:
    return f"https://cdn.example.com/fake/output/ComfyUI_{task_id}_00001_.png"


def _file_type(url: str) -> str:
    tail = urlsplit(url).path.rsplit("/", 1)[-1]
    return tail.rsplit(".", 1)[-1].lower() if "." in tail else "png"


def _outputs_envelope(task: FakeTask, *, webhook: bool) -> dict[str, Any]:
    """What /task/openapi/outputs answers; `webhook` picks the webhook sample's item fields."""
    if task.status == "QUEUED":
        return {"code": 813, "msg": "APIKEY_TASK_IS_QUEUED", "data": None}
    if task.status == "RUNNING":
        return {"code": 804, "msg": "APIKEY_TASK_IS_RUNNING", "data": None}
    if task.status in ("FAILED", "CANCEL"):
        return {"code": 805, "msg": "APIKEY_TASK_STATUS_ERROR", "data": {"failedReason": task.failed_reason}}
    items: list[dict[str, Any]] = []
    for url in task.outputs:
        item: dict[str, Any] = {"fileUrl": url, "fileType": _file_type(url)}
        if webhook:  # 08-webhook-success.json: taskCostTime is a number
            item.update({"taskCostTime": 42, "nodeId": "9"})
        else:  # 07-outputs-success.json: numbers as strings, money fields present
            item.update(
                {
                    "taskCostTime": "42",
                    "nodeId": "9",
                    "thirdPartyConsumeMoney": None,
                    "consumeMoney": None,
                    "consumeCoins": "9",
                }
            )
        items.append(item)
    return {"code": 0, "msg": "success", "data": items}


def _query_result(task: FakeTask) -> dict[str, Any]:
    finished = task.status in ("SUCCESS", "FAILED", "CANCEL")
    results = (
        [{"url": url, "outputType": _file_type(url), "text": None} for url in task.outputs]
        if task.status == "SUCCESS"
        else None
    )
    return {
        "taskId": task.task_id,
        "status": task.status,
        "errorCode": "",
        "errorMessage": "",
        "failedReason": task.failed_reason or {},
        "usage": {
            "consumeMoney": None,
            "consumeCoins": "12" if finished else None,
            "taskCostTime": "41" if finished else None,
            "thirdPartyConsumeMoney": None,
        },
        "results": results,
        "clientId": "",
        "promptTips": "",
    }


def _webhook_body(task: FakeTask) -> bytes:
    """The TASK_END body: v1 carries the outputs envelope as a JSON string, v2 the query object."""
    if task.api.startswith("v2"):
        event_data: Any = _query_result(task)
    else:
        event_data = json.dumps(_outputs_envelope(task, webhook=True), separators=(",", ":"))
    return json.dumps({"event": "TASK_END", "taskId": task.task_id, "eventData": event_data}).encode("utf-8")


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _bearer(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None

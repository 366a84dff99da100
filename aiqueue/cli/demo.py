"""`aiqueue demo`: a realistic session through the real code paths.

A real SQLite file, the fake RunningHub server on 127.0.0.1 reached over real HTTP, real webhook
bodies fed to the same finish path as `aiqueue finish --webhook`, and the same renderer as the
commands. Nothing here decides a rule: every step is one QueueManager call.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiqueue.cli import render
from aiqueue.errors import AiqueueError

DEMO_TOOLS = """
[tools.upscale_image]
webapp_id = "1990000000000000011"
cost = 5
[tools.upscale_image.inputs.image]
node_id = "12"
field = "image"
[tools.upscale_image.inputs.scale]
node_id = "15"
field = "value"
default = "2"

[tools.upscale_video]
webapp_id = "1990000000000000012"
cost = 20
[tools.upscale_video.inputs.video]
node_id = "8"
field = "video"

[tools.remove_background]
webapp_id = "1990000000000000013"
cost = 3
[tools.remove_background.inputs.image]
node_id = "4"
field = "image"

[tools.portrait_enhance]
webapp_id = "1990000000000000014"
cost = 8
[tools.portrait_enhance.inputs.image]
node_id = "21"
field = "image"
[tools.portrait_enhance.inputs.strength]
node_id = "22"
field = "value"
default = "0.6"
"""

DEMO_KEY = "demo-key-not-a-secret-0123456789"


def run_demo(directory: Path | None, as_json: bool) -> dict[str, Any]:
    """Run the whole session; returns the final state (what --json prints)."""
    from aiqueue.cli.wiring import managed
    from aiqueue.provider.fake_server import FakeRunningHub

    workdir = Path(tempfile.mkdtemp(prefix="aiqueue-demo-")) if directory is None else directory
    workdir.mkdir(parents=True, exist_ok=True)
    db_path = workdir / "demo.db"
    for leftover in workdir.glob("demo.db*"):
        leftover.unlink()
    console = None if as_json else render.stdout_console()

    def say(text: str) -> None:
        if console is not None:
            console.print()
            console.rule(text, align="left")

    def show(fn: Callable[..., None], *args: Any) -> None:
        if console is not None:
            fn(console, *args)

    def attempt(action: Callable[[], Any], what: str) -> None:
        try:
            action()
        except AiqueueError as err:  # the refusals are part of the show
            if console is not None:
                console.print(f"refused ({what}): {err.message}  [exit code {err.exit_code}]")

    hub = FakeRunningHub(api_key=DEMO_KEY).start()
    try:
        config = workdir / "demo.toml"
        config.write_text(
            f'[database]\nurl = "sqlite:///{db_path}"\n\n[queue]\nmax_concurrent = 3\nstale_after = "10m"\n\n'
            f'[provider]\nname = "runninghub"\nbase_url = "{hub.base_url}"\napi_key = "{DEMO_KEY}"\n'
            f'timeout = 5\n{DEMO_TOOLS}',
            encoding="utf-8",
        )
        config.chmod(0o600)
        with managed(config) as manager:
            say(f"1. a fresh SQLite queue in {db_path}; the fake RunningHub listens on {hub.base_url}")
            manager.init_db()
            for user, amount in [("alice", 50), ("bob", 50), ("carol", 50), ("dave", 50),
                                 ("erin", 50), ("gina", 50), ("frank", 10)]:
                manager.grant(user, amount, "demo top-up")
            show(render.render_ledger, manager.ledger(), "Credits granted")

            say("2. seven people enqueue jobs across four tools; only 3 slots exist")
            jobs = {}
            for user, tool, inputs in [
                ("alice", "upscale_image", {"image": "api/cat.png", "scale": "4"}),
                ("bob", "upscale_video", {"video": "api/wedding.mp4"}),
                ("carol", "remove_background", {"image": "api/product.jpg"}),
                ("dave", "portrait_enhance", {"image": "api/dave.jpg"}),
                ("erin", "upscale_image", {"image": "api/map.png"}),
                ("gina", "remove_background", {"image": "api/shoe.jpg"}),
            ]:
                jobs[user] = manager.enqueue(user, tool, inputs).job
            attempt(lambda: manager.enqueue("frank", "upscale_video", {"video": "api/f.mp4"}),
                    "frank has 10 credits, the video upscaler costs 20")
            attempt(lambda: manager.enqueue("alice", "remove_background", {"image": "api/x.png"}),
                    "alice already has a job in flight")
            show(render.render_status, manager.status())

            say("3. alice's upscale succeeds; RunningHub delivers the webhook twice")
            hub.script_submits(["busy"])  # the provider is full when the freed slot is refilled
            body = hub.finish_task(_task(manager, jobs["alice"]), deliver=False)
            first = manager.finish_webhook(body)
            show(render.render_finish, first)
            show(render.render_finish, manager.finish_webhook(body))
            say("   the provider answered 421 TASK_QUEUE_MAXED for dave: he keeps position 1; process-next retries")
            show(render.render_process, manager.process_next())

            say("4. bob's video fails at the provider: the real error is stored and bob is refunded")
            body = hub.finish_task(_task(manager, jobs["bob"]), success=False,
                                   error="CUDA out of memory. Tried to allocate 2.00 GiB",
                                   node_id="31", node_name="KSampler", deliver=False)
            show(render.render_finish, manager.finish_webhook(body))

            say("5. gina cancels her queued job: refunded at once")
            show(render.render_finish, manager.cancel(jobs["gina"].id, reason="changed her mind"))
            show(render.render_status, manager.status())

            say("6. dave and erin finish; carol's job is stuck at the provider")
            hub.set_running(_task(manager, jobs["carol"]))
            for user in ("dave", "erin"):
                manager.finish_webhook(hub.finish_task(_task(manager, jobs[user]), deliver=False))
            time.sleep(1.2)
            say("   cleanup --older-than 1s (cron uses the 10m default): asks RunningHub, cancels, refunds")
            show(render.render_cleanup, manager.cleanup(timedelta(seconds=1)))

            say("7. the end: every job is terminal, the ledger adds up")
            status = manager.status()
            ledger = manager.ledger()
            audit = manager.refund_audit()
            show(render.render_status, status)
            show(render.render_ledger, ledger, "Credit ledger")
            show(render.render_job_detail, manager.job_detail(jobs["bob"].id))
            show(render.render_audit, audit)
            balances = {u: manager.balance(u).balance for u in
                        ("alice", "bob", "carol", "dave", "erin", "gina", "frank")}
            if console is not None:
                console.print("balances: " + ", ".join(f"{u} {b}" for u, b in balances.items()))
                console.print(f"files kept in {workdir}" if directory else "")
            return {
                "database": str(db_path) if directory is not None else None,  # else deleted below
                "status": status.to_dict(),
                "ledger": [e.to_dict() for e in ledger],
                "balances": balances,
                "audit": audit.to_dict(),
                "jobs": [manager.job_detail(j.id).job.to_dict() for j in jobs.values()],
            }
    finally:
        hub.stop()
        if directory is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _task(manager: Any, job: Any) -> str:
    task = manager.job_detail(job.id).job.provider_task_id
    assert task is not None, f"job {job.id} has no provider task"
    return str(task)

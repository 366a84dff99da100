"""A cancel never refunds a task RunningHub may still be running and billing (found by a new-user
trial: a cancel with RunningHub unreachable refunded the job and freed its slot while the task ran
on, so a 4th task could start). On SQLite and PostgreSQL:

- RunningHub unreachable: the cancel is refused (ProviderError, exit 7), the job keeps its slot,
  nothing is refunded; `--force` ends it, refunded once, and its history says it was forced;
- the task had already ended at RunningHub: the job ends as the task did (completed: no refund);
- a starting job (being sent, or sent with no answer) is refused unless forced: RunningHub may be
  creating a task whose id nobody has yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aiqueue.errors import ConflictError, ProviderError
from aiqueue.provider.runninghub import RunningHubClient
from tests.cli_helpers import run_cli
from tests.conftest import API_KEY
from tests.invariants import check_invariants


def dead_provider() -> RunningHubClient:
    return RunningHubClient("http://127.0.0.1:9", API_KEY, timeout=2)


def ledger_of(manager: Any, job_id: int) -> list[tuple[str, int]]:
    return [(e.kind, e.amount) for e in manager.ledger(job_id=job_id)]


def test_unreachable_provider_refuses_the_cancel_then_force_ends_it(
    make_manager: Any, fake_hub: Any, db_url: str
) -> None:
    manager = make_manager()
    manager.grant("alice", 50)
    job = manager.enqueue("alice", "upscale_image", {"image": "a.png"}).job
    assert job.status == "running" and job.slot == 1

    cut_off = make_manager(provider=dead_provider())
    with pytest.raises(ProviderError, match="did not confirm cancelling") as refused:
        cut_off.cancel(job.id)
    assert refused.value.exit_code == 7
    kept = manager.job_detail(job.id).job
    assert (kept.status, kept.slot) == ("running", 1)
    assert ledger_of(manager, job.id) == [("charge", -5)]
    assert manager.balance("alice").balance == 45

    forced = cut_off.cancel(job.id, force=True)
    assert forced.job.status == "cancelled" and forced.refunded == 5
    assert ledger_of(manager, job.id) == [("charge", -5), ("refund", 5)]
    assert "forced: provider cancel failed" in manager.job_detail(job.id).events[-1].detail
    assert check_invariants(db_url, 3) == []


def test_the_cli_says_why_and_exits_7(make_manager: Any, fake_hub: Any, db_url: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import write_config

    manager = make_manager()
    manager.grant("bob", 50)
    job = manager.enqueue("bob", "upscale_image", {"image": "b.png"}).job
    monkeypatch.setenv("RUNNINGHUB_API_KEY", API_KEY)
    config = write_config(tmp_path / "dead.toml", "http://127.0.0.1:9")
    run = run_cli("--config", str(config), "--db", db_url, "cancel", str(job.id))
    assert run.code == 7 and run.stdout == ""
    assert "keeps its slot and stays running" in run.stderr and "--force" in run.stderr
    assert manager.job_detail(job.id).job.status == "running"
    forced = run_cli("--config", str(config), "--db", db_url, "cancel", str(job.id), "--force", "--json")
    assert forced.json()["refunded"] == 5


def test_a_task_that_already_ended_there_ends_the_job_as_it_did(make_manager: Any, fake_hub: Any, db_url: str) -> None:
    manager = make_manager()
    manager.grant("carol", 50)
    job = manager.enqueue("carol", "upscale_image", {"image": "c.png"}).job
    fake_hub.finish_task(job.provider_task_id, success=True, outputs=["https://cdn.example/c.png"], deliver=False)

    class RefusingCancel(RunningHubClient):
        def cancel(self, task_id: str) -> Any:  # RunningHub refusing to cancel a finished task
            from aiqueue.provider.base import CancelOutcome

            return CancelOutcome(ok=False, message="804 APIKEY_TASK_STATUS_ERROR")

    asker = make_manager(provider=RefusingCancel(fake_hub.base_url, API_KEY, timeout=5))
    result = asker.cancel(job.id)
    assert result.job.status == "completed" and result.refunded == 0
    assert "already completed at RunningHub" in (result.message or "")
    assert result.job.outputs == ["https://cdn.example/c.png"]
    assert ledger_of(manager, job.id) == [("charge", -5)]
    assert check_invariants(db_url, 3) == []


def test_an_unknown_submit_outcome_is_refused_unless_forced(make_manager: Any, fake_hub: Any, db_url: str) -> None:
    manager = make_manager()
    manager.grant("dave", 50)
    fake_hub.script_submits(["http500"])  # sent, then a 5xx: RunningHub may have made the task
    job = manager.enqueue("dave", "upscale_image", {"image": "d.png"}).job
    assert job.status == "starting" and "outcome unknown" in (job.error or "")

    with pytest.raises(ConflictError, match="RunningHub may be running it") as refused:
        manager.cancel(job.id)
    assert refused.value.exit_code == 5
    assert manager.job_detail(job.id).job.status == "starting"
    assert ledger_of(manager, job.id) == [("charge", -5)]

    forced = manager.cancel(job.id, force=True)
    assert forced.job.status == "cancelled" and forced.refunded == 5
    assert "forced: the job was starting" in manager.job_detail(job.id).events[-1].detail
    assert check_invariants(db_url, 3) == []


def test_a_job_being_submitted_is_refused_too(make_manager: Any, fake_hub: Any, db_url: str) -> None:
    # Found by a re-trial: a cancel while the submit was in flight refunded the job; the submit
    # then timed out (unknown outcome) and the task RunningHub had created ran on, never cancelled.
    manager = make_manager()
    manager.grant("fay", 50)
    job = manager.enqueue("fay", "upscale_image", {"image": "f.png"}, start=False).job
    claimed = manager.store.run(manager._claim)  # the claim a submitter makes before it sends
    assert claimed is not None and claimed.id == job.id and claimed.error is None
    with pytest.raises(ConflictError, match="it is being sent right now"):
        manager.cancel(job.id)
    assert manager.job_detail(job.id).job.status == "starting"
    assert ledger_of(manager, job.id) == [("charge", -5)]
    forced = manager.cancel(job.id, force=True)
    assert forced.job.status == "cancelled" and forced.refunded == 5
    assert check_invariants(db_url, 3) == []


def test_a_result_for_a_job_ended_meanwhile_says_so_and_changes_nothing(
    make_manager: Any, fake_hub: Any, db_url: str
) -> None:
    manager = make_manager()
    manager.grant("gus", 50)
    fake_hub.script_submits(["lost"])  # RunningHub creates the task; its answer is lost
    job = manager.enqueue("gus", "upscale_image", {"image": "g.png"}).job
    assert job.status == "starting" and job.provider_task_id is None
    [task_id] = list(fake_hub.tasks)
    manager.cancel(job.id, force=True)
    body = fake_hub.finish_task(task_id, success=True, deliver=False)

    result = manager.finish_webhook(body, job_hint=job.id)
    assert result.changed is False and result.job is None
    assert f"job {job.id} (named by the webhook URL) had already ended cancelled" in (result.message or "")
    assert [w.task_id for w in manager.unmatched_webhooks()] == [task_id]
    assert manager.job_detail(job.id).job.status == "cancelled"
    assert ledger_of(manager, job.id) == [("charge", -5), ("refund", 5)]
    assert check_invariants(db_url, 3) == []


def test_ctrl_c_during_the_submit_says_which_job_and_records_the_unknown_outcome(
    make_manager: Any, fake_hub: Any, config_file: Path, db_url: str
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    manager = make_manager()
    manager.grant("hal", 50)
    fake_hub.script_submits(["delay:8"])
    env = {**os.environ, "RUNNINGHUB_API_KEY": API_KEY}
    aiqueue = str(Path(sys.executable).parent / "aiqueue")
    proc = subprocess.Popen(
        [aiqueue, "--config", str(config_file), "--db", db_url, "enqueue", "--user", "hal", "--tool", "upscale_image",
         "--input", "image=h.png"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    deadline = time.monotonic() + 30
    while not fake_hub.requests and time.monotonic() < deadline:  # the submit is on its way
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and out == b""
    [job] = manager.jobs(user="hal")
    assert f"interrupted while sending job {job.id} to RunningHub" in err.decode()
    detail = manager.job_detail(job.id)
    assert detail.job.status == "starting" and "interrupted (Ctrl-C)" in (detail.job.error or "")
    assert detail.events[-1].detail == "submit outcome unknown: the submit was interrupted (Ctrl-C)"
    assert ledger_of(manager, job.id) == [("charge", -5)]
    assert check_invariants(db_url, 3) == []

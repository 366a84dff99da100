"""The README's main job: `aiqueue demo` runs the whole lifecycle and ends with a clean audit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_runs_the_full_lifecycle(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "aiqueue", "demo", "--json", "--keep", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    jobs = {job["user"]: job for job in summary["jobs"]}
    assert {u: j["status"] for u, j in jobs.items()} == {
        "alice": "completed", "bob": "failed", "carol": "failed",
        "dave": "completed", "erin": "completed", "gina": "cancelled",
    }
    assert "CUDA out of memory" in jobs["bob"]["error"] and "KSampler" in jobs["bob"]["error"]
    assert "timed out" in jobs["carol"]["error"]
    assert jobs["alice"]["outputs"] and all(isinstance(j["provider_task_id"], (str, type(None))) for j in jobs.values())
    assert summary["audit"] == {"ok": True, "problems": [], "fixed": [], "dry_run": False, "would_fix": []}
    assert summary["status"]["running"] == [] and summary["status"]["queued"] == []
    # Charged once each; refunds exactly for the failed and cancelled ones.
    assert summary["balances"] == {"alice": 45, "bob": 50, "carol": 50, "dave": 42, "erin": 45,
                                   "gina": 50, "frank": 10}
    kinds = [(e["user"], e["kind"]) for e in summary["ledger"] if e["kind"] != "grant"]
    assert sorted(u for u, k in kinds if k == "refund") == ["bob", "carol", "gina"]
    assert (tmp_path / "demo" / "demo.db").exists()


def test_demo_tables_for_people(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "aiqueue", "demo"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for heading in ("Running slots: 3/3 in use", "Queue: 3 waiting", "Credit ledger",
                    "refund audit: the ledger is clean"):
        assert heading in out
    assert "\x1b[" not in out  # not a terminal: no ANSI codes

"""config init / show / check through the real CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "XDG_CONFIG_HOME": str(cwd / "xdg"),
            "XDG_DATA_HOME": str(cwd / "data")}
    return subprocess.run([sys.executable, "-m", "aiqueue", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env={**base, **(env or {})})


def test_init_writes_a_private_starter_that_checks_clean(tmp_path: Path) -> None:
    made = cli("config", "init", "--json", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    path = Path(json.loads(made.stdout)["path"])
    assert path == tmp_path / "aiqueue.toml"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = cli("config", "init", cwd=tmp_path)
    assert again.returncode == 5 and "--force" in again.stderr and again.stdout == ""
    assert cli("config", "init", "--force", cwd=tmp_path).returncode == 0
    checked = cli("config", "check", "--json", cwd=tmp_path)
    assert checked.returncode == 0
    view = json.loads(checked.stdout)
    assert view["ok"] is True and "upscale_image" in view["tools"]


def test_show_masks_secrets_and_names_sources(tmp_path: Path) -> None:
    key, password = "sk-show-canary-12345678", "pw-show-canary"
    (tmp_path / "aiqueue.toml").write_text(
        f'[database]\nurl = "postgresql://u:{password}@127.0.0.1:5432/x"\n[queue]\nmax_concurrent = 2\n')
    shown = cli("config", "show", "--json", cwd=tmp_path, env={"RUNNINGHUB_API_KEY": key})
    assert shown.returncode == 0, shown.stderr
    assert key not in shown.stdout and password not in shown.stdout
    view = json.loads(shown.stdout)
    assert view["api_key"] == "***" and view["sources"]["provider.api_key"] == "env"
    assert view["sources"]["queue.max_concurrent"] == "file" and view["max_concurrent"] == 2
    assert view["sources"]["queue.stale_after"] == "default"
    table = cli("config", "show", cwd=tmp_path, env={"RUNNINGHUB_API_KEY": key})
    assert table.returncode == 0 and key not in table.stdout and password not in table.stdout
    assert "queue.max_concurrent" in table.stdout


def test_check_names_the_bad_key(tmp_path: Path) -> None:
    (tmp_path / "aiqueue.toml").write_text('[tools.x]\nwebapp_id = "1"\ncost = -5\n')
    checked = cli("config", "check", cwd=tmp_path)
    assert checked.returncode == 3 and "tools.x.cost" in checked.stderr and checked.stdout == ""
    assert len(checked.stderr.strip().splitlines()) == 1

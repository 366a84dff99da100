"""Shell completion: completions/ matches what the app generates; the bash script, sourced in a
real bash, completes commands, subcommands, options and the config's tool names by calling the
real `aiqueue`; the zsh and fish protocols answer too; --show-completion / --install-completion
work through main()'s catch point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aiqueue.cli import completions
from tests.cli_helpers import run_cli
from tests.conftest import write_config

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "completions"
BIN = Path(sys.executable).parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIQUEUE_", "_AIQUEUE", "_TYPER", "COMP_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HOME=str(tmp_path / "home"), **extra)
    (tmp_path / "home").mkdir(exist_ok=True)
    return env


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "aiqueue.toml", "http://127.0.0.1:9")


def test_completion_files_are_up_to_date() -> None:
    assert completions.stale(SCRIPTS) == [], "run: python -m aiqueue.cli.completions completions"
    assert sorted(p.name for p in SCRIPTS.iterdir()) == sorted(completions.FILES.values())


def test_the_generator_checks_and_writes(tmp_path: Path) -> None:
    target = tmp_path / "out"
    command = [sys.executable, "-m", "aiqueue.cli.completions"]
    check = subprocess.run([*command, "--check", str(target)], check=False, capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "aiqueue.bash is out of date" in check.stderr
    assert subprocess.run([*command, str(target)], check=False, capture_output=True, timeout=60).returncode == 0
    for name in completions.FILES.values():
        assert (target / name).read_text() == (SCRIPTS / name).read_text()
    (target / "_aiqueue").write_text("#compdef aiqueue\n# edited by hand\n")
    check = subprocess.run([*command, "--check", str(target)], check=False, capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "_aiqueue is out of date" in check.stderr and "aiqueue.bash" not in check.stderr


def _bash_complete(tmp_path: Path, words: list[str], **env: str) -> list[str]:
    """Source completions/aiqueue.bash in a real bash and press Tab after `words`."""
    line = " ".join(words)
    program = (
        f"source {SCRIPTS / 'aiqueue.bash'}\n"
        f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n"
        "_aiqueue_completion aiqueue\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], check=False, capture_output=True, text=True,
                          env=_env(tmp_path, **env), timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return [w for w in done.stdout.splitlines() if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_commands_options_and_tools(tmp_path: Path, config: Path) -> None:
    top = _bash_complete(tmp_path, ["aiqueue", "''"])
    assert {"enqueue", "status", "db", "credits", "cancel", "refund-audit"} <= set(top)
    assert _bash_complete(tmp_path, ["aiqueue", "cre"]) == ["credits"]
    assert set(_bash_complete(tmp_path, ["aiqueue", "db", "''"])) >= {"init", "upgrade", "current"}
    options = _bash_complete(tmp_path, ["aiqueue", "enqueue", "--"])
    assert {"--user", "--tool", "--input", "--json"} <= set(options)
    tools = _bash_complete(tmp_path, ["aiqueue", "enqueue", "--tool", "''"], AIQUEUE_CONFIG=str(config))
    assert tools == ["upscale_image", "upscale_video"]
    # --config given on the command line wins, and a prefix filters.
    assert _bash_complete(tmp_path, ["aiqueue", "--config", str(config), "enqueue", "--tool", "upscale_v"]) == [
        "upscale_video"]
    # A missing config completes no tool and prints no error into the shell.
    assert _bash_complete(tmp_path, ["aiqueue", "enqueue", "--tool", "''"],
                          AIQUEUE_CONFIG=str(tmp_path / "none.toml")) == []


def test_zsh_and_fish_protocols(tmp_path: Path, config: Path) -> None:
    aiqueue = str(BIN / "aiqueue")
    zsh = subprocess.run([aiqueue], check=False, capture_output=True, text=True, timeout=60, env=_env(
        tmp_path, _AIQUEUE_COMPLETE="complete_zsh", _TYPER_COMPLETE_ARGS="aiqueue enqueue --tool ",
        AIQUEUE_CONFIG=str(config)))
    assert zsh.returncode == 0 and '"upscale_image":"5 credits"' in zsh.stdout
    fish = subprocess.run([aiqueue], check=False, capture_output=True, text=True, timeout=60, env=_env(
        tmp_path, _AIQUEUE_COMPLETE="complete_fish", _TYPER_COMPLETE_FISH_ACTION="get-args",
        _TYPER_COMPLETE_ARGS="aiqueue db "))
    assert fish.returncode == 0
    assert {line.split("\t")[0] for line in fish.stdout.splitlines()} >= {"init", "upgrade", "current"}


def test_show_completion_prints_the_script_for_the_detected_shell(tmp_path: Path) -> None:
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", "aiqueue --show-completion"],
                          check=False, capture_output=True, text=True, env=_env(tmp_path), timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.strip() == completions.script("bash").replace(completions.FOOTER, "").strip()


def test_install_completion_writes_the_script_for_the_detected_shell(tmp_path: Path) -> None:
    env = _env(tmp_path)
    # Run from bash so the shell is detected as a user's would be.
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", "aiqueue --install-completion"],
                          check=False, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    installed = tmp_path / "home" / ".bash_completions" / "aiqueue.sh"
    assert "bash completion installed" in done.stdout
    assert installed.read_text().strip() == completions.script("bash").replace(completions.FOOTER, "").strip()
    assert f"source '{installed}'" in (tmp_path / "home" / ".bashrc").read_text()


def test_help_lists_the_completion_options() -> None:
    result = run_cli("--help")
    assert result.code == 0 and "--install-completion" in result.stdout and "--show-completion" in result.stdout

"""Shell completion: the scripts in completions/ and the callbacks that complete values.

The scripts are Typer's (bash, zsh, fish): each calls back into `aiqueue` with
`_AIQUEUE_COMPLETE=complete_<shell>` and the words typed so far, and the app answers with the
commands, options and values that fit, so they never go stale on new commands. They are kept
in the repository for packagers and for people who prefer a file to `--install-completion`;
regenerate them with

    python -m aiqueue.cli.completions [DIR]          # writes DIR (default ./completions)
    python -m aiqueue.cli.completions --check [DIR]  # exit 1 when a file is out of date

tests/test_completions.py fails when they differ from what the installed Typer generates.
Kept cheap to import: common.py and cmd_status.py use its callbacks, so nothing heavy is imported at
the top.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PROG = "aiqueue"
COMPLETE_VAR = "_AIQUEUE_COMPLETE"
FILES = {"bash": "aiqueue.bash", "zsh": "_aiqueue", "fish": "aiqueue.fish"}
FOOTER = "# Generated from the aiqueue app by `python -m aiqueue.cli.completions`; do not edit."


def script(shell: str) -> str:
    """The completion script for one shell, as Typer generates it for this app."""
    from typer.completion import get_completion_script

    body = get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell)
    return f"{body.rstrip()}\n{FOOTER}\n"


def complete_tool(ctx: Any, incomplete: str) -> list[tuple[str, str]]:
    """`--tool` values: the tools of the config this command would load (--config, env, ./...).
    Completion must never fail: a missing or broken config completes nothing."""
    from aiqueue.settings import load_settings

    root = ctx.find_root() if ctx is not None else None
    config = root.params.get("config") if root is not None else None
    try:
        tools = load_settings(config).tools
    except Exception:  # noqa: BLE001 - a bad config is for `config check` to report, not <Tab>
        return []
    return [(name, f"{spec.cost} credits") for name, spec in sorted(tools.items())
            if name.startswith(incomplete)]


STATUSES = ("queued", "starting", "running", "completed", "failed", "cancelled")  # domain.Status, unimported


def complete_status(ctx: Any, incomplete: str) -> list[str]:
    """`--status` values: the six statuses; after a comma, the ones not yet in the list, each
    offered as the whole word typed so far (`queued,ru` -> `queued,running`)."""
    head, _, last = incomplete.rpartition(",")
    given = {part.strip() for part in head.split(",")} if head else set()
    prefix = f"{head}," if head else ""
    return [prefix + name for name in STATUSES if name.startswith(last.strip().lower()) and name not in given]


def stale(directory: Path) -> list[str]:
    """The files under `directory` that are missing or differ from what would be generated."""
    return [name for shell, name in FILES.items()
            if not (directory / name).is_file()
            or (directory / name).read_text(encoding="utf-8") != script(shell)]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    rest = [a for a in args if a != "--check"]
    if len(rest) > 1 or any(a.startswith("-") for a in rest):
        sys.stderr.write("usage: python -m aiqueue.cli.completions [--check] [DIR]\n")
        return 2
    directory = Path(rest[0] if rest else "completions")
    if check:
        out_of_date = stale(directory)
        for name in out_of_date:
            sys.stderr.write(f"{directory / name} is out of date: run python -m aiqueue.cli.completions {directory}\n")
        return 1 if out_of_date else 0
    directory.mkdir(parents=True, exist_ok=True)
    for shell, name in FILES.items():
        (directory / name).write_text(script(shell), encoding="utf-8")
        sys.stdout.write(f"{directory / name}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

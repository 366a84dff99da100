"""Every command's --help ends with an example of that very command: walked over the whole app,
so a command added in any cmd_*.py module without one fails here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from typer.main import get_command

from aiqueue.cli.app import app
from tests.cli_helpers import run_cli


def leaves(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        yield path, command
        return
    for name, sub in sorted(subcommands.items()):
        if not getattr(sub, "hidden", False):
            yield from leaves(sub, (*path, name))


COMMANDS = dict(leaves(get_command(app)))


def test_the_walk_sees_the_whole_app() -> None:
    names = {" ".join(path) for path in COMMANDS}
    assert {"enqueue", "status", "finish", "cancel", "db init", "db upgrade", "db current", "credits grant",
            "config check", "refund-audit", "fake-runninghub", "demo"} <= names
    assert len(names) >= 20


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_help_ends_with_an_example_of_the_command(path: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    paragraphs = [p.strip() for p in (COMMANDS[path].help or "").split("\n\n") if p.strip()]
    assert paragraphs, f"aiqueue {' '.join(path)} has no help text"
    example = paragraphs[-1]
    assert example.startswith("Example: "), f"aiqueue {' '.join(path)}: the docstring must end with 'Example: ...'"
    assert "aiqueue " in example and " ".join(path) in example, (
        f"aiqueue {' '.join(path)}: the example does not show the command itself: {example!r}")
    # And it reaches the user: the rendered --help shows it.
    monkeypatch.setenv("COLUMNS", "200")
    shown = run_cli(*path, "--help")
    assert shown.code == 0 and "Example: " in shown.stdout

"""The arrows of STYLE.md: cli -> manager -> {store, provider} -> {domain, errors, clock}.
Checked on the imports in the source, so a stray import fails here rather than in review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "aiqueue"


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def files(*parts: str) -> list[Path]:
    target = PACKAGE.joinpath(*parts)
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


FORBIDDEN = [
    # (files, modules they must not import, why)
    (files("manager.py") + files("overview.py"),
     ("typer", "click", "rich", "httpx", "sqlalchemy", "sqlmodel", "aiqueue.cli"),
     "the manager (and its read side, overview.py) holds the rules: no terminal, no HTTP, no SQL"),
    (files("eta.py"), ("typer", "click", "rich", "httpx", "sqlalchemy", "sqlmodel", "aiqueue.cli", "aiqueue.store",
                       "aiqueue.provider", "aiqueue.manager"),
     "the start-time estimate is pure arithmetic over durations"),
    (files("monitor.py"), ("typer", "click", "rich", "httpx", "sqlalchemy", "sqlmodel", "aiqueue.cli"),
     "doctor and metrics sit at the manager's level: SQL in store/stats.py, HTTP in the provider, no terminal"),
    (files("store"), ("httpx", "typer", "rich", "aiqueue.manager", "aiqueue.cli", "aiqueue.provider"),
     "only the store talks SQL, and nothing else"),
    (files("provider"), ("sqlalchemy", "sqlmodel", "typer", "rich", "aiqueue.store", "aiqueue.manager", "aiqueue.cli"),
     "only the provider talks HTTP, and nothing else"),
    (files("domain.py") + files("errors.py") + files("clock.py") + files("settings.py") + files("webhooks.py"),
     ("httpx", "sqlalchemy", "sqlmodel", "typer", "rich", "aiqueue.manager", "aiqueue.store", "aiqueue.cli"),
     "leaf modules stay cheap and independent"),
    (files("bench"), ("typer", "click", "rich", "aiqueue.cli"),
     "the benchmark is glue over manager/store/provider; only cli/ talks to the terminal"),
    ([p for p in PACKAGE.rglob("*.py") if "bench" not in p.parts and p.name != "cmd_bench.py"],
     ("aiqueue.bench",), "only `aiqueue bench` (cli/cmd_bench.py) may import the benchmark"),
    (files("receiver.py"),
     ("typer", "click", "rich", "httpx", "sqlalchemy", "sqlmodel", "aiqueue.cli", "aiqueue.store", "aiqueue.provider"),
     "the webhook receiver sits at the manager's level: no terminal, no SQL, no provider client"),
]


@pytest.mark.parametrize("paths, banned, why", FORBIDDEN)
def test_import_arrows(paths: list[Path], banned: tuple[str, ...], why: str) -> None:
    assert paths, "no files matched"
    offences = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in paths
        for name in imports_of(path)
        if any(name == b or name.startswith(b + ".") for b in banned)
    ]
    assert offences == [], why

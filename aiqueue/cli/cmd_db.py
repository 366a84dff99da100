"""Commands: db (the schema): init, upgrade, current. Versioning is store/migrations.py's.

These are schema administration, like Alembic's command layer: they reach the store through the
manager's `store` rather than through a QueueManager method that would only forward the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer

from aiqueue.cli import render
from aiqueue.cli.common import JsonOpt, db_app, manager_of, show

if TYPE_CHECKING:
    from rich.console import Console


@db_app.command("init")
def db_init(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Create the newest schema on a new database, stamped at the head version (idempotent).

    An existing schema is left as it is: see `db current` and `db upgrade`.

    Example: aiqueue --db sqlite:///aiqueue.db db init
    """
    from aiqueue.settings import mask_url
    from aiqueue.store import migrations

    manager = manager_of(ctx)
    created = manager.init_db()
    answer = render.SchemaInit(created, mask_url(manager.settings.database_url))
    show(ctx, as_json, answer, render.render_db_init)
    if not created:
        state = migrations.schema_state(manager.store)
        if state.pending:
            render.note(f"note: the schema is at version {state.current}, {len(state.pending)} step(s)"
                        f" behind {state.head}: run `aiqueue db upgrade`")


@dataclass(frozen=True)
class Upgraded:
    database: str
    previous: int
    current: int
    head: int
    applied: tuple[Any, ...]  # migrations.Step

    @property
    def changed(self) -> bool:  # --quiet prints an upgrade only when it applied something
        return bool(self.applied)

    def to_dict(self) -> dict[str, Any]:
        return {"database": self.database, "previous": self.previous, "current": self.current,
                "head": self.head, "applied": [step.to_dict() for step in self.applied]}


@dataclass(frozen=True)
class Current:
    database: str
    state: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"database": self.database, **self.state}


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Apply the pending schema steps in order, each in its own transaction.

    Idempotent, and safe when several run at once (they are serialised by a lock).

    Example: aiqueue db upgrade --json
    """
    from aiqueue.settings import mask_url
    from aiqueue.store import migrations

    manager = manager_of(ctx)
    applied = migrations.upgrade(manager.store)
    state = migrations.schema_state(manager.store)
    previous = applied[0].version - 1 if applied else state.current
    result = Upgraded(mask_url(manager.settings.database_url), previous, state.current, state.head,
                      tuple(applied))
    show(ctx, as_json, result, _render_upgraded)


@db_app.command("current")
def db_current(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """The schema version of the database, the head version of this aiqueue, and the pending steps.

    Example: aiqueue db current --json
    """
    from aiqueue.settings import mask_url
    from aiqueue.store import migrations

    manager = manager_of(ctx)
    result = Current(mask_url(manager.settings.database_url), migrations.describe(manager.store))
    show(ctx, as_json, result, _render_current)


def _render_upgraded(console: Console, result: Upgraded) -> None:
    for step in result.applied:
        console.print(f"applied step {step.version}: {step.name}", soft_wrap=True)
    if result.applied:
        console.print(f"schema upgraded from version {result.previous} to {result.current}"
                      f" in {result.database}", soft_wrap=True)
    else:
        console.print(f"schema already at version {result.current} (head {result.head})"
                      f" in {result.database}", soft_wrap=True)


_STATES = {
    "current": "up to date",
    "behind": "behind: run `aiqueue db upgrade`",
    "empty": "no aiqueue schema: run `aiqueue db init`",
    "unversioned": "aiqueue tables without a version: run `aiqueue db upgrade` to adopt them",
    "ahead": "newer than this aiqueue: upgrade aiqueue",
}


def _render_current(console: Console, result: Current) -> None:
    state = result.state
    console.print(f"schema version {state['current']} of {state['head']} in {result.database}:"
                  f" {_STATES[state['state']]}", soft_wrap=True)
    for step in state["pending"]:
        console.print(f"pending step {step['version']}: {step['name']}", soft_wrap=True)

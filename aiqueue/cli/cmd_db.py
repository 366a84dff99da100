"""Commands: db (the schema)."""

from __future__ import annotations

import typer

from aiqueue.cli import render
from aiqueue.cli.common import JsonOpt, db_app, manager_of, show


@db_app.command("init")
def db_init(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Create the schema if it is missing (idempotent)."""
    from aiqueue.settings import mask_url

    manager = manager_of(ctx)
    created = manager.init_db()
    answer = render.SchemaInit(created, mask_url(manager.settings.database_url))
    show(ctx, as_json, answer, render.render_db_init)

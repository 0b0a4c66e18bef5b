"""`edgefleet db`: the schema's Alembic revision, upgrading it, checking it (docs/storage.md)."""

from __future__ import annotations

import typer

from controller.cli.common import HomeOption, JsonOption, fail
from controller.cli.render import as_json
from controller.fleet.core import default_home
from controller.storage.db import database_target, redact_url
from controller.storage.open import open_database
from controller.storage.upgrade import describe, schema_diff

db_app = typer.Typer(
    no_args_is_help=True,
    help="The fleet database's schema: its revision, upgrading it in place, checking it.",
)


@db_app.command("current")
def db_current(home: HomeOption = None, json_out: JsonOption = False) -> None:
    """The database's Alembic revision and this edgefleet's (changes nothing)."""
    target = database_target(home or default_home())
    try:
        db = open_database(target, migrate=False)
    except (ConnectionError, ValueError) as exc:
        raise fail(exc) from None
    try:
        info = describe(db.sa)
    finally:
        db.close()
    if json_out:
        typer.echo(as_json({"database": redact_url(target), **info}))
        return
    state = "current" if info["current"] else f"behind (head {info['head']})"
    if info["revision"] is None:
        state = f"not managed by Alembic yet (legacy version {info['legacy_version']})"
    typer.echo(f"{redact_url(target)}: revision {info['revision'] or '-'}, {state}")


@db_app.command("upgrade")
def db_upgrade(home: HomeOption = None) -> None:
    """Bring the schema to this edgefleet's head in place (every command does it on open)."""
    target = database_target(home or default_home())
    try:
        db = open_database(target)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise fail(exc) from None
    try:
        revision = describe(db.sa)["revision"]
    finally:
        db.close()
    typer.echo(f"{redact_url(target)}: at revision {revision} (head)")


@db_app.command("check")
def db_check(home: HomeOption = None) -> None:
    """Compare the schema with the one this edgefleet describes; exit 1 on a difference."""
    target = database_target(home or default_home())
    try:
        db = open_database(target, migrate=False)
    except (ConnectionError, ValueError) as exc:
        raise fail(exc) from None
    try:
        diff = schema_diff(db.sa)
    finally:
        db.close()
    if diff:
        for item in diff:
            typer.echo(f"differs: {item}")
        raise typer.Exit(1)
    typer.echo(f"{redact_url(target)}: the schema matches this edgefleet's")

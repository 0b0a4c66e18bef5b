"""`edgefleet db`: the schema's Alembic revision, upgrading it, checking it (docs/storage.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from controller.cli.common import HomeOption, JsonOption, fail
from controller.cli.render import as_json
from controller.fleet.core import default_home
from controller.storage.db import database_target, redact_url
from controller.storage.open import open_database
from controller.storage.upgrade import describe, schema_diff

T = TypeVar("T")

db_app = typer.Typer(
    no_args_is_help=True,
    help="The fleet database's schema: its revision, upgrading it in place, checking it.",
)


def _read_schema(home: Path | None, read: Callable[[Any], T], *, migrate: bool) -> tuple[str, T]:
    """Open the fleet database (upgrading it when `migrate`), apply `read` to its engine, close it;
    the target and what `read` returned. An unreachable or refused database is a one-line error."""
    target = database_target(home or default_home())
    # Only an upgrade can fail with RuntimeError (a migration the database refuses).
    refused: tuple[type[Exception], ...] = (ConnectionError, ValueError)
    if migrate:
        refused += (RuntimeError,)
    try:
        db = open_database(target, migrate=migrate)
    except refused as exc:
        raise fail(exc) from None
    try:
        return target, read(db.sa)
    finally:
        db.close()


@db_app.command("current")
def db_current(home: HomeOption = None, json_out: JsonOption = False) -> None:
    """The database's Alembic revision and this edgefleet's (changes nothing)."""
    target, info = _read_schema(home, describe, migrate=False)
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
    target, info = _read_schema(home, describe, migrate=True)
    revision = info["revision"]
    typer.echo(f"{redact_url(target)}: at revision {revision} (head)")


@db_app.command("check")
def db_check(home: HomeOption = None) -> None:
    """Compare the schema with the one this edgefleet describes; exit 1 on a difference."""
    target, diff = _read_schema(home, schema_diff, migrate=False)
    if diff:
        for item in diff:
            typer.echo(f"differs: {item}")
        raise typer.Exit(1)
    typer.echo(f"{redact_url(target)}: the schema matches this edgefleet's")

"""`edgefleet tokens ...`: bearer tokens of the HTTP API (create prints the token once)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from controller.cli.common import HomeOption, JsonOption, fail, open_fleet
from controller.cli.render import as_json, table
from controller.errors import FleetError
from controller.http.auth import ROLES, create_token, list_tokens, revoke_token

tokens_app = typer.Typer(
    no_args_is_help=True, help="HTTP API tokens: read (GET only) or admin (every call)."
)


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="token name ([A-Za-z0-9._-], unique)")],
    role: Annotated[str, typer.Option(help=f"{' or '.join(ROLES)}")] = "read",
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create a token and print it; only its sha256 is stored, so copy it now."""
    fleet = open_fleet(home)
    try:
        token = create_token(fleet.db, name, role)
    except FleetError as exc:
        raise fail(exc) from None
    finally:
        fleet.close()
    if json_out:
        typer.echo(as_json({"name": name, "role": role, "token": token}))
        return
    typer.echo(token)
    typer.echo(
        f"({role} token {name!r}: shown once; send it as 'Authorization: Bearer ...')", err=True
    )


@tokens_app.command("list")
def tokens_list(home: HomeOption = None, json_out: JsonOption = False) -> None:
    """List tokens with role, creation and last use (never the tokens themselves)."""
    fleet = open_fleet(home)
    try:
        rows = list_tokens(fleet.db)
    finally:
        fleet.close()
    if json_out:
        typer.echo(as_json(rows))
        return
    typer.echo(
        table(
            [(r["name"], r["role"], _when(r["created"]), _when(r["last_used"])) for r in rows],
            ["NAME", "ROLE", "CREATED (UTC)", "LAST USED (UTC)"],
        )
    )


@tokens_app.command("revoke")
def tokens_revoke(
    name: Annotated[str, typer.Argument(help="token name")], home: HomeOption = None
) -> None:
    """Delete a token: requests that bear it get 401 from now on."""
    fleet = open_fleet(home)
    try:
        revoke_token(fleet.db, name)
    except FleetError as exc:
        raise fail(exc) from None
    finally:
        fleet.close()
    typer.echo(f"revoked {name}")


def _when(ts: float | None) -> str:
    """UTC time to the second, or '-'."""
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")

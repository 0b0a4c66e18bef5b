"""Options and helpers every `edgefleet` command module shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from controller.fleet.registry import Fleet, default_home

HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home", envvar="EDGEFLEET_HOME", help="data dir (default ~/.local/share/edgefleet)"
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]


def open_fleet(home: Path | None) -> Fleet:
    """Open the fleet in the chosen data dir."""
    return Fleet(home or default_home())


def fail(exc: Exception | str, code: int = 2) -> typer.Exit:
    """Print a clear error and return the exit to raise."""
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code)

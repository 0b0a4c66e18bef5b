"""`edgefleet devices register`: one-step onboarding (docs/onboarding.md), and `up`'s record."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from controller.cli.common import HomeOption, JsonOption, fail
from controller.cli.render import as_json
from controller.fleet.registry import FleetError, default_home

if TYPE_CHECKING:
    from controller.brokers.base import BrokerHandle


def record_serving_or_warn(
    home: Path, handle: BrokerHandle | None, broker: str, *, host: str, topic_root: str
) -> None:
    """`up`: write HOME/serving.json for `devices register`; a failure only warns."""
    from controller.fleet.onboarding import read_serving, record_serving

    try:
        record_serving(home, handle, broker, host=host, topic_root=topic_root)
    except OSError as exc:  # registering devices then needs --broker; the fleet still runs
        typer.echo(f"warning: cannot write {home / 'serving.json'}: {exc}", err=True)
        return
    try:
        serving = read_serving(home)
    except ValueError as exc:  # written just now, so only a concurrent writer gets here
        typer.echo(f"warning: {exc}", err=True)
        return
    if serving is not None:
        typer.echo(
            f"devices connect to {serving.device_broker} (auth {serving.auth}); onboard one "
            "with `edgefleet devices register NAME --profile PROFILE`",
            err=True,
        )


def devices_register(
    device_id: Annotated[str, typer.Argument(help="device id ([A-Za-z0-9._-]{1,64})")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="profile id")],
    auth: Annotated[
        str | None,
        typer.Option(
            help="broker credentials: password, cert (client certificate) or none "
            "(default: what `edgefleet up` serves)"
        ),
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(help="write the agent bundle here (default HOME/bundles/ID); 0700"),
    ] = None,
    broker_url: Annotated[
        str | None,
        typer.Option(
            "--broker",
            help="broker URL devices use (default: what the running or last `edgefleet up` "
            "with this data dir serves)",
        ),
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(
            help="the agent's data_dir on the device (default: chosen on the device: "
            "/var/lib/edgefleet-agent as root or service, else ~/.local/share/edgefleet-agent)"
        ),
    ] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Register a device; write its agent bundle for the controller as it runs; print the steps."""
    from controller.fleet.onboarding import onboard

    try:
        row = onboard(
            home or default_home(),
            device_id,
            profile,
            auth=auth,
            bundle=bundle,
            broker=broker_url,
            data_dir=data_dir,
        )
    except (FleetError, ValueError) as exc:
        raise fail(exc) from None
    if json_out:
        typer.echo(as_json(row))
        return
    typer.echo(f"registered {device_id} as {profile}")
    typer.echo(
        f"bundle {row['bundle']}: agent.toml ({row['auth']} auth, broker {row['broker']}, from "
        f"{row['broker_source']}) and {Path(row['wheel']).name}"
    )
    if row["broker_reloaded"]:
        typer.echo(row["broker_reloaded"])
    for step in row["broker_steps"]:
        typer.echo(f"broker config refreshed; reload that broker now: {step}")
    for warning in row["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo("\non the device:")
    for line in row["commands"]:
        typer.echo(f"  {line}")

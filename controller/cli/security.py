"""`edgefleet broker ...` (secured mosquitto configuration) and `edgefleet keys ...` (signing)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from controller.cli.common import HomeOption, JsonOption, fail, open_fleet
from controller.cli.render import as_json
from controller.errors import FleetError
from controller.fleet.registry import default_home

broker_app = typer.Typer(no_args_is_help=True, help="Secured MQTT broker configuration.")


@broker_app.command("config")
def broker_config(
    out: Annotated[
        Path | None, typer.Option(help="output directory (default HOME/broker-config); 0700")
    ] = None,
    host: Annotated[str, typer.Option(help="address the TLS listeners bind")] = "0.0.0.0",
    tls_port: Annotated[int, typer.Option(help="TLS + password listener")] = 8883,
    cert_port: Annotated[
        int, typer.Option(help="TLS + client certificate listener (0 = none)")
    ] = 8884,
    plain_port: Annotated[
        int, typer.Option(help="plaintext listener, loopback only (the controller)")
    ] = 1883,
    server_name: Annotated[
        list[str] | None,
        typer.Option(help="DNS name or IP in the broker certificate (repeatable)"),
    ] = None,
    topic_root: Annotated[str, typer.Option(help="MQTT topic root")] = "edgefleet/v1",
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Write mosquitto.conf, password file, ACLs and a TLS server certificate from the fleet CA."""
    from controller.security.broker_config import write_broker_files
    from controller.security.identity import FleetSecurity, IdentityError

    home = home or default_home()
    security = FleetSecurity(home)
    try:
        files = write_broker_files(
            security,
            out or home / "broker-config",
            host=host,
            tls_port=tls_port,
            cert_port=cert_port or None,
            plain_port=plain_port,
            server_names=server_name or (),
            topic_root=topic_root,
        )
        username, _ = security.controller_credentials()
    except (IdentityError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    info = {
        "conf": str(files.conf),
        "passwd": str(files.passwd),
        "acl": str(files.acl),
        "ca": str(files.ca),
        "controller_username": username,
        "controller_password_file": str(security.directory / "controller.secret"),
    }
    if json_out:
        typer.echo(as_json(info))
        return
    typer.echo(f"wrote {files.directory} (mosquitto.conf, passwd, acl, ca.crt, server.crt/key)")
    typer.echo(f"run: mosquitto -c {files.conf}   (SIGHUP reloads passwd and acl)")
    typer.echo(f"controller user {username!r}, password in {info['controller_password_file']}")


keys_app = typer.Typer(no_args_is_help=True, help="Fleet signing keys (signed desired state).")


@keys_app.command("show")
def keys_show(home: HomeOption = None, json_out: JsonOption = False) -> None:
    """Print the fleet signing key's id and public key (created on first use)."""
    from controller.security.signing import describe

    info = describe((home or default_home()) / "security")
    if json_out:
        typer.echo(as_json(info))
        return
    typer.echo(f"signing key {info['key_id']}  public {info['public_key']}")
    typer.echo(f"agents trust (keys version {info['keys_version']}): {', '.join(info['trusted'])}")  # type: ignore[arg-type]


@keys_app.command("rotate")
def keys_rotate(home: HomeOption = None, json_out: JsonOption = False) -> None:
    """New signing key, introduced to agents by a keys message signed with the current one.

    The running controller publishes the keys message retained on its next reconcile and signs
    everything after it with the new key; agents keep trusting the replaced key too until the
    next rotation.
    """
    from controller.security.signing import rotate_signing_key

    old, new, keys = rotate_signing_key((home or default_home()) / "security")
    info = {
        "old_key_id": old.key_id,
        "new_key_id": new.key_id,
        "new_public_key": new.public_b64,
        "keys_version": keys.version,
        "trusted": list(keys.keys),
    }
    if json_out:
        typer.echo(as_json(info))
        return
    typer.echo(
        f"rotated: {old.key_id} -> {new.key_id} (keys version {keys.version}, signed by "
        f"{old.key_id}); the controller publishes it on its next reconcile"
    )


def revocation_notes(home: Path, device_id: str) -> list[str]:
    """What happens at the broker after a revocation, and the exact step an operator still owes.

    The embedded broker of a running `up` reloads by itself; `broker config` outputs recorded in
    HOME/security get fresh passwd/acl copies and their reload command; any other broker gets
    the manual steps.
    """
    from controller.fleet.onboarding import read_serving

    notes: list[str] = []
    serving = read_serving(home)
    if serving is not None and serving.embedded and serving.running and serving.auth != "none":
        notes.append(
            f"the embedded broker of the running `edgefleet up` (pid {serving.pid}) reloads "
            "its password file and ACL within a second; the controller disconnects the device"
        )
    try:
        from controller.security.broker_config import refresh_broker_copies
        from controller.security.identity import FleetSecurity
    except ImportError:  # no `cryptography`: no secured broker was ever configured here
        return notes
    for step in refresh_broker_copies(FleetSecurity(home)):
        notes.append(f"broker config refreshed; reload that broker now: {step}")
    if serving is not None and not serving.embedded:
        notes.append(
            f"external broker {serving.device_broker}: if it was not configured by `edgefleet "
            f"broker config`, remove user {device_id} from its password file, add `user "
            f"{device_id}` + `topic deny #` to its ACL, then reload it (mosquitto: kill -HUP PID)"
        )
    return notes


def devices_revoke(
    device_id: Annotated[str, typer.Argument(help="device id")], home: HomeOption = None
) -> None:
    """Revoke a device: its password goes, the broker ACL denies it, its messages are refused."""
    home = home or default_home()
    fleet = open_fleet(home)
    try:
        fleet.revoke_device(device_id)
    except (FleetError, ValueError) as exc:  # ValueError: a bad revoked.json, named
        raise fail(exc) from None
    finally:
        fleet.close()
    typer.echo(f"revoked {device_id} (register it again to bring it back)")
    try:
        notes = revocation_notes(home, device_id)
    except ValueError as exc:  # a bad serving.json or broker_copies.json, named in one line
        raise fail(exc) from None
    for note in notes:
        typer.echo(note)

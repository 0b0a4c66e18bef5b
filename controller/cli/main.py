"""`edgefleet`: the fleet manager's command line (typer; every listing takes --json)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

import firmware_profiles
from controller.cli.common import HomeOption, JsonOption, fail, open_fleet
from controller.cli.db import db_app
from controller.cli.explain import devices_outliers, models_explain
from controller.cli.listing import (
    LimitOption,
    ProfileFilter,
    StateFilter,
    device_lines,
    devices_table,
    select,
    showing,
)
from controller.cli.onboarding import devices_register
from controller.cli.optimize import optimize
from controller.cli.quiet import quiet_tensorflow
from controller.cli.render import as_json, short, table
from controller.cli.rollout import rollout_app
from controller.cli.security import broker_app, devices_revoke, keys_app, revocation_notes
from controller.cli.simulate import simulate_command
from controller.cli.status import status
from controller.cli.telemetry import report, telemetry
from controller.cli.tokens import tokens_app
from controller.cli.up import host_port, replicas_command, up
from controller.fleet.registry import FleetError, default_home
from controller.fleet.telemetry.reports import model_names
from controller.storage.db import is_postgres, redact_url

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,  # main() prints one line; --debug shows the traceback
    no_args_is_help=True,
    help="edgefleet: optimize models per device profile, roll them out over MQTT, measure them.",
)
devices_app = typer.Typer(no_args_is_help=True, help="Register, list, show and remove devices.")
profiles_app = typer.Typer(no_args_is_help=True, help="Device profiles (firmware_profiles/).")
deployments_app = typer.Typer(no_args_is_help=True, help="Direct deployments and their state.")
models_app = typer.Typer(no_args_is_help=True, help="Register model versions and their artifacts.")


def _print_version(value: bool) -> None:
    """`edgefleet --version`: the installed package's version."""
    if value:
        typer.echo(f"edgefleet {_version()}")
        raise typer.Exit(0)


def _version() -> str:
    """The version of the installed distribution (pyproject's when run from a checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "unknown (not installed)"


@app.callback()
def _global_options(
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            envvar="EDGEFLEET_DB",
            help="database: postgresql://user:pass@host/db, or an SQLite file "
            "(default HOME/edgefleet.db)",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="print the version and exit"
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", envvar="EDGEFLEET_DEBUG", help="tracebacks and TensorFlow's own logging"
        ),
    ] = False,
) -> None:
    """Options every command takes: --db selects the fleet database (docs/storage.md)."""
    if debug:
        os.environ["EDGEFLEET_DEBUG"] = "1"  # main() and quiet_tensorflow() read it
    quiet_tensorflow()  # before any command imports TensorFlow
    if db:
        if "://" in db and not is_postgres(db):
            raise fail(f"--db {redact_url(db)!r}: expected a postgresql:// URL or a file path")
        os.environ["EDGEFLEET_DB"] = db  # every Fleet of this process, service threads too


app.add_typer(devices_app, name="devices")
app.add_typer(profiles_app, name="profiles")
app.add_typer(deployments_app, name="deployments")
app.add_typer(models_app, name="models")
app.add_typer(rollout_app, name="rollout")
app.add_typer(broker_app, name="broker")
app.add_typer(keys_app, name="keys")
app.add_typer(tokens_app, name="tokens")
app.add_typer(db_app, name="db")
app.command()(optimize)
app.command("telemetry")(telemetry)
app.command("report")(report)
app.command("simulate")(simulate_command)
app.command()(up)
app.command("replicas")(replicas_command)
app.command("status")(status)
models_app.command("explain")(models_explain)
devices_app.command("register")(devices_register)
devices_app.command("outliers")(devices_outliers)

_fleet = open_fleet
_fail = fail


# ---------------------------------------------------------------------------- devices
@devices_app.command("list")
def devices_list(
    state: StateFilter = None,
    profile: ProfileFilter = None,
    limit: LimitOption = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """List devices with profile, link, state and current model (name:version)."""
    fleet = _fleet(home)
    every = fleet.devices()
    rows, matched = select(
        every,
        states=state,
        state_of=lambda d: {d["state"], "online" if d["online"] else "offline"},
        profiles=profile,
        limit=limit,
        json_out=json_out,
    )
    if json_out:
        typer.echo(as_json(rows))
        return
    typer.echo(devices_table(rows, model_names(fleet.db)))
    footer = showing(len(rows), matched, len(every), "devices")
    if footer:
        typer.echo(footer)


@devices_app.command("show")
def devices_show(
    device_id: Annotated[str, typer.Argument(help="device id")],
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one device: facts, profile match, latest benchmarks and events."""
    fleet = _fleet(home)
    try:
        detail = fleet.device_detail(device_id)
    except FleetError as exc:
        raise _fail(exc) from None
    if json_out:
        typer.echo(as_json(detail))
        return
    typer.echo("\n".join(device_lines(detail, model_names(fleet.db))))


@devices_app.command("remove")
def devices_remove(
    device_id: Annotated[str, typer.Argument(help="device id")], home: HomeOption = None
) -> None:
    """Revoke a device and forget it (`devices register` brings it back)."""
    try:
        _fleet(home).remove_device(device_id)
    except FleetError as exc:
        raise _fail(exc) from None
    typer.echo(f"removed and revoked {device_id}")
    for note in revocation_notes(home or default_home(), device_id):
        typer.echo(note)


devices_app.command("revoke")(devices_revoke)


@devices_app.command("benchmark")
def devices_benchmark(
    device_id: Annotated[str, typer.Argument(help="device id")],
    runs: Annotated[int, typer.Option(min=1, help="timed invocations")] = 50,
    warmup: Annotated[int, typer.Option(min=0, help="untimed invocations first")] = 5,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Ask a device to benchmark its active model now (a running `edgefleet up` sends it)."""
    try:
        command_id = _fleet(home).send_command(device_id, "benchmark", runs=runs, warmup=warmup)
    except FleetError as exc:
        raise _fail(exc) from None
    typer.echo(as_json({"command_id": command_id}) if json_out else f"queued {command_id}")


# ---------------------------------------------------------------------------- profiles
@profiles_app.command("list")
def profiles_list(json_out: JsonOption = False) -> None:
    """List device profiles."""
    profiles = firmware_profiles.load_all()
    if json_out:
        typer.echo(as_json([p.to_dict() for p in profiles.values()]))
        return
    typer.echo(
        table(
            [
                (
                    p.id,
                    p.device_class,
                    p.name,
                    f"{p.runtime.name} {p.runtime.version}",
                    p.compiler.kind,
                    p.quantization.preferred,
                )
                for p in profiles.values()
            ],
            ["PROFILE", "CLASS", "NAME", "RUNTIME", "COMPILER", "PREFERRED"],
        )
    )


@profiles_app.command("show")
def profiles_show(
    profile_id: Annotated[str, typer.Argument(help="profile id")], json_out: JsonOption = False
) -> None:
    """Show one profile with the source of each figure."""
    try:
        profile = firmware_profiles.load(profile_id)
    except firmware_profiles.ProfileError as exc:
        raise _fail(exc) from None
    typer.echo(as_json(profile.to_dict()))


# ---------------------------------------------------------------------------- deploy
@app.command()
def deploy(
    model: Annotated[Path, typer.Argument(help="a .tflite file")],
    to: Annotated[list[str] | None, typer.Option("--to", help="device id (repeatable)")] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="every device of a profile")
    ] = None,
    name: Annotated[str | None, typer.Option(help="model name (default: file stem)")] = None,
    version: Annotated[str | None, typer.Option(help="model version (default: sha prefix)")] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Direct deployment of a .tflite to devices (staged rollouts: `edgefleet rollout`)."""
    try:
        result = _fleet(home).deploy(model, devices=to, profile=profile, name=name, version=version)
    except FleetError as exc:
        raise _fail(exc) from None
    if json_out:
        typer.echo(as_json(result))
    else:
        typer.echo(
            f"deployment {result['id']}: {len(result['devices'])} device(s); "
            f"a running `edgefleet up` publishes it"
        )


@deployments_app.command("show")
def deployments_show(
    deployment_id: Annotated[str, typer.Argument(help="deployment id")],
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show a deployment and each device's progress."""
    try:
        dep = _fleet(home).deployment(deployment_id)
    except FleetError as exc:
        raise _fail(exc) from None
    if json_out:
        typer.echo(as_json(dep))
        return
    typer.echo(f"{dep['id']}  target {dep['target']}")
    typer.echo(
        table(
            [(d["device_id"], d["generation"], d["state"], d["detail"]) for d in dep["devices"]],
            ["DEVICE", "GEN", "STATE", "DETAIL"],
        )
    )


# ---------------------------------------------------------------------------- models
@models_app.command("add")
def models_add(
    path: Annotated[Path, typer.Argument(help="a .tflite file, or an `optimize --out` directory")],
    name: Annotated[str, typer.Option("--name", help="model name")],
    version: Annotated[str, typer.Option("--version", help="model version")],
    profile: Annotated[
        str | None, typer.Option("--profile", help="profile of a single .tflite (default: any)")
    ] = None,
    golden: Annotated[
        Path | None, typer.Option("--golden", help="golden inputs/outputs .npz for the self-test")
    ] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Register NAME:VERSION with one artifact per profile (or one for every profile)."""
    try:
        model = _fleet(home).add_model(
            path, name=name, version=version, profile=profile, golden=golden
        )
    except FleetError as exc:
        raise _fail(exc) from None
    if json_out:
        typer.echo(as_json(model))
        return
    typer.echo(f"model {model['name']}:{model['version']}")
    typer.echo(
        table(
            [
                (
                    a["profile"] or "*",
                    a["recipe"],
                    short(a["sha256"]),
                    a["size"],
                    "yes" if a["golden_sha256"] else "no",
                )
                for a in model["artifacts"]
            ],
            ["PROFILE", "RECIPE", "SHA256", "BYTES", "GOLDEN"],
        )
    )


@models_app.command("list")
def models_list(home: HomeOption = None, json_out: JsonOption = False) -> None:
    """List model versions and the profiles they have artifacts for."""
    rows = _fleet(home).models()
    if json_out:
        typer.echo(as_json(rows))
        return
    typer.echo(
        table(
            [(m["name"], m["version"], ", ".join(m["profiles"])) for m in rows],
            ["NAME", "VERSION", "PROFILES"],
        )
    )


@app.command()
def demo(
    devices: Annotated[int, typer.Option(min=1, max=50, help="number of agents")] = 3,
    json_out: JsonOption = False,
    keep: Annotated[bool, typer.Option(help="keep the demo data dir")] = False,
    serve: Annotated[
        bool, typer.Option(help="afterwards keep the fleet running with the dashboard")
    ] = False,
    http: Annotated[str, typer.Option(help="dashboard address for --serve")] = "127.0.0.1:8080",
) -> None:
    """Embedded broker + controller + N real agents + a real model, end to end."""
    from controller.cli.demo import run_demo

    address = host_port(http, "--http") if serve else None
    code = run_demo(devices=devices, json_out=json_out, keep=keep, serve=address)
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point: an unexpected error is one line (rc 1) unless --debug."""
    try:
        code = app(standalone_mode=False)  # errors come here, to be printed as one line
    except typer.Abort:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None
    except typer.TyperException as exc:  # click's (vendored) usage and parameter errors
        code = int(getattr(exc, "exit_code", 2))
        context = getattr(exc, "ctx", None)
        where = f" (see `{context.command_path} --help`)" if code == 2 and context else ""
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        typer.echo(f"error: {message}{where}", err=True)
        raise SystemExit(code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None
    except Exception as exc:  # the last resort: one line instead of a traceback
        if os.environ.get("EDGEFLEET_DEBUG"):
            raise
        typer.echo(
            f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", err=True
        )
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

"""`edgefleet`: the fleet manager's command line (typer; every listing takes --json)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

import firmware_profiles
from agent.protocol import ProtocolError, validate_name
from controller.cli.common import HomeOption, JsonOption, fail, open_fleet
from controller.cli.explain import devices_outliers, models_explain
from controller.cli.optimize import optimize
from controller.cli.render import as_json, num, short, table
from controller.cli.rollout import rollout_app
from controller.cli.security import broker_app, keys_app
from controller.cli.simulate import simulate_command
from controller.cli.telemetry import report, telemetry
from controller.cli.tokens import tokens_app
from controller.fleet.registry import Fleet, FleetError, default_home
from controller.runtime.pacing import DEFAULT_MAX_FETCHING, DEFAULT_PER_MINUTE
from controller.storage.db import database_target, is_postgres, redact_url

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="edgefleet: optimize models per device profile, roll them out over MQTT, measure them.",
)
devices_app = typer.Typer(no_args_is_help=True, help="Register, list, show and remove devices.")
profiles_app = typer.Typer(no_args_is_help=True, help="Device profiles (firmware_profiles/).")
deployments_app = typer.Typer(no_args_is_help=True, help="Direct deployments and their state.")
models_app = typer.Typer(no_args_is_help=True, help="Register model versions and their artifacts.")


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
) -> None:
    """Options every command takes: --db selects the fleet database (docs/storage.md)."""
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
app.command()(optimize)
app.command("telemetry")(telemetry)
app.command("report")(report)
app.command("simulate")(simulate_command)
models_app.command("explain")(models_explain)
devices_app.command("outliers")(devices_outliers)

_fleet = open_fleet
_fail = fail


# ---------------------------------------------------------------------------- devices
@devices_app.command("list")
def devices_list(home: HomeOption = None, json_out: JsonOption = False) -> None:
    """List devices with profile, state and current model."""
    rows = _fleet(home).devices()
    if json_out:
        typer.echo(as_json(rows))
        return
    typer.echo(
        table(
            [
                (
                    d["id"],
                    d["profile"] or "?",
                    "online" if d["online"] else "offline",
                    d["state"],
                    short(d["model_sha256"]),
                    d["runtime"] or "-",
                    d["runtime_version"] or "-",
                )
                for d in rows
            ],
            ["DEVICE", "PROFILE", "LINK", "STATE", "MODEL", "RUNTIME", "VERSION"],
        )
    )


@devices_app.command("show")
def devices_show(
    device_id: Annotated[str, typer.Argument(help="device id")],
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Show one device: facts, profile match, latest benchmarks and events."""
    try:
        detail = _fleet(home).device_detail(device_id)
    except FleetError as exc:
        raise _fail(exc) from None
    if json_out:
        typer.echo(as_json(detail))
        return
    for key in (
        "id",
        "profile",
        "profile_reason",
        "online",
        "state",
        "status_detail",
        "model_sha256",
        "previous_sha256",
        "runtime",
        "runtime_version",
        "agent_version",
    ):
        typer.echo(f"{key:16} {detail[key]}")
    typer.echo(f"{'facts':16} {detail['facts']}")
    if detail["benchmarks"]:
        typer.echo("\nbenchmarks:")
        typer.echo(
            table(
                [
                    (
                        short(b["model_sha256"]),
                        num(b["p50_ms"]),
                        num(b["p99_ms"]),
                        num(b["peak_rss_mb"], 1),
                        num(b["power_w"]),
                        b["power_source"],
                    )
                    for b in detail["benchmarks"]
                ],
                ["MODEL", "P50 MS", "P99 MS", "PEAK RSS MB", "POWER W", "SOURCE"],
            )
        )


@devices_app.command("register")
def devices_register(
    device_id: Annotated[str, typer.Argument(help="device id ([A-Za-z0-9._-]{1,64})")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="profile id")],
    auth: Annotated[
        str,
        typer.Option(help="broker credentials: password, cert (client certificate) or none"),
    ] = "password",
    bundle: Annotated[
        Path | None,
        typer.Option(help="write the agent bundle here (default HOME/bundles/ID); 0700"),
    ] = None,
    broker_url: Annotated[
        str | None,
        typer.Option("--broker", help="broker URL for the bundle (default mqtts://FQDN:8883)"),
    ] = None,
    home: HomeOption = None,
    json_out: JsonOption = False,
) -> None:
    """Register a device with an explicit profile before it connects; write its agent bundle."""
    try:
        row = _fleet(home).register_device(
            device_id,
            profile,
            auth=None if auth == "none" else auth,
            bundle_dir=bundle,
            broker_url=broker_url,
        )
    except FleetError as exc:
        raise _fail(exc) from None
    if json_out:
        typer.echo(as_json(row))
        return
    typer.echo(f"registered {device_id} as {profile}")
    if "bundle" in row:
        typer.echo(
            f"{row['auth']} credentials and agent.toml in {row['bundle']} (secret: copy it to the "
            "device, then delete it here); run `edgefleet broker config` to update the broker"
        )


@devices_app.command("remove")
def devices_remove(
    device_id: Annotated[str, typer.Argument(help="device id")], home: HomeOption = None
) -> None:
    """Forget a device."""
    try:
        _fleet(home).remove_device(device_id)
    except FleetError as exc:
        raise _fail(exc) from None
    typer.echo(f"removed {device_id}")


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
            [
                (d["device_id"], d["generation"], d["state"], d["detail"][:60])
                for d in dep["devices"]
            ],
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


# ---------------------------------------------------------------------------- service
@app.command()
def up(
    broker: Annotated[
        str | None, typer.Option(help="mqtt://host:port of an existing broker")
    ] = None,
    host: Annotated[str, typer.Option(help="embedded broker address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="embedded broker port (0 = any free port)")] = 1883,
    topic_root: Annotated[str, typer.Option(help="MQTT topic root")] = "edgefleet/v1",
    stats_interval: Annotated[
        float, typer.Option(min=0.1, help="seconds between stats lines in the log")
    ] = 60.0,
    max_fetching: Annotated[
        int,
        typer.Option(min=0, help="devices downloading an artifact at once (0 = no window)"),
    ] = DEFAULT_MAX_FETCHING,
    fetch_rate: Annotated[
        float,
        typer.Option(min=0.0, help="devices starting a download per minute (0 = no limit)"),
    ] = DEFAULT_PER_MINUTE,
    metrics: Annotated[
        str | None,
        typer.Option(help="serve Prometheus /metrics on HOST:PORT (e.g. 127.0.0.1:9464)"),
    ] = None,
    telemetry_days: Annotated[
        float, typer.Option(min=0.01, help="days raw telemetry is kept before per-minute roll-up")
    ] = 7.0,
    http: Annotated[
        str | None,
        typer.Option(help="serve the HTTP API and dashboard on HOST:PORT (docs/http-api.md)"),
    ] = None,
    replica: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_REPLICA",
            help="run as one of several replicas under this unique name: shared subscriptions, "
            "leader lease (needs --broker; docs/storage.md)",
        ),
    ] = None,
    home: HomeOption = None,
) -> None:
    """Run the controller (and an embedded broker unless --broker is given) until interrupted."""
    from controller.brokers.mosquitto import BrokerError, is_loopback, start_embedded
    from controller.runtime.prometheus import ControllerMetrics, serve_metrics
    from controller.runtime.service import ControllerService

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    home = home or default_home()
    if replica is not None:
        if broker is None:
            raise _fail("--replica needs --broker: replicas share one broker (and one database)")
        try:
            validate_name("--replica", replica)
        except ProtocolError as exc:
            raise _fail(exc) from None
    metrics_address = _host_port(metrics, "--metrics") if metrics else None
    http_address = _host_port(http, "--http") if http else None
    fleet = Fleet(home)  # create and migrate the database before anything reads it
    try:
        if replica is not None:
            from controller.runtime.lease import DEAD_AFTER_S, running_elsewhere

            other = running_elsewhere(fleet.db, replica, wait_s=DEAD_AFTER_S + 1)
            if other is not None:
                raise _fail(
                    f"replica {replica!r} is already running on {other['host']} "
                    f"(pid {other['pid']}): give each replica a name of its own"
                )
    finally:
        fleet.close()
    handle = None
    username = password = None
    if broker is None:
        security = None
        if not is_loopback(host):
            # Devices beyond loopback must authenticate (docs/security.md); the controller then
            # uses its own credentials on the broker's loopback listener.
            from controller.security.identity import FleetSecurity

            security = FleetSecurity(home)
            username, password = security.controller_credentials()
        try:
            handle = start_embedded(home / "broker", host=host, port=port, security=security)
        except BrokerError as exc:
            raise _fail(exc) from None
        broker = handle.url
        typer.echo(f"embedded {handle.kind} broker on {broker}", err=True)
    registry = ControllerMetrics(database_target(home)) if metrics_address else None
    metrics_server = None
    if registry is not None and metrics_address is not None:
        try:
            metrics_server = serve_metrics(registry, *metrics_address)
        except OSError as exc:
            if handle:
                handle.stop()
            raise _fail(f"cannot serve /metrics on {metrics}: {exc}") from None
        typer.echo(f"Prometheus metrics on {metrics_server.url}", err=True)
    http_server = None
    if http_address is not None:
        from controller.http.server import start_http

        try:
            http_server, dashboard = start_http(home, *http_address)
        except OSError as exc:
            for running in (metrics_server, handle):
                if running:
                    running.stop()
            raise _fail(f"cannot serve HTTP on {http}: {exc}") from None
        if not is_loopback(http_address[0]):
            typer.echo(
                f"warning: --http {http} is beyond loopback and has no TLS: bearer tokens cross "
                "the network in clear; put a TLS proxy in front of it",
                err=True,
            )
        if sys.stderr.isatty():
            typer.echo(f"dashboard: {dashboard}", err=True)
        else:  # a log file or the journal: do not write the admin token into it
            address = dashboard.split("#", 1)[0]
            typer.echo(f"dashboard: {address} (token in {home / 'http-token'})", err=True)
    service = ControllerService(
        home,
        broker,
        topic_root=topic_root,
        stats_interval_s=stats_interval,
        max_fetching=max_fetching,
        fetches_per_minute=fetch_rate,
        telemetry_raw_days=telemetry_days,
        metrics=registry,
        username=username,
        password=password,
        replica=replica,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service.start()
    typer.echo(f"controller running (data in {home}); Ctrl-C to stop", err=True)
    try:
        while not stop.wait(1.0):
            if not service.alive:
                typer.echo("error: the controller loop stopped (see the log above)", err=True)
                raise typer.Exit(1)
    finally:
        service.stop()
        if http_server:
            http_server.stop()
        if metrics_server:
            metrics_server.stop()
        if handle:
            handle.stop()


def _host_port(value: str, option: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:PORT), or exit naming the option and what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise _fail(f"{option} must be HOST:PORT, got {value!r}")
    return host, int(port)


@app.command("replicas")
def replicas_command(home: HomeOption = None, json_out: JsonOption = False) -> None:
    """Controller replicas against this database: heartbeat age, leader, counters."""
    from controller.runtime.lease import LEADER_LEASE, Lease, replicas

    fleet = open_fleet(home)
    try:
        rows = replicas(fleet.db)
        lease = Lease(fleet.db, "", LEADER_LEASE).state()
        now = fleet.db.clock()
    finally:
        fleet.close()
    leader = lease.holder if lease is not None and lease.expires > now else None
    if json_out:
        typer.echo(as_json({"leader": leader, "replicas": rows}))
        return
    if not rows:
        typer.echo("no replica has run against this database")
        return
    typer.echo(
        table(
            [
                (
                    r["name"],
                    "leader" if r["name"] == leader else "",
                    f"{r['age_s']:.1f}s",
                    f"{r['host']}:{r['pid']}",
                    r["stats"].get("messages", 0),
                    r["stats"].get("records_stored", 0),
                )
                for r in rows
            ],
            ["REPLICA", "ROLE", "LAST SEEN", "HOST:PID", "MESSAGES", "RECORDS"],
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

    address = _host_port(http, "--http") if serve else None
    code = run_demo(devices=devices, json_out=json_out, keep=keep, serve=address)
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())

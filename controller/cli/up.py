"""`edgefleet up` (controller, embedded broker, HTTP, metrics) and `edgefleet replicas`."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agent.protocol import ProtocolError, validate_name
from controller.cli.common import HomeOption, JsonOption, fail, open_fleet
from controller.cli.onboarding import record_serving_or_warn
from controller.cli.render import as_json, table
from controller.fleet.registry import Fleet, default_home
from controller.runtime.pacing import DEFAULT_MAX_FETCHING, DEFAULT_PER_MINUTE
from controller.security.controller_identity import ControllerIdentity, controller_identity
from controller.storage.db import database_target

# Seconds `up` waits for the first CONNACK before saying the broker is not reachable: a
# reachable broker answers in milliseconds; the transport's own log line for the first failed
# attempt comes at once, this one says what `up` does about it.
BROKER_GRACE_S = 3.0

if TYPE_CHECKING:
    from controller.brokers.base import BrokerHandle


# ---------------------------------------------------------------------------- service
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
    from controller.runtime.prometheus import ControllerMetrics, serve_metrics
    from controller.runtime.service import ControllerService

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    home = home or default_home()
    _refuse_replica(home, broker, replica)
    metrics_address = host_port(metrics, "--metrics") if metrics else None
    http_address = host_port(http, "--http") if http else None
    handle = None
    username = password = None
    identity = ControllerIdentity()
    if broker is not None:
        # The controller's own credentials (and fleet CA for mqtts://) from HOME/security, as
        # `edgefleet broker config` wrote them; credentials in the URL are refused.
        try:
            identity = controller_identity(home, broker)
        except ValueError as exc:
            raise fail(exc) from None
        username, password = identity.username, identity.password
        typer.echo(f"broker {broker}: logging in {identity.describe()}", err=True)
    if broker is None:
        handle, username, password = _embedded_broker(home, host, port)
        broker = handle.url
    record_serving_or_warn(home, handle, broker, host=host, topic_root=topic_root)
    registry = ControllerMetrics(database_target(home)) if metrics_address else None
    metrics_server = None
    if registry is not None and metrics_address is not None:
        try:
            metrics_server = serve_metrics(registry, *metrics_address)
        except OSError as exc:
            if handle:
                handle.stop()
            raise fail(f"cannot serve /metrics on {metrics}: {exc}") from None
        typer.echo(f"Prometheus metrics on {metrics_server.url}", err=True)
    http_server = None
    if http_address is not None:
        http_server = _serve_http(home, http, http_address, [metrics_server, handle])
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
        ca_file=identity.ca_file,
        cert_file=identity.cert_file,
        key_file=identity.key_file,
        replica=replica,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    service.start()
    if http_server:
        http_server.set_status(service.health)
    typer.echo(f"controller running (data in {home}); Ctrl-C to stop", err=True)
    try:
        if not service.session.connected.wait(BROKER_GRACE_S) and not stop.is_set():
            typer.echo(
                f"broker {broker} not reachable yet: retrying with backoff until it is "
                "(each attempt and its reason is logged)",
                err=True,
            )
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
        typer.echo("controller stopped", err=True)  # the last line, after every disconnect log


def _refuse_replica(home: Path, broker: str | None, replica: str | None) -> None:
    """Exit when --replica is misused or its name is taken by another live process."""
    if replica is None:
        return
    if broker is None:
        raise fail("--replica needs --broker: replicas share one broker (and one database)")
    try:
        validate_name("--replica", replica)
    except ProtocolError as exc:
        raise fail(exc) from None
    fleet = Fleet(home)  # create and migrate the database before anything reads it
    try:
        from controller.runtime.lease import DEAD_AFTER_S, running_elsewhere

        other = running_elsewhere(fleet.db, replica, wait_s=DEAD_AFTER_S + 1)
        if other is not None:
            raise fail(
                f"replica {replica!r} is already running on {other['host']} "
                f"(pid {other['pid']}): give each replica a name of its own"
            )
    finally:
        fleet.close()


def _embedded_broker(
    home: Path, host: str, port: int
) -> tuple[BrokerHandle, str | None, str | None]:
    """Start the embedded broker; beyond loopback, with the controller's own credentials."""
    from controller.brokers.base import BrokerError, is_loopback
    from controller.runtime.embedded_broker import start_embedded

    security = None
    username = password = None
    if not is_loopback(host):
        # Devices beyond loopback must authenticate (docs/security.md); the controller then
        # uses its own credentials on the broker's loopback listener.
        from controller.security.identity import FleetSecurity

        security = FleetSecurity(home)
        username, password = security.controller_credentials()
    try:
        handle = start_embedded(home / "broker", host=host, port=port, security=security)
    except BrokerError as exc:
        raise fail(exc) from None
    typer.echo(f"embedded {handle.kind} broker on {handle.url}", err=True)
    return handle, username, password


def _serve_http(home: Path, http: str | None, address: tuple[str, int], started: list[Any]) -> Any:
    """Start the HTTP API and dashboard; on failure stop what `started` holds and exit."""
    from controller.brokers.base import is_loopback
    from controller.http.server import start_http

    try:
        server, dashboard = start_http(home, *address)
    except OSError as exc:
        for running in started:
            if running:
                running.stop()
        raise fail(f"cannot serve HTTP on {http}: {exc}") from None
    if not is_loopback(address[0]):
        typer.echo(
            f"warning: --http {http} is beyond loopback and has no TLS: bearer tokens cross "
            "the network in clear; put a TLS proxy in front of it",
            err=True,
        )
    if sys.stderr.isatty():
        typer.echo(f"dashboard: {dashboard}", err=True)
    else:  # a log file or the journal: do not write the admin token into it
        url = dashboard.split("#", 1)[0]
        typer.echo(f"dashboard: {url} (token in {home / 'http-token'})", err=True)
    return server


def host_port(value: str, option: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:PORT), or exit naming the option and what is wrong."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise fail(f"{option} must be HOST:PORT, got {value!r}")
    return host, int(port)


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

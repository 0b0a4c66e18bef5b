"""The `edgefleet simulate` command: run a Simulation from the CLI and print its progress."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer

from agent.protocol import DEFAULT_ROOT, ProtocolError
from controller.brokers.base import parse_broker_url
from controller.cli.progress import ProgressDisplay
from controller.simulate.faults import SimulationError, parse_fault
from controller.simulate.figures import MIB
from controller.simulate.loop import MAX_DEVICES
from controller.simulate.shard import DEVICES_PER_PROCESS, make_simulation
from controller.simulate.speed import SpeedModel
from controller.simulate.telemetry import DEFAULT_INTERVAL_S

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
# One progress line per this many seconds from the CLI (into a pipe or a log) ...
PROGRESS_INTERVAL_S = 5.0
# ... and a redraw of the bars this often on a terminal.
BAR_INTERVAL_S = 1.0
# Seconds to wait for the broker's TCP accept before saying it is unreachable: a loopback or
# LAN broker answers in milliseconds; 5 s also covers a slow remote one.
PROBE_TIMEOUT_S = 5.0


def _probe_broker(broker: str, host: str, port: int) -> None:
    """Exit 1 with one line saying why if nothing accepts TCP connections at the broker."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        typer.echo(f"error: broker {broker} unreachable: {reason}", err=True)
        raise typer.Exit(1) from None


def _progress_line(snap: dict[str, Any]) -> str:
    """One-line summary for the periodic progress output."""
    line = (
        f"[{snap['elapsed_s']:7.1f}s] connected {snap['connected']}/{snap['devices']}  "
        f"activated {snap['activated']}  failed {snap['failed']}  "
        f"received {snap['bytes_received'] / MIB:.1f} MiB  "
        f"rejected chunks {snap['chunks_rejected']}  rss {snap['rss_mb']} MB"
    )
    if len(snap.get("processes", ())) > 1:
        line += f"  processes {len(snap['processes'])}"
    if snap["telemetry_records"]:
        line += (
            f"  telemetry sent {snap['telemetry_sent']} resent {snap['telemetry_resent']} "
            f"spooled {snap['telemetry_spooled']} dropped {snap['telemetry_dropped']}"
        )
    return line


def _show(display: ProgressDisplay, snap: dict[str, Any]) -> None:
    """Bars of agents connected and devices active on a model, with the updates applied (or,
    off a terminal, the progress line)."""
    total = snap["devices"]
    display.update(
        "connected", description="agents connected", completed=snap["connected"], total=total,
        unit="agents", line=_progress_line(snap),
    )  # fmt: skip
    failed = f", {snap['failed']} failed" if snap["failed"] else ""
    display.update(
        "updated", description=f"devices active ({snap['activated']} updates{failed})",
        completed=snap["states"].get("active", 0), total=total, unit="devices",
    )  # fmt: skip


def _interrupt_on_sigterm() -> Callable[[], None]:
    """SIGTERM ends the run like Ctrl-C (agents say goodbye, simulation processes stop, the
    summary is printed); returns the function that puts the old handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, old)

    return restore


def simulate_command(
    devices: Annotated[
        int, typer.Option("--devices", "-n", min=1, max=MAX_DEVICES, help="simulated agents")
    ],
    broker: Annotated[str, typer.Option("--broker", help="mqtt://host[:port]")] = DEFAULT_BROKER,
    profile: Annotated[
        list[str] | None,
        typer.Option("--profile", "-p", help="profile id, repeatable (round-robin)"),
    ] = None,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            "--fault",
            help="KIND[=VALUE]:COUNT|PERCENT%, repeatable: nan:5%, slow=3:10%, offline=30:2%, "
            "crash:1, drop=0.2:10%, telemetry-loss=0.25:10%",
        ),
    ] = None,
    prefix: Annotated[str, typer.Option(help="device id prefix (ids are PREFIX-NNNN)")] = "sim",
    topic_root: Annotated[str, typer.Option("--topic-root", help="MQTT topic root")] = DEFAULT_ROOT,
    duration: Annotated[
        float | None, typer.Option(min=0.0, help="stop after SECONDS (default: until Ctrl-C)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for fault assignment and figures")] = 0,
    speed: Annotated[
        list[str] | None,
        typer.Option(
            "--speed",
            help="PROFILE:KEY=FACTOR[,KEY=FACTOR...], repeatable: latency x FACTOR on PROFILE "
            "for a recipe (int8, fp16, dynamic, fp32; int8+pruned50 matches int8) or a thread "
            "count (t1, t4), e.g. rpi4:int8=3.0,t4=0.5",
        ),
    ] = None,
    telemetry_interval: Annotated[
        float,
        typer.Option(
            "--telemetry-interval",
            min=0.0,
            help="seconds between telemetry records per device (0 = off)",
        ),
    ] = DEFAULT_INTERVAL_S,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            help="processes driving the agents, one epoll loop each (default: min(CPUs, "
            f"devices / {DEVICES_PER_PROCESS} rounded up); 1 = this process)",
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="print the final snapshot as JSON")
    ] = False,
) -> None:
    """Run N simulated agents on the real protocol: one process, one MQTT connection each."""
    try:
        specs = [parse_fault(spec) for spec in fault or []]
        speed_model = SpeedModel.parse(speed or [])
        sim = make_simulation(
            broker,
            devices,
            processes=processes,
            profiles=profile,
            faults=specs,
            prefix=prefix,
            topic_root=topic_root,
            seed=seed,
            telemetry_interval_s=telemetry_interval,
            speed=speed_model,
        )
    except (SimulationError, ProtocolError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    host, port = parse_broker_url(broker)
    _probe_broker(broker, host, port)
    restore = _interrupt_on_sigterm()
    try:
        sim.start()
    except SimulationError as exc:  # a simulation process could not start
        restore()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # while the simulation processes were starting
        sim.stop()
        restore()
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    end = None if duration is None else time.monotonic() + duration
    display = ProgressDisplay()
    # A line every PROGRESS_INTERVAL_S into a log; the bars on a terminal move every second.
    every = BAR_INTERVAL_S if display.terminal else PROGRESS_INTERVAL_S
    next_progress = time.monotonic() + every
    try:
        with display:
            while end is None or time.monotonic() < end:
                time.sleep(0.1 if end is None else max(0.0, min(0.1, end - time.monotonic())))
                if time.monotonic() >= next_progress:
                    next_progress += every
                    _show(display, sim.snapshot())
    except KeyboardInterrupt:
        typer.echo("interrupted; disconnecting", err=True)
    finally:
        snap = sim.snapshot()  # before stop(): the counts of the run, not of the goodbye
        sim.stop()
        restore()
    typer.echo(json.dumps(snap, indent=2) if json_out else _progress_line(snap))

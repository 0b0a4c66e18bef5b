"""`edgefleet demo`: embedded broker, controller and N real agent processes, end to end."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import typer

import firmware_profiles
from agent.protocol.config import AgentConfig, PowerModelConfig, dump_config
from controller.cli.quiet import native_stderr_filtered
from controller.cli.render import as_json, num, short, table
from controller.fleet.registry import Fleet
from controller.fleet.rollout.policy import Gate, Policy, Threshold, parse_waves
from controller.fleet.rollout.states import ACTIVE, DeviceState
from controller.storage.queries.telemetry import served_by_device

# Profiles the demo agents declare, in turn: a board, a phone, a gateway, an NPU board.
DEMO_PROFILES = ("rpi4", "pixel-8", "x86-64-gateway", "imx93", "rpi5", "jetson-orin-nano-cpu")
# Generous limits for a cold machine: TF import + training happen before these start.
REGISTER_TIMEOUT_S = 60.0
DEPLOY_TIMEOUT_S = 180.0
# Benchmark settings the demo agents use: enough runs for a meaningful p99.
DEMO_RUNS = 100
# Requests the demo's application sends to each device's inference service: enough for a p99.
DEMO_REQUESTS = 300
# Telemetry interval of the demo agents: short, so the report follows within seconds.
DEMO_TELEMETRY_S = 1.0
TELEMETRY_TIMEOUT_S = 30.0
# The demo's rollout: one canary device, then the rest; any failure or gate violation aborts.
DEMO_POLICY = Policy(
    waves=parse_waves("1d,100"),
    max_failures=Threshold(count=0),
    gates=(Gate("p95_ms", 100.0), Gate("peak_rss_mb", 768.0)),
    device_timeout_s=DEPLOY_TIMEOUT_S,
    retries=1,
    benchmark_runs=DEMO_RUNS,
)


def cache_dir() -> Path:
    """Where the demo keeps its trained model between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefleet"


class Progress:
    """Timestamped progress lines on stderr, so stdout stays the table or the JSON."""

    def __init__(self) -> None:
        """Start the clock."""
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        """Print one progress line."""
        typer.echo(f"[{time.monotonic() - self.t0:6.1f}s] {message}", err=True)


def write_agent_config(root: Path, device_id: str, profile_id: str, broker: str) -> Path:
    """Write an agent.toml for one demo device, with its profile's power model."""
    profile = firmware_profiles.load(profile_id)
    config = AgentConfig(
        device_id=device_id,
        data_dir=root / device_id,
        broker=broker,
        profile=profile_id,
        threads=1,
        benchmark_runs=DEMO_RUNS,
        telemetry_interval_s=DEMO_TELEMETRY_S,
        power=PowerModelConfig(
            idle_w=profile.power.idle_w,
            active_w_per_core=profile.power.active_w_per_core,
            accelerator_active_w=profile.power.accelerator_active_w,
        ),
    )
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{device_id}.toml"
    path.write_text(dump_config(config))
    return path


def start_agent(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start one real agent process (the same code a device runs)."""
    log = log_path.open("wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 5.0) -> None:
    """SIGTERM every process we started, then SIGKILL what is still alive."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_registered(fleet: Fleet, ids: list[str], progress: Progress) -> list[str]:
    """Wait until every agent said hello and is online; return the ids still missing."""
    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    while time.monotonic() < deadline:
        online = {d["id"] for d in fleet.devices() if d["online"]}
        missing = [i for i in ids if i not in online]
        if not missing:
            progress(f"{len(ids)} agent(s) registered")
            return []
        time.sleep(0.2)
    return missing


def wait_deployment(fleet: Fleet, deployment_id: str, progress: Progress) -> dict[str, Any]:
    """Follow a rollout until it completes or aborts, showing each state change."""
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    seen: dict[str, str] = {}
    wave = -1
    while True:
        dep = fleet.deployment(deployment_id)
        if dep["wave"] != wave:
            wave = dep["wave"]
            members = [d["device_id"] for d in dep["devices"] if d["wave"] == wave]
            progress(f"wave {wave} ({dep['waves'][wave]['size']}): {', '.join(members)}")
        for d in dep["devices"]:
            device = fleet.device(d["device_id"])
            label = f"{d['state']}/{device['state']}"
            if seen.get(d["device_id"]) != label:
                seen[d["device_id"]] = label
                progress(f"{d['device_id']}: rollout {d['state']}, agent {device['state']}")
        if dep["state"] not in ACTIVE or time.monotonic() > deadline:
            progress(f"rollout {dep['state']} {dep['reason']}".rstrip())
            return dep
        time.sleep(0.2)


def result_rows(fleet: Fleet, dep: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per device: identity, model and the benchmark it reported for this deployment."""
    rows = []
    for d in sorted(dep["devices"], key=lambda d: d["device_id"]):
        device = fleet.device(d["device_id"])
        bench = next(
            (b for b in fleet.benchmarks(d["device_id"], 50) if b["deployment_id"] == dep["id"]),
            None,
        )
        rows.append(
            {
                "device": d["device_id"],
                "profile": device["profile"],
                "runtime": f"{device['runtime']} {device['runtime_version']}",
                "model_sha256": device["model_sha256"],
                "deployment_state": d["state"],
                "detail": d["detail"],
                "benchmark": bench,
            }
        )
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    """The demo's table: one line per device."""
    lines = []
    for r in rows:
        b = r["benchmark"] or {}
        power = (
            f"{num(b.get('power_w'))} W / {num(b.get('energy_mj_per_inference'), 3)} mJ"
            if b
            else "-"
        )
        source = (
            b.get("power_source", "-")
            + (
                " (estimated)"
                if b.get("power_estimated") and "estimated" not in b.get("power_source", "")
                else ""
            )
            if b
            else r["detail"]
        )
        lines.append(
            (
                r["device"],
                r["profile"],
                r["runtime"],
                short(r["model_sha256"]),
                num(b.get("p50_ms"), 3),
                num(b.get("p99_ms"), 3),
                num(b.get("peak_rss_mb"), 1),
                power,
                source,
            )
        )
    typer.echo(
        table(
            lines,
            [
                "DEVICE",
                "PROFILE",
                "RUNTIME",
                "MODEL",
                "P50 MS",
                "P99 MS",
                "PEAK RSS MB",
                "POWER / ENERGY PER INF",
                "POWER SOURCE",
            ],
        )
    )


def serve_on_devices(
    home: Path, ids: list[str], x: np.ndarray, y: np.ndarray, progress: Progress
) -> dict[str, dict[str, Any]]:
    """Play the application on each device: DEMO_REQUESTS digits through the agent's local
    inference service (agent.client over its Unix socket), scored against the labels."""
    from agent.client import InferenceClient

    served: dict[str, dict[str, Any]] = {}
    for device_id in ids:
        with InferenceClient(home / "agents" / device_id / "infer.sock") as client:
            correct = 0
            for i in range(DEMO_REQUESTS):
                # Float in, float out: the client quantizes for an int8 model (README).
                out = client.infer(x[i % len(x)][np.newaxis])
                correct += int(np.argmax(np.asarray(out)) == y[i % len(y)])
        served[device_id] = {"requests": DEMO_REQUESTS, "accuracy": correct / DEMO_REQUESTS}
    progress(
        f"application sent {DEMO_REQUESTS} digits to each device's inference service; accuracy "
        + ", ".join(f"{d} {s['accuracy']:.1%}" for d, s in served.items())
    )
    return served


def wait_telemetry(fleet: Fleet, served: dict[str, dict[str, Any]], progress: Progress) -> bool:
    """Wait until every served request is counted in telemetry stored by the controller."""
    deadline = time.monotonic() + TELEMETRY_TIMEOUT_S
    while time.monotonic() < deadline:
        counted = {
            r["device_id"]: r["n"]
            for r in served_by_device(fleet.db.conn)
        }
        if all(counted.get(d, 0) >= s["requests"] for d, s in served.items()):
            progress("telemetry of every request stored by the controller")
            return True
        time.sleep(0.2)
    progress("telemetry did not arrive in time")
    return False


def serve_until_interrupted(home: Path, host: str, port: int, progress: Progress) -> None:
    """Serve the API and dashboard over the demo fleet (still running) until SIGINT/SIGTERM."""
    import signal
    import threading

    from controller.http.server import start_http

    try:
        server, dashboard = start_http(home, host, port)
    except OSError as exc:
        progress(f"error: cannot serve the dashboard on {host}:{port}: {exc} (use --http)")
        raise typer.Exit(2) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    progress(f"dashboard: {dashboard}")
    progress("the demo fleet keeps running; Ctrl-C to stop")
    try:
        stop.wait()
    finally:
        server.stop()


def run_demo(
    *,
    devices: int = 3,
    json_out: bool = False,
    keep: bool = False,
    serve: tuple[str, int] | None = None,
) -> int:
    """Run the whole demo; return the process exit code (non-zero if any device failed).

    With `serve` (host, port), the fleet keeps running afterwards with the HTTP API and the
    dashboard on that address until SIGINT or SIGTERM.
    """
    from controller.cli.telemetry import report_table
    from controller.fleet.telemetry.reports import report as build_report
    from controller.runtime.embedded_broker import start_embedded
    from controller.runtime.service import ControllerService
    from converters.digits import digits_tflite, load_digits_dataset
    from converters.evaluate import write_golden

    progress = Progress()
    home = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    broker = service = None
    try:
        progress("building the digits CNN (trained and converted on first run, then cached)")
        with native_stderr_filtered():  # TensorFlow's C++ logging on a first (training) run
            model = digits_tflite(cache_dir(), recipe="int8")
        progress(f"model ready: {model.name} ({model.stat().st_size / 1024:.1f} KiB, int8)")
        broker = start_embedded(home / "broker")
        progress(f"embedded {broker.kind} broker on {broker.url}")
        service = ControllerService(home, broker.url)
        service.start()
        ids = [f"demo-{i + 1}" for i in range(devices)]
        for device_id, profile in zip(ids, itertools.cycle(DEMO_PROFILES), strict=False):
            cfg = write_agent_config(home / "agents", device_id, profile, broker.url)
            procs.append(start_agent(cfg, home / "agents" / f"{device_id}.log"))
        progress(f"started {devices} agent process(es); waiting for their hello")
        fleet = Fleet(home)
        missing = wait_registered(fleet, ids, progress)
        if missing:
            progress(f"agents never registered: {', '.join(missing)} (logs in {home / 'agents'})")
            keep = True
            return 1
        with native_stderr_filtered():
            golden = write_golden(model, load_digits_dataset().x_val, home / "digits.golden.npz")
        fleet.add_model(model, name="digits-cnn", version="1", golden=golden)
        dep = fleet.start_rollout("digits-cnn:1", ",".join(ids), DEMO_POLICY)
        progress(
            f"rollout {dep['id']} of {short(dep['devices'][0]['artifact_sha256'])} (with golden "
            f"data for the self-test) to {len(ids)} device(s), waves "
            f"{', '.join(w['size'] for w in dep['waves'])}, gates "
            f"{', '.join(dep['policy']['gates'])}"
        )
        dep = wait_deployment(fleet, dep["id"], progress)
        rows = result_rows(fleet, dep)
        failed = [r for r in rows if r["deployment_state"] != DeviceState.SUCCEEDED]
        telemetry: list[dict[str, Any]] = []
        if not failed:
            data = load_digits_dataset()
            served = serve_on_devices(home, ids, data.x_val, data.y_val, progress)
            if not wait_telemetry(fleet, served, progress):
                keep = True
                return 1
            telemetry = build_report(fleet.db, model="digits-cnn:1", by="device")
        if json_out:
            typer.echo(
                as_json(
                    {
                        "deployment": dep["id"],
                        "state": dep["state"],
                        "devices": rows,
                        "telemetry": telemetry,
                    }
                )
            )
        else:
            print_rows(rows)
            if telemetry:
                typer.echo("\nserved through the agents' inference service (telemetry):")
                typer.echo(report_table(telemetry, "device"))
        if failed:
            keep = True
            progress(f"{len(failed)} device(s) failed; logs kept in {home / 'agents'}")
            return 1
        progress(
            f"egress: {service.bytes_published} chunk bytes published for a "
            f"{model.stat().st_size}-byte model to {devices} device(s)"
        )
        if serve is not None:
            serve_until_interrupted(home, *serve, progress)
        return 0
    finally:
        stop_processes(procs)
        if service:
            service.stop()
        if broker:
            broker.stop()
        if keep:
            typer.echo(f"demo data kept in {home}", err=True)
        else:
            shutil.rmtree(home, ignore_errors=True)

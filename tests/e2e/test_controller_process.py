"""`edgefleet up` as a real process: clear port errors, a restart that loses nothing, /metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import InferenceClient, wait_for_service
from agent.protocol import Command, Topics, dump
from controller.brokers.base import BrokerHandle, free_port
from controller.fleet.registry import Fleet
from tests.e2e.brokers import mosquitto_only  # noqa: F401  (is e2e_broker)
from tests.e2e.conftest import DATA, AgentProcess, wait_until

pytestmark = [pytest.mark.e2e]
# e2e_broker is mosquitto only: the restart test needs a persistent session, which amqtt drops.

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


class ControllerProcess:
    """`edgefleet up --broker URL` in its own process, stopped by PID."""

    def __init__(self, home: Path, broker: BrokerHandle, topic_root: str, log: Path) -> None:
        """Remember how to start it."""
        self.args = [
            EDGEFLEET,
            "up",
            "--broker",
            broker.url,
            "--topic-root",
            topic_root,
            "--home",
            str(home),
        ]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process."""
        self.proc = subprocess.Popen(
            self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )

    def wait_connected(self, timeout: float = 30.0) -> None:
        """Wait until its MQTT session is up (and so subscribed): a device's first-ever
        messages reach a controller session only once that session exists on the broker."""
        wait_until(
            lambda: b"agent.protocol.transport: connected to" in self.log.read_bytes(),
            timeout,
            "the controller's MQTT session",
        )

    def stop(self) -> int:
        """SIGTERM by PID and wait for a clean exit."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(15)


@pytest.fixture
def controller_process(
    e2e_broker: BrokerHandle, topic_root: str, tmp_path: Path
) -> Iterator[ControllerProcess]:
    """A controller process on the test broker; stopped at teardown if still running."""
    ctl = ControllerProcess(tmp_path / "ctl", e2e_broker, topic_root, tmp_path / "ctl.log")
    ctl.start()
    yield ctl
    if ctl.proc is not None and ctl.proc.poll() is None:
        ctl.proc.kill()
        ctl.proc.wait()


def test_up_refuses_a_taken_port_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        out = subprocess.run(
            [EDGEFLEET, "up", "--port", str(port), "--home", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2
    assert f"port {port}" in out.stderr and "already in use" in out.stderr


def test_controller_restart_loses_no_event(
    controller_process: ControllerProcess,
    start_agent: Callable[..., AgentProcess],
    mqtt_probe: Any,
    e2e_broker: BrokerHandle,
    topic_root: str,
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path / "ctl")
    agent = start_agent("dev-r")
    wait_until(
        lambda: any(d["id"] == "dev-r" and d["online"] for d in fleet.devices()),
        30,
        "hello through the controller process",
    )
    # Deploy through the real CLI into the same data dir; the running controller publishes it.
    deploy = subprocess.run(
        [
            EDGEFLEET,
            "deploy",
            str(DATA / "tiny_int8.tflite"),
            "--to",
            "dev-r",
            "--home",
            str(tmp_path / "ctl"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert deploy.returncode == 0, deploy.stderr
    wait_until(lambda: len(fleet.benchmarks("dev-r")) == 1, 60, "first benchmark")

    assert controller_process.stop() == 0, controller_process.log.read_text()[-2000:]
    # While the controller is down, the device reports a benchmark (a command sent directly).
    probe = mqtt_probe(e2e_broker)
    command = Command(command_id="while-down", action="benchmark", runs=10)
    probe.publish(Topics(topic_root).cmd("dev-r"), dump(command))
    events = f"{topic_root}/devices/dev-r/events"
    probe.subscribe(events)
    probe.wait_for(events, lambda m: b'"kind":"benchmark"' in m.payload, timeout=30)
    assert len(fleet.benchmarks("dev-r")) == 1, "nothing stored while the controller is down"

    controller_process.start()
    wait_until(
        lambda: len(fleet.benchmarks("dev-r")) == 2,
        30,
        "the event queued by the broker during the restart",
    )
    assert fleet.benchmarks("dev-r")[0]["runs"] == 10
    assert agent.alive


def test_agent_that_connected_before_the_controller_is_still_registered(
    e2e_broker: BrokerHandle,
    start_agent: Callable[..., AgentProcess],
    mqtt_probe: Any,
    topic_root: str,
    tmp_path: Path,
) -> None:
    """Its hello went nowhere (no controller session yet); its retained status is enough."""
    start_agent("early-bird")
    probe = mqtt_probe(e2e_broker)
    status = f"{topic_root}/devices/early-bird/status"
    probe.subscribe(status)
    probe.wait_for(status, lambda m: b'"online":true' in m.payload, timeout=30)
    ctl = ControllerProcess(tmp_path / "late", e2e_broker, topic_root, tmp_path / "late.log")
    ctl.start()
    fleet = Fleet(tmp_path / "late")
    try:
        row = wait_until(
            lambda: (
                fleet.has_device("early-bird")
                and fleet.device("early-bird")["facts"]
                and fleet.device("early-bird")
            ),
            30,
            "registration of an agent older than us",
        )
        assert row["online"] and row["runtime"]
    finally:
        ctl.stop()


def test_rollout_survives_a_controller_sigkill_between_waves(
    controller_process: ControllerProcess,
    start_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    """`rollout start` through the CLI; the controller dies by SIGKILL after wave 0 and is
    restarted: the rollout finishes, and every device has exactly one verdict."""
    home = tmp_path / "ctl"
    fleet = Fleet(home)
    devices = ["kill-a", "kill-b", "kill-c"]
    for device in devices:
        start_agent(device, profile="rpi4")
    wait_until(
        lambda: {d["id"] for d in fleet.devices() if d["online"] and d["facts"]} >= set(devices),
        30,
        "hello from every agent",
    )

    def cli(*args: str) -> Any:
        out = subprocess.run(
            [EDGEFLEET, *args, "--home", str(home), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    cli("models", "add", str(DATA / "tiny_int8.tflite"), "--name", "m", "--version", "1")
    rollout = cli(
        "rollout", "start", "m:1", "--to", "kill-*", "--waves", "1d,100",
        "--max-failures", "0", "--device-timeout", "2m", "--gate", "p95_ms<=1000",
    )  # fmt: skip
    first = next(d["device_id"] for d in rollout["devices"] if d["wave"] == 0)
    wait_until(
        lambda: (
            fleet.deployment(rollout["id"])["wave"] == 1
            or any(d["state"] == "succeeded" for d in fleet.deployment(rollout["id"])["devices"])
        ),
        60,
        f"the canary {first} to succeed",
    )
    assert controller_process.proc is not None
    os.kill(controller_process.proc.pid, signal.SIGKILL)
    controller_process.proc.wait(10)
    controller_process.start()
    final = wait_until(
        lambda: (r := cli("rollout", "status", rollout["id"]))["state"] != "running" and r,
        90,
        "the rollout to finish after the restart",
    )
    assert final["state"] == "completed", final
    assert final["counts"] == {"succeeded": 3}
    verdicts = fleet.db.query(
        "SELECT device_id, COUNT(*) AS n FROM events WHERE deployment_id = ? "
        "AND kind = 'benchmark' GROUP BY device_id",
        (rollout["id"],),
    )
    assert {r["device_id"]: r["n"] for r in verdicts} == dict.fromkeys(devices, 1)


def test_up_serves_prometheus_metrics_of_a_serving_device(
    e2e_broker: BrokerHandle,
    topic_root: str,
    start_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    port = free_port()
    ctl = ControllerProcess(tmp_path / "ctl", e2e_broker, topic_root, tmp_path / "ctl.log")
    ctl.args += ["--metrics", f"127.0.0.1:{port}"]
    ctl.start()
    ctl.wait_connected()  # else the agent's first telemetry record may precede the session
    try:
        fleet = Fleet(tmp_path / "ctl")
        agent = start_agent("dev-m", telemetry_interval_s=0.5)
        wait_until(lambda: fleet.has_device("dev-m") and fleet.device("dev-m")["online"], 30, "hi")
        dep = fleet.deploy(DATA / "tiny_fp32.tflite", devices=["dev-m"], name="tiny", version="1")
        wait_until(
            lambda: fleet.deployment(dep["id"])["devices"][0]["state"] == "succeeded", 60, "deploy"
        )
        assert agent.config.socket_path is not None
        wait_for_service(agent.config.socket_path, 10)
        with InferenceClient(agent.config.socket_path) as client:
            spec = client.model_info()["inputs"][0]
            x = np.zeros(spec["shape"], dtype=spec["dtype"])
            for _ in range(120):
                client.infer(x)

        from prometheus_client.parser import text_string_to_metric_families

        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            return {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }

        count = (
            "edgefleet_inference_latency_seconds_count",
            (("model", "tiny:1"), ("profile", "rpi4")),
        )
        wait_until(
            lambda: scrape().get(count) == 120,
            30,
            "120 served inferences in the per-profile histogram",
        )
        samples = scrape()
        online = ("edgefleet_devices", (("online", "1"), ("profile", "rpi4"), ("state", "active")))
        assert samples[online] == 1
        assert samples[("edgefleet_telemetry_records_stored_total", ())] >= 1
        deploys = [v for (name, labels), v in samples.items() if name == "edgefleet_rollouts"]
        assert sum(deploys) == 1  # running or already completed: the tick decides when
        assert samples[("edgefleet_telemetry_gaps_open", ())] == 0
    finally:
        assert ctl.stop() == 0, ctl.log.read_text()[-2000:]

"""`edgefleet simulate --processes N`: agents sharded over child processes, figures merged in
the parent, and no child outliving its parent however the parent ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from agent.protocol import Status, parse
from controller.brokers.base import BrokerHandle
from controller.fleet.registry import Fleet
from controller.runtime.service import ControllerService
from controller.simulate import Faults, Simulation, assign_faults, parse_fault
from controller.simulate.shard import ShardedSimulation, default_processes, make_simulation
from tests.mqtt_helpers import MqttProbe
from tests.polling import wait_until

DATA = Path(__file__).resolve().parent.parent / "data"
TINY, OTHER = DATA / "tiny_int8.tflite", DATA / "tiny_fp32.tflite"
ROOT = Path(__file__).resolve().parent.parent.parent
# This tree's CLI (a console script could belong to another checkout's install).
EDGEFLEET = [sys.executable, "-m", "controller.cli.main"]

ProbeFactory = Callable[..., MqttProbe]


@contextmanager
def controller(broker: BrokerHandle, home: Path, topic_root: str) -> Iterator[ControllerService]:
    """The real controller service on the test's broker and topic root."""
    service = ControllerService(home, broker.url, topic_root=topic_root, client_id="ctl-shard")
    service.start()
    try:
        assert service.ready.wait(15), "controller did not connect"
        yield service
    finally:
        service.stop()


def test_default_processes_and_the_one_process_case() -> None:
    """One process per 2,000 devices up to the CPUs; 1 means the in-process Simulation."""
    assert default_processes(1) == 1 and default_processes(2000) == 1
    cpus = len(os.sched_getaffinity(0))
    assert default_processes(2001) == min(2, cpus)
    assert default_processes(100_000) == cpus
    assert isinstance(make_simulation("mqtt://127.0.0.1:1", 3), Simulation)
    assert isinstance(make_simulation("mqtt://127.0.0.1:1", 3, processes=2), ShardedSimulation)


@pytest.mark.integration
def test_shards_run_the_same_fleet_and_the_parent_merges_their_figures(
    mosquitto_broker: BrokerHandle, topic_root: str, tmp_path: Path
) -> None:
    """12 devices on 2 processes behave as one fleet: same ids, profiles and faults as one
    process would give them; a deploy through the real controller activates every device; the
    parent's snapshot adds the shards up and lists each process; requests reach the shard that
    runs the device (device, set_faults, devices_with)."""
    faults = [parse_fault("slow=2:3")]
    sim = ShardedSimulation(
        mosquitto_broker.url, 12, processes=2, topic_root=topic_root, faults=faults, seed=7
    )
    with controller(mosquitto_broker, tmp_path, topic_root) as _service:
        sim.start()
        try:
            assert sim.wait_connected(60), f"only {sim.counters.connected} connected"
            assert len(set(sim.pids)) == 2
            expected = sorted(f"sim-{i:04d}" for i in assign_faults(faults, 12, 7))
            assert sim.devices_with("slow") == expected
            fleet = Fleet(tmp_path)
            wait_until(
                lambda: sum(d["online"] for d in fleet.devices()) == 12, 30, "12 devices online"
            )
            fleet.deploy(TINY, devices=sim.device_ids)
            wait_until(lambda: sim.counters.activated == 12, 60, "12 activations")
            snap = sim.snapshot()
            assert snap["devices"] == 12 and snap["connected"] == 12
            assert snap["states"] == {"active": 12} and snap["errors"] == 0
            assert snap["artifacts_verified"] == 2, "one whole-file hash per process"
            assert snap["update_latency"]["count"] == 12
            assert snap["update_latency"]["p50_s"] <= snap["update_latency"]["max_s"]
            processes = snap["processes"]
            assert sorted(p["pid"] for p in processes) == sorted(sim.pids)
            assert [p["devices"] for p in processes] == [6, 6]
            assert snap["rss_per_device_kb"] == max(p["rss_per_device_kb"] for p in processes)
            for device_id in ("sim-0000", "sim-0001"):  # one on each shard
                assert sim.device(device_id)["state"] == "active"
            profiles = {d["id"]: d["profile"] for d in fleet.devices()}
            one = Simulation(mosquitto_broker.url, 12, topic_root=topic_root, seed=7)
            assert {a.device_id: a.profile.id for a in one.agents} == profiles
            sim.set_faults(["sim-0004", "sim-0005"], Faults(nan=True))
            assert sim.devices_with("nan") == ["sim-0004", "sim-0005"]
            fleet.deploy(OTHER, devices=sim.device_ids)
            wait_until(lambda: sim.counters.failed == 2, 60, "the two nan devices failing")
            wait_until(lambda: sim.counters.activated == 22, 60, "10 more activations")
            assert sim.device("sim-0005")["state"] == "failed"
            assert sim.snapshot()["update_latency"]["count"] == 24
            fleet.close()
        finally:
            sim.stop()
    assert all(not psutil.pid_exists(pid) or _zombie(pid) for pid in sim.pids)


def _zombie(pid: int) -> bool:
    """Whether a process has exited but was not reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.integration
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_no_simulation_process_outlives_the_cli(
    how: str, mosquitto_broker: BrokerHandle, topic_root: str, mqtt_probe: ProbeFactory
) -> None:
    """Kill `edgefleet simulate --processes 2` by its PID: SIGTERM and Ctrl-C end it with the
    merged summary; even SIGKILL leaves no child behind, and every device says goodbye."""
    probe = mqtt_probe(mosquitto_broker)
    probe.subscribe(f"{topic_root}/devices/+/status")
    cli = subprocess.Popen(
        [*EDGEFLEET, "simulate", "--devices", "20", "--processes", "2", "--broker",
         mosquitto_broker.url, "--topic-root", topic_root, "--telemetry-interval", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )  # fmt: skip
    try:
        parent = psutil.Process(cli.pid)
        wait_until(lambda: len(parent.children()) == 2 or cli.poll() is not None, 60, "2 shards")
        assert cli.poll() is None, cli.communicate()
        children = parent.children()
        wait_until(lambda: len(_last_status(probe, topic_root)) == 20, 60, "20 online statuses")
        assert all(s.online for s in _last_status(probe, topic_root).values())
        cli.send_signal(getattr(signal, how))
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"{how}: simulation processes {[p.pid for p in alive]} outlived the CLI"
    wait_until(
        lambda: not any(s.online for s in _last_status(probe, topic_root).values()),
        30,
        "every device offline",
    )
    if how == "SIGKILL":
        assert cli.returncode == -signal.SIGKILL
        return
    assert cli.returncode == 0, err
    assert "interrupted; disconnecting" in err
    snap = json.loads(out)
    assert snap["devices"] == 20 and snap["connected"] == 20 and snap["processes_lost"] == 0
    assert sorted(p["pid"] for p in snap["processes"]) == sorted(c.pid for c in children)


def _last_status(probe: MqttProbe, root: str) -> dict[str, Status]:
    """Each device's last non-empty status the probe saw."""
    out: dict[str, Status] = {}
    for message in probe.messages(f"{root}/devices/+/status"):
        if message.payload:
            status = parse(message.payload, Status)
            out[status.device_id] = status
    return out

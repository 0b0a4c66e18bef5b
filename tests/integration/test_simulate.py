"""Tests for controller/simulate/: simulated agents on real brokers with the real controller."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import typer
from typer.testing import CliRunner

import firmware_profiles
from agent.protocol import (
    ArtifactRef,
    Command,
    Desired,
    Event,
    GoldenRef,
    Manifest,
    Need,
    Status,
    Topics,
    dump,
    parse,
)
from controller.brokers.base import BrokerHandle
from controller.brokers.mosquitto import start_mosquitto
from controller.cli.simulate import simulate_command
from controller.fleet.artifacts import build_manifest
from controller.fleet.registry import Fleet
from controller.runtime.service import ControllerService
from controller.simulate import (
    LATENCY_SHAPE,
    NO_FAULTS,
    Faults,
    FaultSpec,
    Simulation,
    SimulationError,
    assign_faults,
    parse_fault,
    synth_figures,
    synth_report,
)
from tests.integration.simulation import CHUNK, multi_chunk_model, online, running
from tests.mqtt_helpers import MqttProbe, ReceivedMessage
from tests.polling import wait_until

DATA = Path(__file__).resolve().parent.parent / "data"
TINY = DATA / "tiny_int8.tflite"
T = TypeVar("T")

ProbeFactory = Callable[..., MqttProbe]


# =========================================================================== helpers


@contextmanager
def controller(broker: BrokerHandle, home: Path, topic_root: str) -> Iterator[ControllerService]:
    """The real controller service on the test's broker and topic root."""
    service = ControllerService(
        home, broker.url, topic_root=topic_root, client_id=f"ctl-{topic_root.split('/')[1]}"
    )
    service.start()
    try:
        assert service.ready.wait(15), "controller did not connect"
        yield service
    finally:
        service.stop()


def events(probe: MqttProbe, root: str, device: str | None = None) -> list[Event]:
    """Every event the probe saw (of one device, or all)."""
    pattern = f"{root}/devices/{device or '+'}/events"
    return [parse(m.payload, Event) for m in probe.messages(pattern)]


def statuses(probe: MqttProbe, root: str, device: str) -> list[Status]:
    """Every non-empty status of one device the probe saw, in order."""
    return [
        parse(m.payload, Status)
        for m in probe.messages(f"{root}/devices/{device}/status")
        if m.payload
    ]


def terminal(probe: MqttProbe, root: str, device: str, generation: int) -> Event | None:
    """The activated or failed event of one device for one generation, if it arrived."""
    for event in events(probe, root, device):
        if event.generation == generation and event.event_id.endswith(("-active", "-failed")):
            return event
    return None


def current_generation(fleet: Fleet, device: str) -> int:
    """The desired generation the controller assigned to a device."""
    return int(fleet.device(device)["desired_generation"])


# =========================================================================== pure helpers


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("nan:5%", FaultSpec("nan", None, percent=5.0, text="nan:5%")),
        ("slow=3:10%", FaultSpec("slow", 3.0, percent=10.0, text="slow=3:10%")),
        ("offline=30:2%", FaultSpec("offline", 30.0, percent=2.0, text="offline=30:2%")),
        ("crash:1", FaultSpec("crash", None, count=1, text="crash:1")),
        ("drop=0.2:3", FaultSpec("drop", 0.2, count=3, text="drop=0.2:3")),
    ],
)
def test_parse_fault_accepts_the_documented_forms(spec: str, expected: FaultSpec) -> None:
    """Every form in the CLI help parses to the fault, its value and the count or share."""
    assert parse_fault(spec) == expected


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nan", "expected KIND"),
        ("boom:1", "unknown fault 'boom'"),
        ("slow:1", "slow needs"),
        ("slow=0:1", "slow value must be"),
        ("slow=x:1", "slow value must be"),
        ("drop=1.5:1", "drop value must be"),
        ("nan=2:1", "nan takes no value"),
        ("nan:0", "count must be"),
        ("nan:-1", "count must be"),
        ("nan:150%", "percentage must be"),
        ("nan:x%", "percentage must be"),
        ("offline=30:", "count must be"),
    ],
)
def test_parse_fault_rejects_bad_specs_naming_them(spec: str, needle: str) -> None:
    """A bad spec raises with the spec itself and what is wrong in the message."""
    with pytest.raises(SimulationError) as err:
        parse_fault(spec)
    assert repr(spec) in str(err.value)
    assert needle in str(err.value)


def test_assign_faults_is_deterministic_disjoint_and_sized() -> None:
    """Same seed, same devices; percentages round (at least one); specs avoid overlapping."""
    specs = [parse_fault("nan:5%"), parse_fault("crash:2"), parse_fault("slow=3:10%")]
    first = assign_faults(specs, 100, seed=7)
    assert first == assign_faults(specs, 100, seed=7)
    assert first != assign_faults(specs, 100, seed=8)
    assert sum(f.nan for f in first.values()) == 5
    assert sum(f.crash for f in first.values()) == 2
    assert sum(f.slow == 3.0 for f in first.values()) == 10
    assert len(first) == 17  # disjoint while enough fault-free devices remain
    assert len(assign_faults([parse_fault("nan:1%")], 10, seed=0)) == 1


def test_synthesized_report_scales_with_size_cores_and_slowness() -> None:
    """Latency grows with size and slow=F, shrinks with cores; every field is filled."""
    profiles = firmware_profiles.load_all()
    rpi4, gateway = profiles["rpi4"], profiles["x86-64-gateway"]
    small, _ = synth_figures(rpi4, 1024 * 1024, "k")
    big, peak = synth_figures(rpi4, 8 * 1024 * 1024, "k")
    slow, _ = synth_figures(rpi4, 1024 * 1024, "k", slow=3.0)
    assert big > 7 * small and slow == pytest.approx(3 * small)
    fast, _ = synth_figures(gateway, 1024 * 1024, "k")
    assert fast == pytest.approx(small * rpi4.cpu.cores / gateway.cpu.cores, rel=0.07)
    report = synth_report(rpi4, "a" * 64, 8 * 1024 * 1024, big, peak, runs=20, warmup=3)
    assert (report.runs, report.warmup) == (20, 3)
    assert report.power_estimated and report.power_source == "estimated:profile"
    assert report.power_w == pytest.approx(rpi4.power.estimate_w(busy_cores=1), abs=1e-3)
    assert report.runtime == rpi4.runtime.name and report.runtime_version == rpi4.runtime.version
    assert report.p99_ms == pytest.approx(big * LATENCY_SHAPE["p99_ms"], rel=1e-3)
    assert report.min_ms < report.p50_ms < report.p90_ms < report.p95_ms < report.p99_ms
    assert report.energy_mj_per_inference == pytest.approx(report.power_w * report.mean_ms, 1e-3)


def test_simulation_rejects_bad_profiles_and_prefixes() -> None:
    """Unknown profiles, MCU profiles and prefixes that make invalid ids fail before connecting."""
    with pytest.raises(SimulationError, match="unknown profile 'nope'"):
        Simulation("mqtt://127.0.0.1:1", 2, profiles=["nope"])
    with pytest.raises(SimulationError, match="does not run the agent"):
        Simulation("mqtt://127.0.0.1:1", 2, profiles=["corstone-300-u55"])
    with pytest.raises(SimulationError, match="bad --prefix"):
        Simulation("mqtt://127.0.0.1:1", 2, prefix="a/b")
    with pytest.raises(ValueError, match="no scheme"):
        Simulation("127.0.0.1:1883", 2)


# =========================================================================== against the controller


@pytest.mark.integration
def test_agents_register_with_facts_from_their_profiles(
    mosquitto_broker: BrokerHandle, topic_root: str, tmp_path: Path
) -> None:
    """Hello carries the profile's arch, cores, RAM and runtime; the controller matches it."""
    profiles = ["rpi4", "pixel-8", "x86-64-gateway"]
    sim = Simulation(mosquitto_broker.url, 6, profiles=profiles, topic_root=topic_root)
    with controller(mosquitto_broker, tmp_path, topic_root), running(sim):
        fleet = Fleet(tmp_path)
        wait_until(lambda: online(fleet, sim.device_ids), 20, "registration")
        for index, device in enumerate(fleet.devices()):
            profile = firmware_profiles.load(profiles[index % 3])
            assert device["id"] == f"sim-{index:04d}"
            assert device["profile"] == profile.id
            assert device["declared_profile"] == profile.id
            assert device["facts"]["arch"] == profile.cpu.arch
            assert device["facts"]["cpu_count"] == profile.cpu.cores
            assert device["facts"]["ram_mb"] == profile.memory.ram_mb
            assert device["runtime"] == profile.runtime.name
            assert device["runtime_version"] == profile.runtime.version
        fleet.close()


@pytest.mark.integration
def test_deploy_activates_every_device_once_per_artifact(
    mosquitto_broker: BrokerHandle, topic_root: str, tmp_path: Path
) -> None:
    """20 agents, a real tiny .tflite: all activate, each benchmark lands in the database, and
    controller egress is whole artifacts per publication, not one copy per device."""
    sim = Simulation(mosquitto_broker.url, 20, topic_root=topic_root)
    with controller(mosquitto_broker, tmp_path, topic_root) as service, running(sim):
        fleet = Fleet(tmp_path)
        wait_until(lambda: online(fleet, sim.device_ids), 20, "registration")
        deployment = fleet.deploy(TINY, devices=sim.device_ids)
        sha = deployment["devices"][0]["artifact_sha256"]
        wait_until(
            lambda: all(fleet.benchmarks(d) for d in sim.device_ids), 30, "20 benchmark rows"
        )
        for device_id in sim.device_ids:
            row = fleet.device(device_id)
            assert row["model_sha256"] == sha and row["state"] == "active"
            (report,) = fleet.benchmarks(device_id)
            assert report["model_sha256"] == sha
            assert report["power_estimated"] is True
            assert report["power_source"] == "estimated:profile"
            assert report["runs"] == 50 and report["warmup"] == 5
            assert report["deployment_id"] == deployment["id"]
        size, chunks = TINY.stat().st_size, -(-TINY.stat().st_size // CHUNK)
        settled: list[int] = []

        def quiet() -> bool:
            """True once the controller published nothing new for half a second."""
            settled.append(service.chunks_published)
            time.sleep(0.5)
            return service.chunks_published == settled[-1]

        wait_until(quiet, 15, "the controller to stop publishing chunks")
        print(
            f"controller published {service.chunks_published} chunks "
            f"({service.bytes_published} bytes) for a {size}-byte artifact to 20 devices"
        )
        # Whole artifacts: once retained, plus once per coalescing window of Need requests;
        # a handful of copies, not one per device.
        assert service.chunks_published % chunks == 0
        assert service.bytes_published <= 5 * size
        assert sim.counters.activated == 20 and sim.counters.failed == 0
        assert sim.counters.files_verified == 20
        assert sim.counters.artifacts_verified == 1  # one whole-file hash for the process
        assert sim.counters.chunks_rejected == 0 and sim.counters.errors == 0
        fleet.close()


@pytest.mark.integration
def test_faults_nan_crash_offline(
    mosquitto_broker: BrokerHandle,
    topic_root: str,
    tmp_path: Path,
    mqtt_probe: ProbeFactory,
) -> None:
    """After a clean first rollout: nan devices fail self-testing and keep the old model; the
    crash device drops (its will fires), comes back and reports the crash; the offline device
    drops mid-download, comes back and asks only for the chunks it lacks."""
    probe = mqtt_probe(mosquitto_broker)
    probe.subscribe(f"{topic_root}/devices/+/events")
    probe.subscribe(f"{topic_root}/devices/+/status")
    probe.subscribe(f"{topic_root}/artifacts/+/need")
    sim = Simulation(mosquitto_broker.url, 8, topic_root=topic_root, repair_interval_s=0.5)
    ids = sim.device_ids
    nan, crash, offline, healthy = ids[:2], ids[2], ids[3], ids[4:]
    with controller(mosquitto_broker, tmp_path, topic_root), running(sim):
        fleet = Fleet(tmp_path)
        wait_until(lambda: online(fleet, ids), 20, "registration")
        first = fleet.deploy(TINY, devices=ids)["devices"][0]["artifact_sha256"]
        wait_until(lambda: sim.counters.activated == 8, 30, "the clean first rollout")
        sim.set_faults(nan, Faults(nan=True))
        sim.set_faults([crash], Faults(crash=True))
        sim.set_faults([offline], Faults(offline_s=2.0))
        model = multi_chunk_model(tmp_path / "six.tflite", 6, seed=1)
        second = fleet.deploy(model, devices=ids)["devices"][0]["artifact_sha256"]
        gen = {d: current_generation(fleet, d) for d in ids}
        wait_until(lambda: not fleet.device(crash)["online"], 15, "the crash device's will")
        wait_until(
            lambda: all(terminal(probe, topic_root, d, gen[d]) for d in ids), 30, "all outcomes"
        )
        for device in nan:
            event = terminal(probe, topic_root, device, gen[device])
            assert event is not None and event.kind == "error" and event.state == "failed"
            assert event.stage == "self-testing"
            assert event.message == "self-test failed: output 0 is not finite (NaN or Inf)"
            assert sim.device(device)["model_sha256"] == first
        crashed = terminal(probe, topic_root, crash, gen[crash])
        assert crashed is not None and crashed.kind == "error" and crashed.stage == "self-testing"
        assert "model crashed the self-test (signal 11)" in crashed.message
        assert sim.device(crash)["model_sha256"] == first
        crash_states = statuses(probe, topic_root, crash)
        assert any(not s.online for s in crash_states), "no offline status (will) seen"
        assert crash_states[-1].online and crash_states[-1].model_sha256 == first
        for device in [offline, *healthy]:
            wait_until(lambda d=device: fleet.device(d)["model_sha256"] == second, 10, device)
            assert sim.device(device)["previous_sha256"] == first
        asked = [
            parse(m.payload, Need).chunks
            for m in probe.messages(f"{topic_root}/artifacts/{second}/need")
            if parse(m.payload, Need).device_id == offline
        ]
        # Chunks are retained on the broker: the device never asks for all of them, and after
        # its outage it asks only for the gaps its bitmap shows.
        assert asked and all(0 < len(a) < 6 for a in asked), asked
        assert any(not s.online for s in statuses(probe, topic_root, offline))
        wait_until(lambda: online(fleet, ids), 10, "everyone back online")
        for device in [*nan, crash]:
            assert fleet.device(device)["model_sha256"] == first
        fleet.close()


@pytest.mark.integration
def test_commands_once_rollback_and_stale_generation(
    mosquitto_broker: BrokerHandle,
    topic_root: str,
    tmp_path: Path,
    mqtt_probe: ProbeFactory,
) -> None:
    """A command delivered twice runs once (one command event); rollback swaps the models; a
    lower desired generation is ignored."""
    probe = mqtt_probe(mosquitto_broker)
    probe.subscribe(f"{topic_root}/devices/+/events")
    topics = Topics(topic_root)
    sim = Simulation(mosquitto_broker.url, 2, topic_root=topic_root)
    device = sim.device_ids[0]
    with controller(mosquitto_broker, tmp_path, topic_root), running(sim):
        fleet = Fleet(tmp_path)
        wait_until(lambda: online(fleet, sim.device_ids), 20, "registration")
        first = fleet.deploy(TINY, devices=[device])["devices"][0]["artifact_sha256"]
        wait_until(lambda: sim.counters.activated == 1, 20, "first model")
        second = fleet.deploy(DATA / "tiny_fp32.tflite", devices=[device])["devices"][0][
            "artifact_sha256"
        ]
        wait_until(lambda: sim.counters.activated == 2, 20, "second model")

        command_id = fleet.send_command(device, "benchmark", runs=7, warmup=1)
        wait_until(lambda: fleet.command(command_id)["completed"], 15, "benchmark command")
        again = Command(command_id=command_id, action="benchmark", runs=7, warmup=1)
        probe.publish(topics.cmd(device), dump(again))
        wait_until(lambda: sim.counters.commands_repeated == 1, 10, "the repeated delivery")
        time.sleep(0.3)
        answers = [e for e in events(probe, topic_root, device) if e.event_id == command_id]
        assert len(answers) == 1 and answers[0].kind == "command"
        assert sim.counters.commands_handled == 1
        stored = fleet.db.query(
            "SELECT COUNT(*) AS n FROM events WHERE device_id = ? AND kind = 'command'", (device,)
        )
        assert stored[0]["n"] == 1
        bench = [
            e for e in events(probe, topic_root, device) if e.event_id == f"{command_id}-bench"
        ]
        assert len(bench) == 1 and bench[0].benchmark is not None
        assert (bench[0].benchmark.runs, bench[0].benchmark.warmup) == (7, 1)

        rollback = fleet.send_command(device, "rollback")
        wait_until(lambda: fleet.command(rollback)["completed"], 15, "rollback command")
        wait_until(lambda: fleet.device(device)["model_sha256"] == first, 10, "rolled back")
        assert fleet.device(device)["previous_sha256"] == second
        assert sim.device(device)["state"] == "rolled_back"

        applied = sim.device(device)["generation"]
        stale = Desired(
            generation=applied - 1,
            deployment_id="dep-stale",
            artifact=ArtifactRef(sha256=second, size=1, name="stale", version="1"),
        )
        probe.publish(topics.desired(device), dump(stale), retain=True)
        wait_until(lambda: sim.counters.stale_ignored == 1, 10, "the stale generation")
        time.sleep(0.3)
        assert sim.device(device)["model_sha256"] == first
        assert sim.device(device)["generation"] == applied
        assert not [e for e in events(probe, topic_root, device) if e.generation == applied - 1]
        fleet.close()


@pytest.mark.integration
def test_drop_fault_is_repaired_by_the_broker_alone(
    mosquitto_broker: BrokerHandle, topic_root: str, tmp_path: Path
) -> None:
    """Agents that lose half their chunks re-subscribe the missing ones after a quiet repair
    interval and finish: the broker re-sends its retained copies, the controller publishes
    the artifact once and is never asked (docs/rollouts.md, "Distribution")."""
    sim = Simulation(
        mosquitto_broker.url,
        4,
        topic_root=topic_root,
        faults=[parse_fault("drop=0.5:4")],
        repair_interval_s=0.3,
    )
    with controller(mosquitto_broker, tmp_path, topic_root) as service, running(sim):
        fleet = Fleet(tmp_path)
        wait_until(lambda: online(fleet, sim.device_ids), 20, "registration")
        fleet.deploy(multi_chunk_model(tmp_path / "eight.tflite", 8, 2), devices=sim.device_ids)
        wait_until(lambda: sim.counters.activated == 4, 30, "all four activated")
        assert sim.counters.chunks_dropped > 0
        assert sim.counters.repair_rounds > 4  # every agent had to repair, most more than once
        # A round whose chunks were all dropped sends a `need`; the controller knows the broker
        # still holds them (published retained within the round) and publishes nothing again.
        assert service.chunks_published == 8  # egress: the 8-chunk artifact, once
        assert service.repairs_coalesced >= sim.counters.needs_sent
        fleet.close()


@pytest.mark.integration
def test_deploy_on_amqtt(amqtt_broker: BrokerHandle, topic_root: str, tmp_path: Path) -> None:
    """The embedded amqtt broker (MQTT 3.1.1 only) carries the same flow."""
    sim = Simulation(amqtt_broker.url, 5, topic_root=topic_root)
    with controller(amqtt_broker, tmp_path, topic_root), running(sim):
        fleet = Fleet(tmp_path)
        wait_until(lambda: online(fleet, sim.device_ids), 20, "registration")
        fleet.deploy(TINY, devices=sim.device_ids)
        wait_until(lambda: all(fleet.benchmarks(d) for d in sim.device_ids), 30, "benchmarks")
        assert sim.counters.activated == 5 and sim.counters.errors == 0
        fleet.close()


@pytest.mark.integration
def test_agents_reconnect_after_a_broker_restart(tmp_path: Path, mosquitto_binary: str) -> None:
    """A broker that goes away and comes back on the same port gets every agent back."""
    broker = start_mosquitto(tmp_path / "mosquitto", binary=mosquitto_binary)
    sim = Simulation(broker.url, 20, topic_root="test/restart/edgefleet/v1")
    try:
        with running(sim):
            broker.stop()
            wait_until(lambda: sim.counters.connected == 0, 10, "every client to notice")
            broker = start_mosquitto(tmp_path / "mosquitto", port=broker.port)
            assert sim.wait_connected(30), f"{sim.counters.connected} of 20 came back"
            assert sim.counters.connects == 40 and sim.counters.errors == 0
    finally:
        broker.stop()


# =========================================================================== fake controller


class FakeController:
    """Plays the controller by hand on a probe: retained manifests and desired, chunks on Need."""

    def __init__(self, probe: MqttProbe, root: str, blobs: dict[str, bytes]) -> None:
        """Know the bytes of every blob by sha256."""
        self.probe = probe
        self.topics = Topics(root)
        self.blobs = blobs

    def publish_manifest(self, manifest: Manifest) -> None:
        """Retained manifest."""
        self.probe.publish(self.topics.manifest(manifest.sha256), dump(manifest), retain=True)

    def desire(self, device: str, manifest: Manifest, generation: int, **budgets: float) -> None:
        """Retained desired state pointing at `manifest`."""
        ref = ArtifactRef(manifest.sha256, manifest.size, manifest.name, manifest.version)
        desired = Desired(generation=generation, deployment_id="dep-fake", artifact=ref, **budgets)
        self.probe.publish(self.topics.desired(device), dump(desired), retain=True)

    def needs(self, sha: str, count: int, timeout: float = 10.0) -> list[ReceivedMessage]:
        """The first `count` Need messages for a blob."""
        return self.probe.wait_for_count(self.topics.need(sha), count, timeout=timeout)

    def send_chunk(self, sha: str, index: int, *, corrupt: bool = False) -> None:
        """Publish one chunk (optionally with a flipped byte)."""
        data = bytearray(self.blobs[sha][index * CHUNK : (index + 1) * CHUNK])
        if corrupt:
            data[0] ^= 0xFF
        self.probe.publish(self.topics.chunk(sha, index), bytes(data))


@pytest.mark.integration
def test_rejects_corrupt_chunks_fetches_golden_and_applies_budgets(
    mosquitto_broker: BrokerHandle,
    topic_root: str,
    tmp_path: Path,
    mqtt_probe: ProbeFactory,
) -> None:
    """A corrupted chunk is counted and asked for again; a golden blob is fetched after the
    model; a latency budget the synthesized self-test exceeds fails it like the real agent."""
    probe = mqtt_probe(mosquitto_broker)
    probe.subscribe(f"{topic_root}/artifacts/+/need")
    probe.subscribe(f"{topic_root}/devices/+/events")
    golden_path = tmp_path / "golden.npz"
    golden_path.write_bytes(random.Random(3).randbytes(3000))
    golden = build_manifest(golden_path, name="m", version="1", recipe="golden", profile=None)
    plain = build_manifest(TINY, name="m", version="1", recipe="as-is", profile=None)
    model = dataclasses.replace(plain, golden=GoldenRef(golden.sha256, golden.size))
    fake = FakeController(
        probe,
        topic_root,
        {model.sha256: TINY.read_bytes(), golden.sha256: golden_path.read_bytes()},
    )
    sim = Simulation(mosquitto_broker.url, 2, topic_root=topic_root, repair_interval_s=0.3)
    good, tight = sim.device_ids
    with running(sim):
        fake.publish_manifest(model)
        fake.publish_manifest(golden)
        fake.desire(good, model, 5)
        fake.desire(tight, model, 5, latency_budget_ms=0.001)
        fake.needs(model.sha256, 2)
        fake.send_chunk(model.sha256, 0, corrupt=True)
        wait_until(lambda: sim.counters.chunks_rejected == 2, 10, "two rejected chunks")
        repairs = fake.needs(model.sha256, 4)[2:]
        assert {parse(m.payload, Need).chunks for m in repairs} == {(0,)}
        fake.send_chunk(model.sha256, 0)
        fake.needs(golden.sha256, 2)
        fake.send_chunk(golden.sha256, 0)
        wait_until(lambda: sim.counters.activated + sim.counters.failed == 2, 10, "outcomes")
    assert sim.device(good)["model_sha256"] == model.sha256
    assert sim.device(tight)["model_sha256"] is None
    # The counters move when an event is sent; the probe receives it a little later.
    (failure,) = wait_until(
        lambda: [e for e in events(probe, topic_root, tight) if e.kind == "error"],
        10,
        "the failure event",
    )
    assert failure.stage == "self-testing" and failure.event_id == "g5-failed"
    assert failure.message.startswith("self-test failed: latency ")
    assert "over budget 0.001 ms" in failure.message
    names = wait_until(
        lambda: (
            (n := [e.event_id for e in events(probe, topic_root, good)])
            and "g5-benchmark" in n
            and n
        ),
        10,
        "the good device's events",
    )
    for state in ("fetching", "verifying", "staged", "self-testing", "active", "benchmark"):
        assert f"g5-{state}" in names
    assert sim.counters.artifacts_verified == 2  # model and golden, once each


# =========================================================================== CLI


def cli_app() -> typer.Typer:
    """A one-command app, as controller/cli/main.py registers it."""
    app = typer.Typer()
    app.command("simulate")(simulate_command)
    app.command("noop")(lambda: None)  # keep "simulate" a sub-command
    return app


@pytest.mark.integration
def test_cli_runs_for_a_duration_and_prints_the_snapshot(
    mosquitto_broker: BrokerHandle, topic_root: str
) -> None:
    """--duration ends the run; --json prints the final snapshot."""
    result = CliRunner().invoke(
        cli_app(),
        [
            "simulate",
            "--devices",
            "3",
            "--broker",
            mosquitto_broker.url,
            "--topic-root",
            topic_root,
            "--profile",
            "rpi4",
            "--fault",
            "nan:1",
            "--duration",
            "1.5",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    snap = json.loads(result.stdout)
    assert snap["devices"] == 3 and snap["connects"] == 3 and snap["connected"] == 3
    assert snap["faults"] == {"nan": 1} and snap["errors"] == 0


def test_cli_rejects_a_bad_fault_spec() -> None:
    """A bad --fault exits 2 naming the spec, before any connection."""
    result = CliRunner().invoke(cli_app(), ["simulate", "--devices", "2", "--fault", "nan=1:2"])
    assert result.exit_code == 2
    assert "'nan=1:2'" in result.output and "takes no value" in result.output


def test_no_faults_is_the_default() -> None:
    """A device without a fault spec carries none."""
    assert NO_FAULTS.names() == [] and Faults(slow=2.0, drop=0.1).names() == [
        "slow=2",
        "drop=0.1",
    ]


# =========================================================================== scale


@pytest.mark.integration
@pytest.mark.slow
def test_a_thousand_agents_register(tmp_path: Path, topic_root: str, mosquitto_binary: str) -> None:
    """1,000 simulated agents on one mosquitto all register with the real controller."""
    broker = start_mosquitto(tmp_path / "mosquitto", binary=mosquitto_binary)
    process = psutil.Process()
    rss_before = process.memory_info().rss
    sim = Simulation(broker.url, 1000, topic_root=topic_root)
    try:
        with controller(broker, tmp_path / "ctl", topic_root):
            started = time.monotonic()
            with running(sim, connect_timeout=120):
                connected = time.monotonic() - started
                fleet = Fleet(tmp_path / "ctl")
                wait_until(
                    lambda: sum(d["online"] for d in fleet.devices()) == 1000, 120, "1,000 online"
                )
                registered = time.monotonic() - started
                rss = process.memory_info().rss
                print(
                    f"\n1,000 agents: connected in {connected:.1f} s, all registered in "
                    f"{registered:.1f} s; test process RSS {rss / 2**20:.1f} MB "
                    f"(+{(rss - rss_before) / 1000 / 1024:.1f} KB per agent incl. controller), "
                    f"threads {process.num_threads()}"
                )
                snap: dict[str, Any] = sim.snapshot()
                assert snap["connected"] == 1000 and snap["errors"] == 0
                fleet.close()
    finally:
        broker.stop()

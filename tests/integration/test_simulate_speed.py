"""Simulated devices with per-profile speed (recipe, threads) and the fallback switch.

A hand-played controller on a real mosquitto publishes retained manifests, chunks and desired
states; the simulated agents fetch, self-test, benchmark and report over the real protocol.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import firmware_profiles
from agent.protocol import (
    ArtifactRef,
    BenchmarkReport,
    Desired,
    Event,
    Fallback,
    Manifest,
    Status,
    Telemetry,
    TelemetryRecord,
    Topics,
    dump,
    parse,
)
from controller.brokers.base import BrokerHandle
from controller.fleet.artifacts import build_manifest
from controller.simulate import Simulation, SpeedModel
from controller.simulate.speed import THREAD_EXPONENT
from tests.mqtt_helpers import MqttProbe
from tests.polling import wait_until

CHUNK = 64 * 1024


class HandController:
    """Retained manifests, chunks and desired states published by hand on a probe."""

    def __init__(self, probe: MqttProbe, root: str, tmp_path: Path) -> None:
        """Publish under `root`; model files go to `tmp_path`."""
        self.probe = probe
        self.root = root
        self.topics = Topics(root)
        self.tmp_path = tmp_path

    def artifact(self, recipe: str, seed: int, chunks: int = 2) -> Manifest:
        """A model file of `chunks` 64 KiB chunks with this recipe, retained with its chunks."""
        path = self.tmp_path / f"{recipe}-{seed}.tflite"
        data = bytearray(random.Random(seed).randbytes(chunks * CHUNK - 100))
        data[4:8] = b"TFL3"
        path.write_bytes(data)
        manifest = build_manifest(path, name="m", version=str(seed), recipe=recipe, profile=None)
        self.probe.publish(self.topics.manifest(manifest.sha256), dump(manifest), retain=True)
        for index in range(manifest.chunk_count):
            chunk = bytes(data[index * CHUNK : (index + 1) * CHUNK])
            self.probe.publish(self.topics.chunk(manifest.sha256, index), chunk, retain=True)
        return manifest

    def desire(self, devices: list[str], manifest: Manifest, generation: int, **extra: Any) -> None:
        """Retained desired state for each device, pointing at `manifest`."""
        ref = ArtifactRef(manifest.sha256, manifest.size, manifest.name, manifest.version)
        for device in devices:
            desired = Desired(
                generation=generation, deployment_id="dep-speed", artifact=ref, **extra
            )
            self.probe.publish(self.topics.desired(device), dump(desired), retain=True)

    def events(self, device: str) -> list[Event]:
        """Every event of one device seen so far."""
        return [parse(m.payload, Event) for m in self.probe.messages(self.topics.events(device))]

    def event(self, device: str, event_id: str, timeout: float = 20.0) -> Event:
        """The event with this id, waiting for it."""
        found: list[Event] = wait_until(
            lambda: [e for e in self.events(device) if e.event_id == event_id],
            timeout,
            f"{event_id} from {device}",
        )
        return found[0]

    def benchmark(self, device: str, event_id: str) -> BenchmarkReport:
        """The report of a benchmark event, waiting for it."""
        report = self.event(device, event_id).benchmark
        assert report is not None, f"{event_id} from {device} carries no report"
        return report

    def telemetry(self, device: str, sha: str) -> list[TelemetryRecord]:
        """Telemetry records of a device that name the model `sha`."""
        messages = self.probe.messages(self.topics.telemetry(device))
        records = [r for m in messages for r in parse(m.payload, Telemetry).records]
        return [r for r in records if r.model_sha256 == sha]

    def status(self, device: str) -> Status:
        """The latest non-empty status of a device."""
        messages = self.probe.messages(self.topics.status(device))
        return parse([m for m in messages if m.payload][-1].payload, Status)


@contextmanager
def running(sim: Simulation) -> Iterator[Simulation]:
    """Start a simulation, wait for every connection, stop it at the end."""
    sim.start()
    try:
        assert sim.wait_connected(20), f"only {sim.counters.connected} connected"
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def hand(mosquitto_broker: BrokerHandle, mqtt_probe: Any, topic_root: str, tmp_path: Path) -> Any:
    """A hand-played controller subscribed to every device's events, status and telemetry."""
    probe = mqtt_probe(mosquitto_broker)
    for channel in ("events", "status", "telemetry"):
        probe.subscribe(f"{topic_root}/devices/+/{channel}")
    return HandController(probe, topic_root, tmp_path)


@pytest.mark.integration
def test_speed_model_scales_recipes_per_profile_and_threads(
    mosquitto_broker: BrokerHandle, topic_root: str, hand: HandController
) -> None:
    """rpi4:int8=3.0 makes int8 ~3x slower than fp16 on rpi4 only; threads=4 re-installs the
    same artifact without a download and reports 4 threads, faster by the thread factor on rpi4
    and by the explicit t4 factor on the other profile; telemetry carries the same latency."""
    speed = SpeedModel.parse(["rpi4:int8=3.0", "rpi3b-plus:t4=0.5"])
    sim = Simulation(
        mosquitto_broker.url,
        2,
        profiles=["rpi4", "rpi3b-plus"],
        topic_root=topic_root,
        speed=speed,
        telemetry_interval_s=0.3,
    )
    slow_dev, other = sim.device_ids
    int8, fp16 = hand.artifact("int8", seed=1), hand.artifact("fp16", seed=2)
    assert int8.size == fp16.size  # the same size: only the recipe tells them apart
    with running(sim):
        hand.desire([slow_dev, other], int8, 1)
        bench = {d: hand.benchmark(d, "g1-benchmark") for d in (slow_dev, other)}
        telemetry = wait_until(
            lambda: hand.telemetry(slow_dev, int8.sha256), 10, "telemetry of the int8 model"
        )
        hand.desire([slow_dev, other], fp16, 2)
        bench2 = {d: hand.benchmark(d, "g2-benchmark") for d in (slow_dev, other)}
        received = sim.counters.bytes_received
        hand.desire([slow_dev, other], fp16, 3, threads=4)
        bench3 = {d: hand.benchmark(d, "g3-benchmark") for d in (slow_dev, other)}
        assert sim.counters.bytes_received == received  # same sha: no download
        for device in (slow_dev, other):
            ids = [e.event_id for e in hand.events(device) if e.generation == 3]
            assert "g3-self-testing" in ids and "g3-active" in ids  # a new install, re-reported
            assert hand.status(device).model_sha256 == fp16.sha256
            assert sim.device(device)["threads"] == 4
    ratio = bench[slow_dev].p50_ms / bench2[slow_dev].p50_ms
    assert 2.75 < ratio < 3.25, f"int8/fp16 on rpi4: {ratio:.3f}"
    ratio = bench[other].p50_ms / bench2[other].p50_ms
    assert 0.9 < ratio < 1.1, f"int8/fp16 on rpi3b-plus: {ratio:.3f}"
    # Threads: the same artifact and noise key, so the ratio is the thread factor itself.
    assert bench3[slow_dev].p50_ms / bench2[slow_dev].p50_ms == pytest.approx(
        4**-THREAD_EXPONENT, rel=1e-3
    )
    assert bench3[other].p50_ms / bench2[other].p50_ms == pytest.approx(0.5, rel=1e-3)
    rpi4 = firmware_profiles.load("rpi4")
    assert bench2[slow_dev].threads == 1 and bench3[slow_dev].threads == 4
    assert bench3[slow_dev].power_w == pytest.approx(rpi4.power.estimate_w(busy_cores=4), abs=1e-3)
    # Telemetry of the int8 model on rpi4 is as slow as its benchmark (±5 % drift, ±1 rounding).
    for record in telemetry:
        assert record.served is not None
        assert record.served.p50_ms == pytest.approx(bench[slow_dev].p50_ms, rel=0.06)


@pytest.mark.integration
def test_fallback_switches_once_when_the_served_p95_stays_over_budget(
    mosquitto_broker: BrokerHandle, topic_root: str, hand: HandController
) -> None:
    """On rpi4 int8 is 3x slow: its served p95 breaches the fallback budget for the window and
    the agent switches to the fp16 fallback (status, `fallback` event, threads). On rpi3b-plus
    the same int8 stays within budget: the fallback is installed but never served. A fallback
    that cannot be fetched leaves the generation activated, without an error event."""
    speed = SpeedModel.parse(["rpi4:int8=3.0"])
    sim = Simulation(
        mosquitto_broker.url,
        3,
        profiles=["rpi4", "rpi3b-plus"],
        topic_root=topic_root,
        speed=speed,
        telemetry_interval_s=0.0,
    )
    slow_dev, fine_dev, broken_dev = sim.device_ids
    int8, fp16 = hand.artifact("int8", seed=11, chunks=1), hand.artifact("fp16", seed=12, chunks=1)
    fp16_ref = ArtifactRef(fp16.sha256, fp16.size, fp16.name, fp16.version)
    # rpi4 int8: p50 ≈ (0.05 + 10 × 0.0624) × 3 ≈ 2.0 ms → served p95 ≈ 2.8 ms; fp16 ≈ 0.94 ms.
    fallback = Fallback(fp16_ref, latency_ms=1.5, threads=2, window_s=2.0)
    with running(sim):
        hand.desire([slow_dev, fine_dev], int8, 7, fallback=fallback)
        wrong_size = dataclasses.replace(fp16_ref, size=fp16.size + 1)
        hand.desire(
            [broken_dev], int8, 7, fallback=dataclasses.replace(fallback, artifact=wrong_size)
        )
        event = hand.event(slow_dev, "g7-fallback", timeout=15)
        hand.event(fine_dev, "g7-benchmark")
        wait_until(lambda: sim.counters.fallbacks_ready == 2, 10, "both fallbacks installed")
        wait_until(lambda: sim.counters.fallbacks_failed == 1, 10, "the broken fallback")
        wait_until(lambda: hand.status(slow_dev).model_sha256 == fp16.sha256, 10, "the status")
        status = hand.status(slow_dev)
        time.sleep(fallback.window_s + 0.5)  # a whole window more: no second switch
        slow_state, fine_state = sim.device(slow_dev), sim.device(fine_dev)
        slow_events = hand.events(slow_dev)
        fine_events = hand.events(fine_dev)
        broken_state, broken_events = sim.device(broken_dev), hand.events(broken_dev)
    assert event.kind == "fallback" and event.generation == 7
    assert event.model_sha256 == fp16.sha256
    assert int8.sha256 in event.message and fp16.sha256 in event.message
    assert "over budget 1.500 ms" in event.message
    assert status.previous_sha256 == int8.sha256 and status.state == "active"
    assert status.generation == 7
    assert slow_state["threads"] == 2 and slow_state["fallback"] is None
    assert sum(e.kind == "fallback" for e in slow_events) == 1  # once
    # The fallback fetch made no update events (the primary stayed active meanwhile).
    assert [e.event_id for e in slow_events if e.event_id.startswith("g7-fetching")] == [
        "g7-fetching"
    ]
    # The rpi3b-plus device: int8 within budget, fallback installed, never switched.
    assert not [e for e in fine_events if e.kind == "fallback"]
    assert fine_state["model_sha256"] == int8.sha256 and fine_state["fallback"] == fp16.sha256
    # The wrong-size fallback: int8 keeps serving on the (slow) rpi4, no error, no switch.
    assert broken_state["model_sha256"] == int8.sha256 and broken_state["state"] == "active"
    assert broken_state["fallback"] is None
    assert not [e for e in broken_events if e.kind in ("error", "fallback")]
    assert "g7-benchmark" in [e.event_id for e in broken_events]
    assert sim.counters.fallbacks == 1 and sim.counters.failed == 0
    assert sim.counters.errors == 0

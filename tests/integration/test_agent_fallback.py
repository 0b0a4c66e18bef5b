"""Threads per artifact and the on-device fallback with a real agent process on real mosquitto.

The test plays the controller's part by hand: retained manifests and chunks of two real .tflite
files (with their golden files) and unsigned desired states (the agent has no trusted_keys).
An application loop calls the agent's inference service over its Unix socket with
agent.client.InferenceClient; EDGEFLEET_INJECT_LATENCY_MS slows the primary on the serving path.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import InferenceClient, wait_for_service
from agent.protocol import ArtifactRef, Desired, Fallback, GoldenRef, Manifest, Topics, dump
from agent.protocol.config import AgentConfig, dump_config
from agent.serving import InferenceError
from controller.brokers.base import BrokerHandle
from controller.fleet.artifacts import build_manifest
from tests.conftest import MqttProbeFactory
from tests.e2e.conftest import AgentProcess
from tests.mqtt_helpers import MqttProbe, ReceivedMessage
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.agent]

DATA = Path(__file__).resolve().parents[1] / "data"
FP32, INT8 = DATA / "tiny_fp32.tflite", DATA / "tiny_int8.tflite"
DEVICE = "fb-dev-1"
# The primary is slowed to 30 ms per invoke against a 10 ms p95 budget; the tiny models
# themselves answer in well under 1 ms, so only the injected delay can breach.
SLOW_MS, BUDGET_MS, WINDOW_S = 30.0, 10.0, 5.0


def _publish_artifact(probe: MqttProbe, topics: Topics, model: Path) -> Manifest:
    """Retained manifests and chunks of a model and its golden, as the controller publishes."""
    golden_path = model.with_suffix(".golden.npz")
    golden = build_manifest(golden_path, name="tiny", version="1", recipe="golden", profile=None)
    manifest = build_manifest(model, name="tiny", version="1", recipe=model.stem, profile=None)
    manifest = replace(manifest, golden=GoldenRef(golden.sha256, golden.size))
    for blob, path in ((golden, golden_path), (manifest, model)):
        data = path.read_bytes()
        for index in range(blob.chunk_count):
            chunk = data[index * blob.chunk_size : (index + 1) * blob.chunk_size]
            probe.publish(topics.chunk(blob.sha256, index), chunk, retain=True)
        probe.publish(topics.manifest(blob.sha256), dump(blob), retain=True)
    return manifest


def _ref(manifest: Manifest) -> ArtifactRef:
    """The desired state's reference to a published artifact."""
    return ArtifactRef(manifest.sha256, manifest.size, manifest.name, manifest.version)


class Device:
    """One agent process plus the probe that plays the controller for it."""

    def __init__(self, probe: MqttProbe, topics: Topics, agent: AgentProcess) -> None:
        """Watch the device's events and status."""
        self.probe, self.topics, self.agent = probe, topics, agent
        probe.subscribe(topics.events(DEVICE))
        probe.subscribe(topics.status(DEVICE))

    @property
    def socket_path(self) -> Path:
        """The agent's inference socket."""
        return self.agent.config.data_dir / "infer.sock"

    def desire(self, generation: int, primary: Manifest, **kw: Any) -> None:
        """Publish an unsigned retained desired state."""
        desired = Desired(
            generation=generation,
            deployment_id="dep-fb",
            artifact=_ref(primary),
            benchmark_runs=5,
            benchmark_warmup=1,
            **kw,
        )
        self.probe.publish(self.topics.desired(DEVICE), dump(desired), retain=True)

    def events(self, **match: Any) -> list[dict[str, Any]]:
        """Events received so far whose fields equal `match`."""
        found = [m.json() for m in self.probe.messages(self.topics.events(DEVICE))]
        return [e for e in found if all(e.get(k) == v for k, v in match.items())]

    def event(self, event_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the event with this id; fail with the agent's log tail."""

        def has_id(m: ReceivedMessage) -> bool:
            return bool(m.json()["event_id"] == event_id)

        try:
            found = self.probe.wait_for(self.topics.events(DEVICE), has_id, timeout).json()
        except AssertionError:
            pytest.fail(f"no event {event_id}; agent log:\n{self.agent.log()[-4000:]}")
        failed = self.events(kind="error")
        assert not [e for e in failed if e.get("stage")], failed
        return dict(found)

    def record(self) -> dict[str, Any]:
        """The agent's update.json as it is on disk now."""
        path = self.agent.config.data_dir / "update.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}

    def wait_armed(self) -> dict[str, Any]:
        """Wait until the fallback is armed (persisted in update.json)."""

        def armed() -> dict[str, Any] | None:
            return self.record().get("fallback") or None

        found = wait_until(armed, 60, "the fallback to be armed")
        assert found is not None
        return found

    def latest_status(self) -> dict[str, Any]:
        """The last status message received."""
        return dict(self.probe.messages(self.topics.status(DEVICE))[-1].json())


@pytest.fixture
def device(
    mosquitto_broker: BrokerHandle, topic_root: str, mqtt_probe: MqttProbeFactory
) -> Iterator[Callable[..., Device]]:
    """Factory: device(env=...) -> an agent process (unsigned, 1 thread) and its probe."""
    # AF_UNIX paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    home = Path(tempfile.mkdtemp(prefix="effb-", dir="/tmp"))
    agents: list[AgentProcess] = []

    def start(env: dict[str, str] | None = None) -> Device:
        config = AgentConfig(
            device_id=DEVICE,
            data_dir=home / DEVICE,
            broker=mosquitto_broker.url,
            topic_root=topic_root,
            profile="rpi4",
            threads=1,
            repair_interval_s=0.5,
        )
        config.data_dir.mkdir(parents=True)
        path = home / f"{DEVICE}.toml"
        path.write_text(dump_config(config))
        agent = AgentProcess(config, path, home / f"{DEVICE}.log", env=dict(env or {}))
        agents.append(agent)
        probe = mqtt_probe(mosquitto_broker)
        dev = Device(probe, Topics(topic_root), agent)
        agent.start()
        return dev

    yield start
    for agent in agents:
        agent.terminate()
    shutil.rmtree(home, ignore_errors=True)


class Application(threading.Thread):
    """An app calling the agent in a loop; it re-reads the model's inputs when a swap refuses
    its request (the fallback takes int8 where the primary took float32)."""

    def __init__(self, socket_path: Path) -> None:
        """Connect lazily to the agent's socket."""
        super().__init__(daemon=True)
        self.client = InferenceClient(socket_path, timeout=10.0)
        self.replies: list[tuple[float, str]] = []
        self.errors = 0
        self.stop = threading.Event()
        self._rng = np.random.default_rng(0)

    def _inputs(self) -> list[np.ndarray]:
        """Random inputs (no two alike) in the active model's dtype and shape."""
        info = self.client.model_info()
        spec = info["inputs"][0]
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            return [self._rng.random(spec["shape"], dtype=np.float32).astype(dtype)]
        return [self._rng.integers(-128, 127, spec["shape"]).astype(dtype)]

    def run(self) -> None:
        """Infer until stopped, recording which model answered."""
        inputs = self._inputs()
        while not self.stop.is_set():
            inputs = [self._rng.permutation(inputs[0].ravel()).reshape(inputs[0].shape)]
            try:
                reply = self.client.infer_detailed(inputs)
            except InferenceError:
                self.errors += 1
                inputs = self._inputs()
                continue
            self.replies.append((time.monotonic(), reply.model_sha256))

    def __enter__(self) -> Application:
        """Start the loop."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the loop and close the connection."""
        self.stop.set()
        self.join(15)
        self.client.close()

    def models_since(self, since: float) -> set[str]:
        """Which models answered since `since` (monotonic)."""
        return {sha for t, sha in list(self.replies) if t >= since}


@pytest.fixture
def artifacts(
    mosquitto_broker: BrokerHandle, topic_root: str, mqtt_probe: MqttProbeFactory
) -> tuple[Manifest, Manifest]:
    """The fp32 (primary) and int8 (fallback) models, published retained with their goldens."""
    probe = mqtt_probe(mosquitto_broker)
    topics = Topics(topic_root)
    return _publish_artifact(probe, topics, FP32), _publish_artifact(probe, topics, INT8)


def test_threads_per_artifact_then_reload_without_download(
    device: Callable[..., Device], artifacts: tuple[Manifest, Manifest]
) -> None:
    fp32, _ = artifacts
    dev = device()
    dev.desire(1, fp32, threads=2)
    assert dev.event("g1-benchmark")["benchmark"]["threads"] == 2
    assert dev.event("g1-active")["model_sha256"] == fp32.sha256
    assert dev.record()["serving_threads"] == 2
    dev.desire(2, fp32, threads=1)
    benchmark = dev.event("g2-benchmark")["benchmark"]
    assert benchmark["threads"] == 1 and benchmark["model_sha256"] == fp32.sha256
    assert "no download" in dev.event("g2-active")["message"]
    assert dev.events(event_id="g2-fetching") == []
    assert dev.record()["serving_threads"] == 1
    wait_for_service(dev.socket_path, 10)
    with InferenceClient(dev.socket_path) as client:
        reply = client.infer_detailed([np.zeros((1, 8, 8, 1), np.float32)])
    assert reply.model_sha256 == fp32.sha256


@pytest.mark.slow
def test_slow_primary_falls_back_once_and_stays_after_a_kill(
    device: Callable[..., Device], artifacts: tuple[Manifest, Manifest]
) -> None:
    fp32, int8 = artifacts
    dev = device(env={"EDGEFLEET_INJECT_LATENCY_MS": f"{fp32.sha256[:16]}:{SLOW_MS:g}"})
    fallback = Fallback(_ref(int8), latency_ms=BUDGET_MS, threads=2, window_s=WINDOW_S)
    dev.desire(1, fp32, fallback=fallback)
    dev.event("g1-benchmark")
    armed = dev.wait_armed()
    assert armed["sha256"] == int8.sha256 and armed["engaged"] is False
    wait_for_service(dev.socket_path, 10)
    started = time.monotonic()
    with Application(dev.socket_path) as app:
        wait_until(lambda: app.replies, 10, "the first reply")
        assert app.replies[0][1] == fp32.sha256  # armed, not served
        event = dev.event("g1-fallback", timeout=WINDOW_S * 6)
        switched = time.monotonic()
        # Five breaching slices in a row: the first may have begun (armed) before the app did.
        assert switched - started >= WINDOW_S * 4 / 5
        wait_until(lambda: app.models_since(switched + 0.5), 10, "replies after the switch")
        time.sleep(1.0)
        assert app.models_since(switched + 0.5) == {int8.sha256}
    assert event["kind"] == "fallback" and event["generation"] == 1
    assert event["deployment_id"] == "dep-fb" and event["model_sha256"] == int8.sha256
    assert fp32.sha256[:12] in event["message"] and int8.sha256[:12] in event["message"]
    assert f"{BUDGET_MS:g} ms budget" in event["message"]
    assert len(dev.events(kind="fallback")) == 1
    wait_until(lambda: dev.latest_status()["model_sha256"] == int8.sha256, 10, "status = fallback")
    record = dev.record()
    assert record["fallback"]["engaged"] and record["serving_threads"] == 2

    dev.agent.kill()
    dev.probe.clear()
    dev.agent.start()
    status = dev.probe.wait_for(
        dev.topics.status(DEVICE), lambda m: bool(m.json()["online"]), 30
    ).json()
    assert status["model_sha256"] == int8.sha256 and status["previous_sha256"] == fp32.sha256
    wait_for_service(dev.socket_path, 10)
    with Application(dev.socket_path) as app:
        wait_until(lambda: len(app.replies) >= 20, 10, "replies after the restart")
    assert {sha for _, sha in app.replies} == {int8.sha256}
    assert dev.events(kind="fallback") == []  # acknowledged before the kill: not sent again
    assert dev.record()["serving_threads"] == 2


def test_fast_primary_does_not_fall_back(
    device: Callable[..., Device], artifacts: tuple[Manifest, Manifest]
) -> None:
    fp32, int8 = artifacts
    dev = device()
    fallback = Fallback(_ref(int8), latency_ms=BUDGET_MS, window_s=WINDOW_S)
    dev.desire(1, fp32, fallback=fallback)
    dev.event("g1-benchmark")
    dev.wait_armed()
    wait_for_service(dev.socket_path, 10)
    with Application(dev.socket_path) as app:
        time.sleep(WINDOW_S * 1.6)
        served = len(app.replies)
    assert served >= 5 * 5 * 2, f"only {served} requests: the watch saw too few to judge"
    assert {sha for _, sha in app.replies} == {fp32.sha256}
    assert dev.events(kind="fallback") == []
    assert dev.latest_status()["model_sha256"] == fp32.sha256
    assert dev.record()["fallback"]["engaged"] is False

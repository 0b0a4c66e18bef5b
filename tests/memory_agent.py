"""An agent without a network: an in-memory broker that answers like the controller (retained
messages, subscriptions, chunks on `need`), so the agent's update flow runs for real in unit
tests of the daemon, the fallback and signed updates."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import Any

from paho.mqtt.client import topic_matches_sub

from agent.daemon import Agent
from agent.protocol import ArtifactRef, Desired, Manifest, Need, Topics, dump, parse
from tests.paths import TEST_DATA

OLD, NEW = TEST_DATA / "tiny_fp32.tflite", TEST_DATA / "tiny_int8.tflite"
ROOT = "unit/edgefleet/v1"


class MemoryBroker:
    """Just enough of an MQTT broker and a controller for one agent, in memory."""

    def __init__(self) -> None:
        """No subscriptions, nothing retained, every publish acknowledged."""
        self.topics = Topics(ROOT)
        self.retained: dict[str, bytes] = {}
        self.subscriptions: set[str] = set()
        self.published: list[tuple[str, bytes]] = []
        self.blobs: dict[str, tuple[Manifest, bytes]] = {}
        self.ack = True
        self.connected = threading.Event()
        self.connected.set()
        self.deliver: Callable[[str, bytes], None] = lambda t, p: None
        self._lock = threading.Lock()

    # --- the MqttSession interface the agent uses
    def start(self) -> None:
        """Nothing to connect."""

    def stop(self) -> None:
        """Nothing to disconnect."""

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, wait_s: float = 0
    ) -> bool:
        """Record (and retain) a publish; answer `need` like the controller does."""
        with self._lock:
            self.published.append((topic, payload))
            if retain:
                self.retained[topic] = payload
        if topic.endswith("/need"):
            sha = topic.split("/")[-2]
            manifest, data = self.blobs[sha]
            for i in parse(payload, Need).chunks:
                start = i * manifest.chunk_size
                self._send(self.topics.chunk(sha, i), data[start : start + manifest.chunk_size])
        return self.ack and bool(wait_s)

    def subscribe(self, *topics: str) -> None:
        """Subscribe; matching retained messages are delivered from another thread."""
        self.subscriptions.update(topics)
        retained = [
            (t, p) for t, p in self.retained.items() if any(topic_matches_sub(f, t) for f in topics)
        ]
        for topic, payload in retained:
            self._send(topic, payload, check=False)

    def unsubscribe(self, *topics: str) -> None:
        """Drop subscriptions."""
        self.subscriptions.difference_update(topics)

    # --- test side
    def _send(self, topic: str, payload: bytes, check: bool = True) -> None:
        """Deliver to the agent (like paho's network thread) if it is subscribed."""
        if check and not any(topic_matches_sub(f, topic) for f in self.subscriptions):
            return
        threading.Thread(target=self.deliver, args=(topic, payload), daemon=True).start()

    def offer(self, data: bytes, chunk_size: int = 4096) -> Manifest:
        """Make a blob available: retained manifest, chunks served on need."""
        chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
        sha = hashlib.sha256(data).hexdigest()
        manifest = Manifest(
            sha256=sha,
            size=len(data),
            chunk_size=chunk_size,
            chunk_sha256=tuple(hashlib.sha256(c).hexdigest() for c in chunks),
            name="m",
            version="1",
            recipe="fp32",
        )
        self.blobs[sha] = (manifest, data)
        self.retained[self.topics.manifest(sha)] = dump(manifest)
        return manifest

    def events(self, **match: Any) -> list[dict[str, Any]]:
        """Published events whose fields equal `match`."""
        found = [json.loads(p) for t, p in self.published if t.endswith("/events")]
        return [e for e in found if all(e.get(k) == v for k, v in match.items())]


def make_desired(generation: int, manifest: Manifest, **kw: Any) -> Desired:
    """A desired state for `manifest` with a quick benchmark."""
    ref = ArtifactRef(manifest.sha256, manifest.size, manifest.name, manifest.version)
    return Desired(
        generation=generation,
        deployment_id="dep-1",
        artifact=ref,
        benchmark_runs=3,
        benchmark_warmup=1,
        **kw,
    )


def apply_desired(agent: Agent, desired: Desired) -> None:
    """What the agent's work thread does with a delivered desired state."""
    agent.inbox.latest_generation = max(agent.inbox.latest_generation, desired.generation)
    agent.flow.apply(desired)

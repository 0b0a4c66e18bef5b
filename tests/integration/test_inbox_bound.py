"""The controller's telemetry inbox is bounded: what it has not acknowledged stays in the broker.

mosquitto before 2.0.13 (Debian 12 ships 2.0.11) sends a manual-ack subscriber up to
max_inflight_messages more messages on every PUBACK, so a backlog moved into the subscriber's
memory (docs/telemetry.md, "Inbox bound"); MqttSession(max_unacked=N) stops reading at N.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import Telemetry, Topics, dump
from agent.protocol.transport import Ack, MqttSession
from controller.brokers.base import BrokerHandle
from controller.runtime import core
from controller.runtime.service import ControllerService
from tests.mqtt_helpers import MqttProbe
from tests.polling import wait_until
from tests.telemetry_records import hold_telemetry_ingest, record

ROOT = "test/edgefleet/v1"
PUBLISHERS = 5
PER_PUBLISHER = 60
BOUND = 10  # below mosquitto's max_inflight_messages (64), so the broker alone would exceed it


def _publish(broker: BrokerHandle, topic_of: Any, payload_of: Any) -> list[MqttProbe]:
    """PUBLISHERS clients, each sending PER_PUBLISHER QoS1 messages."""
    probes = [MqttProbe(broker).connect() for _ in range(PUBLISHERS)]
    for p, probe in enumerate(probes):
        for i in range(PER_PUBLISHER):
            probe.publish(topic_of(p), payload_of(p, i), qos=1)
    return probes


def test_a_slow_consumer_never_holds_more_than_its_bound(mosquitto_broker: BrokerHandle) -> None:
    held: deque[Ack] = deque()
    lock = threading.Lock()
    received: list[bytes] = []
    most_held = [0]
    ready = threading.Event()

    def on_message(topic: str, payload: bytes, ack: Ack) -> None:
        if topic == "bound/ready":
            ready.set()
            ack()
            return
        with lock:
            received.append(payload)
            held.append(ack)
            most_held[0] = max(most_held[0], len(held))

    session = MqttSession(
        mosquitto_broker.url,
        "slow-consumer",
        on_acked_message=on_message,
        on_connect=lambda: session.subscribe("bound/#"),
        clean_session=False,
        max_unacked=BOUND,
    )
    session.start()
    probes: list[MqttProbe] = []
    try:
        assert session.connected.wait(10)
        with MqttProbe(mosquitto_broker).connect() as probe:  # until the subscription is live
            wait_until(lambda: probe.publish("bound/ready", b"") or ready.is_set(), 10, "SUBACK")
        total = PUBLISHERS * PER_PUBLISHER
        probes = _publish(
            mosquitto_broker, lambda p: f"bound/{p}", lambda p, i: f"{p}:{i}".encode()
        )
        acked = 0
        while acked < total:
            # The consumer acknowledges only when it is full (or at the end): the oldest first,
            # as the controller does. Each PUBACK let mosquitto 2.0.11 send 64 more.
            wait_until(
                lambda: len(held) >= BOUND or len(received) == total,
                30,
                "a full inbox",
                interval=0.002,
            )
            with lock:
                ack = held.popleft()
            ack()
            acked += 1
        assert most_held[0] == BOUND
        assert sorted(received) == sorted(
            f"{p}:{i}".encode() for p in range(PUBLISHERS) for i in range(PER_PUBLISHER)
        )
        assert session.unacked_waits > 0
    finally:
        for probe in probes:
            probe.close()
        session.stop()


def test_a_held_back_telemetry_backlog_is_stored_exactly_once_through_the_bound(
    mosquitto_broker: BrokerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingest stuck (a gate) under a backlog: the telemetry session stops at its bound, then
    everything is stored once when ingest resumes (nothing lost to the pause)."""
    monkeypatch.setattr(core, "TELEMETRY_MAX_UNACKED", BOUND)
    gate = hold_telemetry_ingest(monkeypatch)
    home = tmp_path / "home"
    service = ControllerService(home, mosquitto_broker.url, topic_root=ROOT, client_id="ctl-ib")
    topics = Topics(ROOT)
    service.start()
    probes: list[MqttProbe] = []
    try:
        assert service.telemetry_session is not None
        assert service.telemetry_session.connected.wait(10)
        gate.set()  # one record through first: the telemetry subscription is in place
        with MqttProbe(mosquitto_broker).connect() as probe:
            first = Telemetry(device_id="dev-first", records=(record(1, ts=time.time()),))
            probe.publish(topics.telemetry("dev-first"), dump(first))
            wait_until(lambda: service.records_stored == 1, 15, "the first record stored")
        gate.clear()
        probes = _publish(
            mosquitto_broker,
            lambda p: topics.telemetry(f"dev-{p}"),
            lambda p, i: dump(
                Telemetry(device_id=f"dev-{p}", records=(record(i + 1, ts=time.time()),))
            ),
        )
        session = service.telemetry_session
        wait_until(lambda: session.unacked_waits > 0, 30, "the bound reached")
        assert service._telemetry_inbox.qsize() <= BOUND
        gate.set()
        total = PUBLISHERS * PER_PUBLISHER
        wait_until(lambda: service.records_stored == total + 1, 60, "every record stored")
        assert service.records_duplicate == 0
    finally:
        gate.set()
        for probe in probes:
            probe.close()
        service.stop()

"""Telemetry on its own session and thread: events are stored while telemetry ingest is stuck."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.protocol import Event, Telemetry, Topics, dump
from controller.brokers.base import BrokerHandle
from controller.fleet.registry import Fleet
from controller.runtime.service import ControllerService
from tests.mqtt_helpers import MqttProbe
from tests.polling import wait_until
from tests.telemetry_records import hold_telemetry_ingest, record

ROOT = "test/edgefleet/v1"


def fresh(seq: int) -> bytes:
    """A one-record Telemetry message of dev-1 closed now (raw, not due for compaction)."""
    return dump(Telemetry(device_id="dev-1", records=(record(seq, ts=time.time()),)))


def test_events_are_stored_while_telemetry_ingest_is_held_back(
    mosquitto_broker: BrokerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A telemetry backlog (here: ingest held on a gate) must not hold events back: with one
    session and one loop the event below waited until every telemetry batch before it was
    stored (the rollout storm of issue 20)."""
    gate = hold_telemetry_ingest(monkeypatch)
    home = tmp_path / "home"
    service = ControllerService(home, mosquitto_broker.url, topic_root=ROOT, client_id="ctl-ts")
    topics = Topics(ROOT)
    service.start()
    fleet = Fleet(home)
    probe = MqttProbe(mosquitto_broker).connect()
    try:
        assert service.session.connected.wait(10)
        assert service.telemetry_session is not None
        assert service.telemetry_session.connected.wait(10)
        gate.set()  # one record through first: the telemetry subscription is in place
        probe.publish(topics.telemetry("dev-1"), fresh(1))
        wait_until(lambda: service.records_stored == 1, 15, "the first record stored")
        gate.clear()
        for seq in range(2, 102):  # more than a broker in-flight window (64) of telemetry
            probe.publish(topics.telemetry("dev-1"), fresh(seq))
        event = Event(device_id="dev-1", event_id="ev-1", kind="update", message="hello")
        probe.publish(topics.events("dev-1"), dump(event))

        def stored_events() -> int:
            row = fleet.db.query_one("SELECT COUNT(*) AS n FROM events WHERE event_id = 'ev-1'")
            return int(row["n"]) if row else 0

        def stored_records() -> int:
            row = fleet.db.query_one("SELECT COUNT(*) AS n FROM telemetry")
            return int(row["n"]) if row else 0

        wait_until(lambda: stored_events() == 1, 15, "the event stored behind held telemetry")
        assert stored_records() == 1  # the telemetry really was held back
        gate.set()
        wait_until(lambda: stored_records() == 101, 30, "every telemetry record stored")
        assert service.records_stored == 101 and service.records_duplicate == 0
    finally:
        gate.set()
        probe.close()
        fleet.close()
        service.stop()


def test_the_main_session_no_longer_subscribes_to_telemetry(tmp_path: Path) -> None:
    """Telemetry filters belong to the telemetry session (shared for replicas), the rest to the
    main one; over TLS, where a second session could take the first over, it stays on one."""
    plain = ControllerService(tmp_path / "a", "mqtt://127.0.0.1:1", topic_root=ROOT)
    assert not any(f.endswith("/telemetry") for f in plain._device_filters())
    assert plain._telemetry_filters() == (f"{ROOT}/devices/+/telemetry",)
    replica = ControllerService(tmp_path / "b", "mqtt://127.0.0.1:1", topic_root=ROOT, replica="r1")
    assert replica._telemetry_filters() == (f"$share/edgefleet/{ROOT}/devices/+/telemetry",)
    tls = ControllerService(tmp_path / "c", "mqtts://127.0.0.1:1", topic_root=ROOT)
    assert tls.telemetry_session is None
    assert f"{ROOT}/devices/+/telemetry" in tls._device_filters()

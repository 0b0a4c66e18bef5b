"""Replica faults against real mosquitto and PostgreSQL: a lost database connection and a
leader whose lease lapsed (docs/storage.md, "Replicas")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol import DeviceFacts, Hello, Topics, dump
from controller.brokers.base import BrokerHandle
from controller.fleet.registry import Fleet
from controller.runtime.service import ControllerService
from controller.storage.open import open_database
from tests.mqtt_helpers import MqttProbe, wait_until

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parent.parent / "data"
FACTS = DeviceFacts("aarch64", "Linux", 4, 3792, "tflite-runtime", "2.14.0", "3.11.2")


@pytest.fixture
def home(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data dir whose fleet lives in the test's PostgreSQL schema."""
    monkeypatch.setenv("EDGEFLEET_DB", pg_url)
    return tmp_path / "home"


@pytest.fixture
def device(mosquitto_broker: BrokerHandle) -> Iterator[MqttProbe]:
    """A bare MQTT client that sends what an agent would."""
    probe = MqttProbe(mosquitto_broker).connect()
    yield probe
    probe.close()


def hello(device: MqttProbe, root: str, device_id: str) -> bool:
    """Publish an agent's hello (QoS1) and wait for the broker's PUBACK; False, for chaining."""
    info = device.client.publish(
        Topics(root).hello(device_id),
        dump(Hello(device_id=device_id, agent_version="0.1.0", facts=FACTS)),
        qos=1,
    )
    info.wait_for_publish(10)
    time.sleep(0.2)  # one store round trip before the caller asks again
    return False


def registered(home: Path) -> set[str]:
    """Device ids in the fleet (a fresh connection each time)."""
    fleet = Fleet(home)
    try:
        return {d["id"] for d in fleet.devices()}
    finally:
        fleet.close()


def terminate_controller_connections(pg_url: str) -> int:
    """Kill, on the server, every connection edgefleet opened (as a failover would)."""
    import psycopg  # controller-only (not in the slim device env)

    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'edgefleet' AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


# The service thread ends by raising DatabaseUnavailable: that is the behaviour under test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_replica_that_loses_its_database_stops_without_acknowledging(
    home: Path, mosquitto_broker: BrokerHandle, device: MqttProbe, topic_root: str, pg_url: str
) -> None:
    """The message that met the dead connection is not acknowledged, so it is not lost: the
    replica stops (its supervisor restarts it) and the broker delivers it again."""

    def replica() -> ControllerService:
        return started(ControllerService(home, mosquitto_broker.url, topic_root=topic_root,
                                         replica="r1"))  # fmt: skip

    service = replica()
    try:
        # Sent again until stored: `ready` means SUBSCRIBE sent, not yet acknowledged.
        assert wait_until(
            lambda: "before" in registered(home) or hello(device, topic_root, "before"), 15
        ), "the first hello stored"
        assert terminate_controller_connections(pg_url) >= 1
        hello(device, topic_root, "during")
        assert wait_until(lambda: not service.alive, 15), "loop still running"
        assert "during" not in registered(home)
    finally:
        service.stop()
    again = replica()  # same replica name: same persistent MQTT session
    try:
        assert wait_until(lambda: "during" in registered(home), 15), "not redelivered"
    finally:
        again.stop()


def test_a_leader_whose_lease_lapsed_publishes_nothing(
    home: Path, mosquitto_broker: BrokerHandle, device: MqttProbe, topic_root: str, pg_url: str
) -> None:
    """Another replica holds the lease: a service that still believes it leads (a stall past
    its expiry) is fenced off by the database before it publishes desired state."""
    fleet = Fleet(home)
    fleet.register_device("cam-1", "rpi4")
    fleet.close()
    service = started(
        ControllerService(home, mosquitto_broker.url, topic_root=topic_root, replica="stale")
    )
    try:
        assert wait_until(lambda: service.is_leader, 15), "the service to lead"
        device.subscribe(Topics(topic_root).desired("cam-1"))
        # Its leadership thread stalls (a GC pause, a partition) and another replica takes over
        # the lease meanwhile: the service loop still believes it leads.
        service._lead = lambda *args: None  # type: ignore[method-assign]
        time.sleep(1.5)  # a renewal in flight finishes
        db = open_database(pg_url)
        with db.transaction() as tx:
            tx.execute(
                "UPDATE leases SET holder = 'other', epoch = epoch + 1, expires = ? "
                "WHERE name = 'leader'",
                (db.clock() + 3600,),
            )
        assert service.is_leader  # nobody told the loop
        fleet = Fleet(home)
        fleet.deploy(DATA / "tiny_int8.tflite", devices=["cam-1"])
        fleet.close()
        time.sleep(2.0)  # several reconcile periods
        assert device.messages(Topics(topic_root).desired("cam-1")) == []
        row = db.query_one("SELECT published_generation FROM devices WHERE id = 'cam-1'")
        assert row is not None and row["published_generation"] == 0
        db.close()
    finally:
        service.stop()


def started(service: ControllerService) -> ControllerService:
    """Start a service and wait until it is connected and subscribed."""
    service.start()
    assert service.ready.wait(15), "the controller did not connect"
    return service

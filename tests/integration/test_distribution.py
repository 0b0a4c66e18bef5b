"""Chunk distribution against a real mosquitto (docs/rollouts.md, "Distribution"): repairs reach
only the device that lacks the chunks, downloads are paced by window and rate, egress is one
artifact."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from controller.brokers.mosquitto import BrokerHandle
from controller.fleet.registry import Fleet
from controller.runtime.service import ControllerService
from controller.simulate import Simulation, parse_fault
from tests.integration.simulation import multi_chunk_model, online, running
from tests.mqtt_helpers import MqttProbe
from tests.polling import wait_until

pytestmark = pytest.mark.integration

ProbeFactory = Callable[..., MqttProbe]


@contextmanager
def paced_controller(
    broker: BrokerHandle, home: Path, topic_root: str, **pacing: float
) -> Iterator[ControllerService]:
    """The real controller service with download pacing options (max_fetching, rate)."""
    service = ControllerService(
        home,
        broker.url,
        topic_root=topic_root,
        client_id=f"ctl-{topic_root.split('/')[1]}",
        **pacing,  # type: ignore[arg-type]
    )
    service.start()
    try:
        assert service.ready.wait(15), "controller did not connect"
        yield service
    finally:
        service.stop()


def published(fleet: Fleet, ids: list[str]) -> int:
    """How many of the devices have their current desired generation published."""
    rows = [fleet.device(i) for i in ids]
    return sum(
        1
        for r in rows
        if r["desired_generation"] and r["published_generation"] >= r["desired_generation"]
    )


def test_repairs_reach_only_the_device_that_asked(
    mosquitto_broker: BrokerHandle, topic_root: str, tmp_path: Path, mqtt_probe: ProbeFactory
) -> None:
    """One agent drops half its chunks and repairs many times; a bystander subscribed to the
    artifact's chunks/+ (as every downloading device is) sees the retained burst once and not
    one repair, and the controller publishes the artifact exactly once."""
    sim = Simulation(
        mosquitto_broker.url,
        3,
        topic_root=topic_root,
        faults=[parse_fault("drop=0.6:1")],
        repair_interval_s=0.3,
    )
    model = multi_chunk_model(tmp_path / "ten.tflite", 10, 7)
    with paced_controller(mosquitto_broker, tmp_path, topic_root) as service, running(sim):
        fleet = Fleet(tmp_path)
        wait_until(lambda: online(fleet, sim.device_ids), 20, "registration")
        fleet.deploy(model, devices=sim.device_ids)
        sha = hashlib.sha256(model.read_bytes()).hexdigest()
        chunks_filter = f"{topic_root}/artifacts/{sha}/chunks/+"
        wait_until(lambda: service.chunks_published >= 10, 20, "the artifact's publication")
        bystander = mqtt_probe(mosquitto_broker)
        bystander.subscribe(chunks_filter)
        wait_until(lambda: len(bystander.messages(chunks_filter)) == 10, 10, "the retained burst")
        wait_until(lambda: sim.counters.activated == 3, 40, "all three activated")
        time.sleep(1.0)  # anything a repair published would have reached the bystander by now
        assert sim.counters.chunks_dropped > 0
        assert sim.counters.repair_rounds >= 2
        assert len(bystander.messages(chunks_filter)) == 10, "a repair reached a bystander"
        assert service.chunks_published == 10
        assert service.bytes_published == model.stat().st_size
        fleet.close()


def test_window_bounds_devices_fetching_at_once(
    mosquitto_broker: BrokerHandle, topic_root: str, tmp_path: Path
) -> None:
    """max_fetching=2: eight devices all succeed, never more than two downloading at once."""
    sim = Simulation(mosquitto_broker.url, 8, topic_root=topic_root)
    model = multi_chunk_model(tmp_path / "four.tflite", 4, 3)
    with (
        paced_controller(mosquitto_broker, tmp_path, topic_root, max_fetching=2) as service,
        running(sim),
    ):
        fleet = Fleet(tmp_path)
        wait_until(lambda: online(fleet, sim.device_ids), 20, "registration")
        fleet.deploy(model, devices=sim.device_ids)
        fetching_seen = []

        def all_activated() -> bool:
            fetching_seen.append(sum(sim.device(d)["state"] == "fetching" for d in sim.device_ids))
            return sim.counters.activated == 8

        wait_until(all_activated, 60, "all eight activated")
        assert service.pacer.counters.peak_fetching == 2
        assert service.pacer.counters.deferred > 0
        assert max(fetching_seen) <= 2
        assert service.chunks_published == 4
        fleet.close()


def test_rate_per_minute_holds(
    mosquitto_broker: BrokerHandle, topic_root: str, tmp_path: Path
) -> None:
    """fetch_rate=12/min, no window: 12 of 16 devices get their desired state at once (a
    minute's burst), the next one about 5 s later, not before."""
    sim = Simulation(mosquitto_broker.url, 16, topic_root=topic_root)
    model = multi_chunk_model(tmp_path / "two.tflite", 2, 5)
    with (
        paced_controller(
            mosquitto_broker, tmp_path, topic_root, max_fetching=0, fetches_per_minute=12
        ),
        running(sim),
    ):
        fleet = Fleet(tmp_path)
        wait_until(lambda: online(fleet, sim.device_ids), 20, "registration")
        fleet.deploy(model, devices=sim.device_ids)
        started = time.monotonic()
        wait_until(lambda: published(fleet, sim.device_ids) >= 12, 10, "the first minute's burst")
        time.sleep(max(0.0, started + 3.0 - time.monotonic()))
        assert published(fleet, sim.device_ids) == 12, "more than the rate allowed"
        wait_until(lambda: published(fleet, sim.device_ids) == 13, 10, "one more token (5 s)")
        assert time.monotonic() - started >= 4.0
        fleet.close()

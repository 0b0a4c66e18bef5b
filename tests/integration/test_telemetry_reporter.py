"""The telemetry reporter against a real mosquitto: nothing measured is lost across outages."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.metrics import ServingMetrics
from agent.power import detect_power_source
from agent.protocol import (
    MAX_JSON_BYTES,
    MAX_TELEMETRY_RECORDS,
    SeqRange,
    Telemetry,
    Topics,
    dump,
    parse,
)
from agent.protocol.transport import MqttSession
from agent.spool import TelemetrySpool
from agent.telemetry import MAX_MESSAGE_BYTES, TelemetryReporter
from controller.brokers.base import BrokerHandle
from controller.brokers.mosquitto import start_mosquitto
from tests.e2e.proxy import TcpProxy
from tests.mqtt_helpers import MqttProbe
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.agent]

DEVICE = "dev-telemetry-1"
SHA = "ab" * 32
ProbeFactory = Callable[..., MqttProbe]


@dataclass
class Rig:
    """One reporter with its spool, metrics and MQTT session."""

    reporter: TelemetryReporter
    session: MqttSession
    spool: TelemetrySpool
    metrics: ServingMetrics
    topic: str
    problems: list[str] = field(default_factory=list)


@pytest.fixture
def make_rig(tmp_path: Path, topic_root: str) -> Iterator[Callable[..., Rig]]:
    """Factory for reporters on a broker URL; all stopped at teardown."""
    rigs: list[Rig] = []

    def make(
        url: str,
        *,
        interval_s: float = 0.2,
        max_records: int = 1_000,
        keep_acked: int = 100,
        puback_wait_s: float = 2.0,
        connect: bool = True,
        sysfs_root: Path | None = None,
    ) -> Rig:
        """Build (and by default connect) one reporter; the thread is not started."""
        holder: list[TelemetryReporter] = []
        sysfs = sysfs_root or tmp_path / "no-sysfs"
        session = MqttSession(
            url,
            f"{DEVICE}-{uuid.uuid4().hex[:6]}",
            on_message=lambda topic, payload: None,
            on_connect=lambda: holder[0].wake() if holder else None,
        )
        spool = TelemetrySpool(
            tmp_path / f"spool-{len(rigs)}.db",
            max_records=max_records,
            overflow="drop_oldest",
            keep_acked=keep_acked,
        )
        metrics = ServingMetrics()
        problems: list[str] = []
        topic = Topics(topic_root).telemetry(DEVICE)
        reporter = TelemetryReporter(
            session=session,
            topic=topic,
            device_id=DEVICE,
            spool=spool,
            metrics=metrics,
            model_sha=lambda: SHA,
            power_source=lambda: detect_power_source(sysfs, sample_interval_s=0.05),
            interval_s=interval_s,
            sysfs_root=sysfs,
            on_problem=problems.append,
            puback_wait_s=puback_wait_s,
        )
        holder.append(reporter)
        rig = Rig(reporter, session, spool, metrics, topic, problems)
        rigs.append(rig)
        if connect:
            session.start()
            wait_until(session.connected.is_set, 10, "the reporter's session to connect")
        return rig

    yield make
    for rig in rigs:
        rig.reporter.stop(flush_budget_s=0)  # also ends any power sampler thread
        rig.session.stop()
        rig.spool.close()


def received(probe: MqttProbe, topic: str) -> list[Telemetry]:
    """Every Telemetry message the probe got on `topic`, parsed strictly."""
    return [parse(m.payload, Telemetry) for m in probe.messages(topic)]


def received_seqs(probe: MqttProbe, topic: str) -> list[int]:
    """Sequence numbers of every record received, duplicates included, in arrival order."""
    return [r.seq for t in received(probe, topic) for r in t.records]


def has_all(probe: MqttProbe, topic: str, last: int) -> bool:
    """Whether every seq 1..last arrived at least once."""
    return set(range(1, last + 1)) <= set(received_seqs(probe, topic))


def subscriber(mqtt_probe: ProbeFactory, broker: BrokerHandle, topic: str) -> MqttProbe:
    """A connected probe subscribed to the telemetry topic."""
    probe = mqtt_probe(broker)
    probe.subscribe(topic)
    return probe


def test_records_arrive_in_order_and_every_request_is_counted(
    mosquitto_broker: BrokerHandle, mqtt_probe: ProbeFactory, make_rig: Callable[..., Rig]
) -> None:
    """Short interval: consecutive seqs; served counts over all records = requests observed."""
    rig = make_rig(mosquitto_broker.url, interval_s=0.2)
    probe = subscriber(mqtt_probe, mosquitto_broker, rig.topic)
    rig.reporter.start()
    observed = 0
    while rig.spool.stats().next_seq <= 5:  # serve across at least four interval boundaries
        rig.metrics.observe_request(1.2)
        rig.metrics.observe_invocation(1)
        observed += 1
    rig.reporter.stop()
    last = rig.spool.stats().next_seq - 1
    wait_until(lambda: has_all(probe, rig.topic, last), 10, f"records 1..{last}")

    arrived = received_seqs(probe, rig.topic)
    assert arrived == list(range(1, last + 1)), "an unbroken run, each once, in order"
    records = [r for t in received(probe, rig.topic) for r in t.records]
    assert sum(r.served.count for r in records if r.served) == observed
    assert sum(r.invocations for r in records) == observed
    for r in records:
        assert r.model_sha256 == SHA and r.power_estimated and r.power_source == "estimated"
        assert r.interval_s > 0 and r.power_w is not None and r.power_w > 0
        if r.served:
            assert r.throughput_ips == pytest.approx(r.served.count / r.interval_s)
            assert r.energy_mj_per_inference == pytest.approx(r.power_w * r.served.mean_ms)
    stats = rig.spool.stats()
    assert (stats.pending, stats.acked_kept) == (0, last)
    assert rig.problems == []


def test_link_cut_records_accumulate_then_all_arrive(
    mosquitto_broker: BrokerHandle, mqtt_probe: ProbeFactory, make_rig: Callable[..., Rig]
) -> None:
    """The broker is unreachable for a while: records stay pending, then every seq arrives."""
    proxy = TcpProxy(mosquitto_broker.port).start()
    try:
        rig = make_rig(proxy.url, interval_s=0.1)
        probe = subscriber(mqtt_probe, mosquitto_broker, rig.topic)
        rig.reporter.start()
        wait_until(lambda: has_all(probe, rig.topic, 3), 10, "records before the cut")
        proxy.cut()
        wait_until(lambda: not rig.session.connected.is_set(), 10, "the session to notice")
        acked_at_cut = rig.spool.stats().acked_kept
        wait_until(lambda: rig.spool.stats().pending >= 15, 20, "15 records while cut off")
        # Nothing reached the broker, so nothing was acknowledged or deleted meanwhile.
        stats = rig.spool.stats()
        assert stats.acked_kept == acked_at_cut
        assert stats.pending + stats.acked_kept == stats.next_seq - 1
        proxy.restore()
        wait_until(lambda: rig.spool.stats().pending == 0, 30, "the backlog to drain")
        last = rig.spool.stats().next_seq - 1
        wait_until(lambda: has_all(probe, rig.topic, last), 10, f"records 1..{last}")
        assert rig.spool.stats().dropped_total == 0
        assert set(received_seqs(probe, rig.topic)) == set(range(1, last + 1))
    finally:
        proxy.stop()


def test_unacknowledged_publish_stays_pending(
    mosquitto_broker: BrokerHandle, mqtt_probe: ProbeFactory, make_rig: Callable[..., Rig]
) -> None:
    """A stalled link (PUBLISH sent, no PUBACK back): the records are not marked acked."""
    proxy = TcpProxy(mosquitto_broker.port).start()
    try:
        rig = make_rig(proxy.url, interval_s=60.0, puback_wait_s=0.5)
        probe = subscriber(mqtt_probe, mosquitto_broker, rig.topic)
        rig.reporter.collect_now()
        assert rig.reporter.flush() == 1
        proxy.cut("stall")
        for _ in range(3):
            rig.reporter.collect_now()
        assert rig.session.connected.is_set(), "TCP cannot see a stall yet"
        assert rig.reporter.flush() == 0
        stats = rig.spool.stats()
        assert (stats.pending, stats.acked_kept) == (3, 1)
        proxy.restore()
        wait_until(lambda: rig.reporter.flush() >= 0 and rig.spool.stats().pending == 0, 15, "ack")
        wait_until(lambda: has_all(probe, rig.topic, 4), 10, "records 1..4")
    finally:
        proxy.stop()


def test_backlog_is_sent_in_capped_messages(
    mosquitto_broker: BrokerHandle, mqtt_probe: ProbeFactory, make_rig: Callable[..., Rig]
) -> None:
    """2 x cap + 50 records spooled offline go out as cap + cap + 50 once connected."""
    total = 2 * MAX_TELEMETRY_RECORDS + 50
    rig = make_rig(mosquitto_broker.url, interval_s=60.0, keep_acked=1_000, connect=False)
    probe = subscriber(mqtt_probe, mosquitto_broker, rig.topic)
    for _ in range(total):
        rig.reporter.collect_now()
    assert rig.reporter.flush() == 0  # not connected: nothing published, nothing acked
    rig.reporter.start()
    rig.session.start()  # on_connect -> wake() -> drain
    wait_until(lambda: has_all(probe, rig.topic, total), 20, f"records 1..{total}")
    messages = probe.messages(rig.topic)
    sizes = [len(parse(m.payload, Telemetry).records) for m in messages]
    assert sizes == [MAX_TELEMETRY_RECORDS, MAX_TELEMETRY_RECORDS, 50]
    assert all(len(m.payload) <= MAX_JSON_BYTES for m in messages)
    wait_until(lambda: rig.spool.stats().pending == 0, 10, "all acknowledged")


def fake_board_sysfs(root: Path) -> Path:
    """A board with four INA power monitors (summed, long source label) and a CPU zone."""
    for index, chip in enumerate(["ina219", "ina226", "ina230", "ina260"]):
        hwmon = root / "devices" / "platform" / f"i2c-{index}" / "hwmon" / f"hwmon{index}"
        hwmon.mkdir(parents=True)
        (hwmon / "name").write_text(f"{chip}\n")
        (hwmon / "power1_input").write_text(f"{(index + 1) * 750_000}\n")
        # Long rail names, as some boards have: they make a full record ~1 KB of JSON.
        (hwmon / "in1_label").write_text(f"VDD_RAIL_{chip.upper()}_MAIN_{'SUPPLY_' * 12}\n")
        (root / "class" / "hwmon").mkdir(parents=True, exist_ok=True)
        (root / "class" / "hwmon" / f"hwmon{index}").symlink_to(hwmon)
    zone = root / "devices" / "virtual" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("51234\n")
    (root / "class" / "thermal").mkdir(parents=True)
    (root / "class" / "thermal" / "thermal_zone0").symlink_to(zone)
    return root


def test_full_records_are_split_under_the_byte_cap(
    mosquitto_broker: BrokerHandle,
    mqtt_probe: ProbeFactory,
    make_rig: Callable[..., Rig],
    tmp_path: Path,
) -> None:
    """Records with latency stats, power and a long source label: a full batch exceeds 128 KiB,
    so fewer records go per message."""
    sysfs = fake_board_sysfs(tmp_path / "sys")
    rig = make_rig(mosquitto_broker.url, interval_s=60.0, keep_acked=1_000, sysfs_root=sysfs)
    probe = subscriber(mqtt_probe, mosquitto_broker, rig.topic)
    for i in range(300):
        for latency in (0.2, 1.7, 3.1, 40.0, 900.0 + i):  # spread over many buckets
            rig.metrics.observe_request(latency)
        rig.reporter.collect_now()
    first = rig.spool.pending(MAX_TELEMETRY_RECORDS)
    assert first[0].power_source.startswith("hwmon:") and first[0].temperature_c == 51.234
    full = dump(Telemetry(DEVICE, records=tuple(first)))
    assert len(full) > MAX_MESSAGE_BYTES, "precondition: a full batch exceeds the byte cap"
    assert rig.reporter.flush() == 300
    wait_until(lambda: has_all(probe, rig.topic, 300), 10, "records 1..300")
    messages = probe.messages(rig.topic)
    assert all(len(m.payload) <= MAX_MESSAGE_BYTES for m in messages)
    assert all(len(parse(m.payload, Telemetry).records) < MAX_TELEMETRY_RECORDS for m in messages)
    assert received_seqs(probe, rig.topic) == list(range(1, 301))


def test_stop_spools_the_partial_interval_and_stops_power_sampling(
    mosquitto_broker: BrokerHandle,
    mqtt_probe: ProbeFactory,
    make_rig: Callable[..., Rig],
    tmp_path: Path,
) -> None:
    """A request served just before stop() is in the final record; no sampler thread is left."""
    sysfs = fake_board_sysfs(tmp_path / "sys")
    before = {t for t in threading.enumerate() if t.name == "edgefleet-power-sampler"}
    rig = make_rig(mosquitto_broker.url, interval_s=60.0, sysfs_root=sysfs)
    probe = subscriber(mqtt_probe, mosquitto_broker, rig.topic)
    rig.reporter.start()
    assert {t for t in threading.enumerate() if t.name == "edgefleet-power-sampler"} - before
    rig.metrics.observe_request(2.5)
    rig.reporter.stop()
    message = parse(probe.wait_for(rig.topic).payload, Telemetry)
    (final,) = message.records
    assert final.seq == 1 and final.served is not None and final.served.count == 1
    assert final.interval_s < 60.0
    assert final.power_w == pytest.approx(0.75 + 1.5 + 2.25 + 3.0)  # the four monitors summed
    assert final.energy_mj_per_inference == pytest.approx(7.5 * 2.5)
    samplers = {t for t in threading.enumerate() if t.name == "edgefleet-power-sampler"}
    assert samplers - before == set()


def test_resend_answers_held_records_and_unavailable(
    mosquitto_broker: BrokerHandle, mqtt_probe: ProbeFactory, make_rig: Callable[..., Rig]
) -> None:
    """keep_acked=3: a resend of 1..8 gets records 6..8 and `unavailable` 1..5."""
    rig = make_rig(mosquitto_broker.url, interval_s=60.0, keep_acked=3)
    for _ in range(8):
        rig.reporter.collect_now()
    assert rig.reporter.flush() == 8
    probe = subscriber(mqtt_probe, mosquitto_broker, rig.topic)
    assert rig.reporter.resend([SeqRange(1, 8), SeqRange(20, 30)]) == 1
    message = parse(probe.wait_for(rig.topic).payload, Telemetry)
    assert [r.seq for r in message.records] == [6, 7, 8]
    assert message.unavailable == (SeqRange(1, 5),)
    assert message.device_id == DEVICE
    assert rig.reporter.resend([SeqRange(40, 50)]) == 0  # not issued yet: nothing to say


@pytest.fixture
def persistent_broker(mosquitto_binary: str, tmp_path: Path) -> Iterator[BrokerHandle]:
    """A mosquitto with persistence, so a subscriber's session outlives a broker restart."""
    handle = start_mosquitto(tmp_path / "broker", persistence=True, binary=mosquitto_binary)
    yield handle
    handle.stop()


def test_broker_stopped_and_restarted_loses_no_record(
    persistent_broker: BrokerHandle,
    mqtt_probe: ProbeFactory,
    make_rig: Callable[..., Rig],
    mosquitto_binary: str,
    tmp_path: Path,
) -> None:
    """mosquitto itself goes away and comes back: every seq reaches the subscriber."""
    rig = make_rig(persistent_broker.url, interval_s=0.2)
    probe = mqtt_probe(
        persistent_broker, client_id=f"ctl-{uuid.uuid4().hex[:8]}", clean_session=False
    )
    probe.subscribe(rig.topic)
    rig.reporter.start()
    wait_until(lambda: has_all(probe, rig.topic, 2), 10, "records before the stop")
    persistent_broker.stop()
    wait_until(lambda: not rig.session.connected.is_set(), 10, "the session to notice")
    wait_until(lambda: rig.spool.stats().pending >= 5, 10, "records while the broker is down")
    restarted = start_mosquitto(
        tmp_path / "broker",
        port=persistent_broker.port,
        persistence=True,
        binary=mosquitto_binary,
    )
    try:
        wait_until(rig.session.connected.is_set, 40, "the reporter to reconnect")
        wait_until(lambda: rig.spool.stats().pending == 0, 20, "the backlog to drain")
        last = rig.spool.stats().next_seq - 1
        wait_until(lambda: has_all(probe, rig.topic, last), 40, f"records 1..{last}")
        assert set(received_seqs(probe, rig.topic)) == set(range(1, last + 1))
    finally:
        rig.reporter.stop(flush_budget_s=0)
        restarted.stop()

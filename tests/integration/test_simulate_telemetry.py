"""Tests for controller/simulate/telemetry.py: simulated agents' telemetry on a real mosquitto."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import firmware_profiles
from agent.protocol import (
    LATENCY_BUCKETS_MS,
    ArtifactRef,
    Command,
    Desired,
    Event,
    SeqRange,
    Telemetry,
    TelemetryRecord,
    Topics,
    dump,
    parse,
)
from controller.brokers.base import BrokerHandle
from controller.cli.simulate import simulate_command
from controller.fleet.artifacts import build_manifest
from controller.simulate import FaultSpec, Simulation, parse_fault
from controller.simulate.telemetry import served_stats, synth_record
from tests.mqtt_helpers import MqttProbe
from tests.mqtt_helpers import wait_until as poll_until
from tests.polling import wait_until

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny_int8.tflite"
ProbeFactory = Callable[..., MqttProbe]


# =========================================================================== helpers


class TelemetryLog:
    """Every telemetry message a probe received, parsed strictly once, with its arrival time."""

    def __init__(self, probe: MqttProbe, root: str) -> None:
        """Follow `root`'s telemetry topics on `probe` (already subscribed)."""
        self.probe = probe
        self.pattern = f"{root}/devices/+/telemetry"
        self.root = root
        self.messages: list[tuple[float, Telemetry]] = []
        self._seen = 0

    def update(self) -> list[tuple[float, Telemetry]]:
        """Parse what arrived since the last call; every batch must parse and match its topic."""
        received = self.probe.messages(self.pattern)
        for message in received[self._seen :]:
            batch = parse(message.payload, Telemetry)
            assert message.topic == f"{self.root}/devices/{batch.device_id}/telemetry"
            self.messages.append((message.received_at, batch))
        self._seen = len(received)
        return self.messages

    def seqs(self) -> dict[str, list[int]]:
        """Record seqs per device in arrival order (repeats included)."""
        out: dict[str, list[int]] = {}
        for _, batch in self.update():
            out.setdefault(batch.device_id, []).extend(r.seq for r in batch.records)
        return out

    def records(self, device: str) -> dict[int, tuple[float, TelemetryRecord]]:
        """A device's records by seq, with the arrival time of their first delivery."""
        out: dict[int, tuple[float, TelemetryRecord]] = {}
        for received_at, batch in self.update():
            if batch.device_id == device:
                for record in batch.records:
                    out.setdefault(record.seq, (received_at, record))
        return out

    def gaps(self, device: str) -> list[int]:
        """Seqs below the highest one received that never arrived."""
        seen = set(self.seqs().get(device, []))
        return sorted(set(range(1, max(seen, default=0) + 1)) - seen)


def at_least(log: TelemetryLog, devices: list[str], count: int) -> bool:
    """Every device's highest received seq is at least `count`."""
    seqs = log.seqs()
    return all(max(seqs.get(d, [0])) >= count for d in devices)


def all_acked(sim: Simulation) -> bool:
    """Every record taken so far was sent and acknowledged (none spooled or awaiting PUBACK)."""
    counters = sim.counters
    return counters.telemetry_records == counters.telemetry_sent == counters.telemetry_acked


def unavailable(log: TelemetryLog) -> int:
    """How many received batches carry `unavailable` ranges."""
    return sum(1 for _, batch in log.update() if batch.unavailable)


def ranges(seqs: list[int]) -> tuple[SeqRange, ...]:
    """Sorted seqs as inclusive ranges."""
    out: list[SeqRange] = []
    for seq in seqs:
        if out and seq == out[-1].last + 1:
            out[-1] = SeqRange(out[-1].first, seq)
        else:
            out.append(SeqRange(seq, seq))
    return tuple(out)


@contextmanager
def running(sim: Simulation) -> Iterator[Simulation]:
    """Start a simulation, wait for every connection, stop it at the end."""
    sim.start()
    try:
        assert sim.wait_connected(20), f"only {sim.counters.connected} connected"
        yield sim
    finally:
        sim.stop()


def watch(mqtt_probe: ProbeFactory, broker: BrokerHandle, root: str) -> TelemetryLog:
    """A probe on every device's telemetry and events topics."""
    probe = mqtt_probe(broker)
    probe.subscribe(f"{root}/devices/+/telemetry")
    probe.subscribe(f"{root}/devices/+/events")
    return TelemetryLog(probe, root)


def resend(log: TelemetryLog, device: str, command_id: str, *wanted: SeqRange) -> None:
    """Publish a resend_telemetry command to a device, as the controller would."""
    command = Command(command_id=command_id, action="resend_telemetry", seq_ranges=wanted)
    log.probe.publish(Topics(log.root).cmd(device), dump(command))


# =========================================================================== figures


@pytest.mark.parametrize(("p50", "count"), [(0.07, 1), (0.1, 12), (3.3, 300), (78.0, 9000)])
def test_served_stats_are_ordered_and_buckets_add_up(p50: float, count: int) -> None:
    """Percentiles increase, the buckets hold exactly `count` requests around the median."""
    stats = served_stats(p50, count)
    assert stats.p50_ms < stats.p90_ms < stats.p99_ms <= stats.max_ms
    assert sum(stats.buckets) == stats.count == count
    bounds = (*LATENCY_BUCKETS_MS, math.inf)
    lower_bounds = (0.0, *LATENCY_BUCKETS_MS)
    # sigma 0.2: under 0.1 % of requests are below p50 / 2 or above 2 x p50.
    far = sum(
        n
        for n, low, high in zip(stats.buckets, lower_bounds, bounds, strict=True)
        if high < p50 / 2 or low > p50 * 2
    )
    assert far <= max(1, 0.002 * count), stats.buckets
    if count >= 100:  # the bucket holding the median holds the median request
        cumulative = 0
        for n, bound in zip(stats.buckets, bounds, strict=True):
            cumulative += n
            if bound >= p50:
                break
        assert cumulative >= count / 2


def test_a_record_is_a_function_of_its_fields() -> None:
    """The same fields give the same record (resends repeat it exactly); slow scales latency."""
    profile = firmware_profiles.load_all()["rpi4"]
    fields = (7, 1_700_000_000.25, 10.0, "a" * 64, 2 * 1024 * 1024, 1.0, 0)
    first = synth_record(profile, "0:sim-0001", fields)
    assert first == synth_record(profile, "0:sim-0001", fields)
    slow = synth_record(profile, "0:sim-0001", (*fields[:5], 3.0, 0))
    assert first.served is not None and slow.served is not None
    assert slow.served.p50_ms == pytest.approx(3 * first.served.p50_ms, rel=1e-5)
    assert 100 <= first.served.count <= 500  # a few hundred requests per 10 s
    assert first.power_estimated and first.power_source == "simulated"
    assert first.power_w is not None and first.power_w > profile.power.idle_w
    idle = synth_record(profile, "0:sim-0001", (8, 1_700_000_010.0, 10.0, None, 0, 1.0, 0))
    assert idle.served is None and idle.model_sha256 is None and idle.invocations == 0
    assert idle.power_w == pytest.approx(profile.power.idle_w)


def test_telemetry_loss_fault_parses_with_and_without_a_fraction() -> None:
    """telemetry-loss:P% takes the default share; =F sets it; 1 or more is refused."""
    assert parse_fault("telemetry-loss:10%") == FaultSpec(
        "telemetry-loss", 0.25, percent=10.0, text="telemetry-loss:10%"
    )
    assert parse_fault("telemetry-loss=0.5:3").value == 0.5
    with pytest.raises(ValueError, match="telemetry-loss value must be a fraction"):
        parse_fault("telemetry-loss=1:3")


# =========================================================================== on the wire


@pytest.mark.integration
def test_every_device_sends_consecutive_records_with_plausible_figures(
    mosquitto_broker: BrokerHandle, topic_root: str, mqtt_probe: ProbeFactory
) -> None:
    """50 devices, 0.5 s interval: seqs 1, 2, 3, … once each and in order; devices serving a
    model report its sha and served latencies, the others none."""
    log = watch(mqtt_probe, mosquitto_broker, topic_root)
    topics = Topics(topic_root)
    manifest = build_manifest(TINY, name="m", version="1", recipe="as-is", profile=None)
    log.probe.publish(topics.manifest(manifest.sha256), dump(manifest), retain=True)
    log.probe.publish(topics.chunk(manifest.sha256, 0), TINY.read_bytes(), retain=True)
    sim = Simulation(mosquitto_broker.url, 50, topic_root=topic_root, telemetry_interval_s=0.5)
    ids = sim.device_ids
    serving = ids[:25]
    ref = ArtifactRef(manifest.sha256, manifest.size, manifest.name, manifest.version)
    for device in serving:
        desired = Desired(generation=1, deployment_id="dep-t", artifact=ref)
        log.probe.publish(topics.desired(device), dump(desired), retain=True)
    with running(sim):
        wait_until(lambda: sim.counters.activated == 25, 10, "25 activations")
        wait_until(lambda: at_least(log, ids, 4), 10, "4 records from every device")
        activated_at = time.time()
        wait_until(
            lambda: all(
                any(r.ts > activated_at for _, r in log.records(d).values()) for d in serving
            ),
            5,
            "a record after activation from every serving device",
        )
        wait_until(lambda: all_acked(sim), 5, "a PUBACK for every record")
    for device, seqs in log.seqs().items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{device}: {seqs}"
    for device in ids:
        profile = firmware_profiles.load_all()[sim.device(device)["profile"]]
        for _, record in log.records(device).values():
            assert record.power_estimated and record.power_source == "simulated"
            assert record.dropped_total == 0 and record.peak_rss_mb >= record.rss_mb
            assert record.power_w is not None and record.power_w >= profile.power.idle_w
            if record.model_sha256 is None:
                assert record.served is None and record.energy_mj_per_inference is None
                assert device not in serving or record.ts < activated_at
                continue
            assert device in serving and record.model_sha256 == manifest.sha256
            served = record.served
            assert served is not None and served.count >= 1
            assert served.p50_ms < served.p90_ms < served.p99_ms <= served.max_ms
            assert record.energy_mj_per_inference == pytest.approx(
                record.power_w * served.mean_ms, rel=1e-4
            )
            assert record.throughput_ips == pytest.approx(served.count / record.interval_s, 1e-3)
    counters = sim.counters
    assert counters.telemetry_dropped == counters.telemetry_lost == counters.errors == 0


@pytest.mark.integration
def test_records_spooled_during_an_outage_arrive_after_the_reconnect(
    mosquitto_broker: BrokerHandle, topic_root: str, mqtt_probe: ProbeFactory
) -> None:
    """Every connection dropped for 2 s: the records taken meanwhile come after the reconnect,
    and each device's seqs stay gap-free."""
    log = watch(mqtt_probe, mosquitto_broker, topic_root)
    sim = Simulation(mosquitto_broker.url, 50, topic_root=topic_root, telemetry_interval_s=0.5)
    ids = sim.device_ids
    with running(sim):
        wait_until(lambda: at_least(log, ids, 2), 10, "2 records from every device")
        dropped_at, dropped_mono = time.time(), time.monotonic()
        sim.drop_connections(ids, 2.0)
        wait_until(lambda: sim.counters.connects == 100, 15, "every device reconnected")
        wait_until(
            lambda: all(
                any(r.ts > dropped_at + 2.5 for _, r in log.records(d).values()) for d in ids
            ),
            10,
            "a record taken after the reconnect from every device",
        )
        wait_until(lambda: all_acked(sim), 5, "a PUBACK for every record")
        assert all(sim.device(d)["telemetry"]["pending"] == 0 for d in ids)
    for device in ids:
        assert log.gaps(device) == [], device
        records = log.records(device)
        offline = [(arrived, r) for arrived, r in records.values() if 0.3 < r.ts - dropped_at < 1.7]
        assert len(offline) >= 2, f"{device}: {len(offline)} records from the outage"
        assert all(arrived > dropped_mono + 1.9 for arrived, _ in offline), device
    assert sim.counters.telemetry_dropped == sim.counters.telemetry_lost == 0


@pytest.mark.integration
def test_resend_answers_held_records_and_unavailable_for_forgotten_ones(
    mosquitto_broker: BrokerHandle, topic_root: str, mqtt_probe: ProbeFactory
) -> None:
    """With 4 acked records kept: the newest come again, byte-equal; older ones are reported
    unavailable; seqs not taken yet are neither."""
    log = watch(mqtt_probe, mosquitto_broker, topic_root)
    sim = Simulation(
        mosquitto_broker.url,
        2,
        topic_root=topic_root,
        telemetry_interval_s=0.3,
        telemetry_keep_acked=4,
    )
    device = sim.device_ids[0]
    with running(sim):
        wait_until(lambda: at_least(log, [device], 8), 10, "8 records")
        newest = max(log.seqs()[device])
        wanted = (
            SeqRange(1, 2),
            SeqRange(newest - 1, newest),
            SeqRange(newest + 500, newest + 509),
        )
        resend(log, device, "resend-1", *wanted)
        answer = wait_until(
            lambda: [b for _, b in log.update() if b.device_id == device and b.unavailable],
            10,
            "the resend answer",
        )
        done = log.probe.wait_for(
            f"{topic_root}/devices/{device}/events",
            lambda m: parse(m.payload, Event).event_id == "resend-1",
        )
    (batch,) = answer
    assert batch.unavailable == (SeqRange(1, 2),)
    originals = log.records(device)
    assert [r.seq for r in batch.records] == [newest - 1, newest]
    assert list(batch.records) == [originals[newest - 1][1], originals[newest][1]]
    assert parse(done.payload, Event).kind == "command"
    assert sim.counters.telemetry_resent == 2 and sim.counters.telemetry_unavailable == 2


@pytest.mark.integration
def test_a_full_spool_drops_the_oldest_and_says_so(
    mosquitto_broker: BrokerHandle, topic_root: str, mqtt_probe: ProbeFactory
) -> None:
    """A 3-record spool through a 2 s outage: the oldest records go, later records carry
    dropped_total, and a resend of the gap is answered `unavailable`."""
    log = watch(mqtt_probe, mosquitto_broker, topic_root)
    sim = Simulation(
        mosquitto_broker.url,
        2,
        topic_root=topic_root,
        telemetry_interval_s=0.2,
        telemetry_spool_records=3,
    )
    ids = sim.device_ids
    with running(sim):
        wait_until(lambda: at_least(log, ids, 2), 10, "2 records from each device")
        dropped_at = time.time()
        sim.drop_connections(ids, 2.0)
        wait_until(lambda: sim.counters.connects == 4, 15, "both reconnected")
        wait_until(
            lambda: all(
                any(r.ts > dropped_at + 2.5 for _, r in log.records(d).values()) for d in ids
            ),
            10,
            "records after the reconnect",
        )
        gaps = {d: log.gaps(d) for d in ids}
        for number, device in enumerate(ids):
            gap = gaps[device]
            assert len(gap) >= 3 and gap == list(range(gap[0], gap[-1] + 1)), gap
            after = [r for s, (_, r) in log.records(device).items() if s > gap[-1]]
            assert max(r.dropped_total for r in after) == len(gap)
            resend(log, device, f"gap-{number}", SeqRange(gap[0], gap[-1]))
        answers = wait_until(
            lambda: [b for _, b in log.update() if b.unavailable] if unavailable(log) == 2 else [],
            10,
            "both answers",
        )
    for batch in answers:
        gap = gaps[batch.device_id]
        assert batch.records == () and batch.unavailable == (SeqRange(gap[0], gap[-1]),)
    assert sim.counters.telemetry_dropped == sum(len(g) for g in gaps.values())


@pytest.mark.integration
def test_telemetry_loss_makes_gaps_that_resends_fill(
    mosquitto_broker: BrokerHandle, topic_root: str, mqtt_probe: ProbeFactory
) -> None:
    """telemetry-loss=0.3 on every device: gaps appear, and asking again (answers can be lost
    too, so maybe more than once) fills every one of them."""
    log = watch(mqtt_probe, mosquitto_broker, topic_root)
    sim = Simulation(
        mosquitto_broker.url,
        10,
        topic_root=topic_root,
        telemetry_interval_s=0.2,
        faults=[parse_fault("telemetry-loss=0.3:100%")],
    )
    ids = sim.device_ids
    assert sim.devices_with("telemetry-loss") == ids
    with running(sim):
        wait_until(lambda: at_least(log, ids, 12), 10, "12 records from every device")
        first_gaps = {d: log.gaps(d) for d in ids}
        assert sum(map(len, first_gaps.values())) > 0 and sim.counters.telemetry_lost > 0
        deadline = time.monotonic() + 12
        round_number = 0
        while any(set(first_gaps[d]) & set(log.gaps(d)) for d in ids):
            assert time.monotonic() < deadline, {d: log.gaps(d) for d in ids}
            round_number += 1
            for device in ids:
                missing = sorted(set(first_gaps[device]) & set(log.gaps(device)))
                if missing:
                    resend(log, device, f"loss-{round_number}-{device}", *ranges(missing))
            poll_until(lambda: not any(set(first_gaps[d]) & set(log.gaps(d)) for d in ids), 1.0)
    assert not any(b.unavailable for _, b in log.update())
    assert sim.counters.telemetry_resent > 0 and sim.counters.errors == 0


# =========================================================================== CLI


@pytest.mark.integration
def test_cli_telemetry_interval_turns_telemetry_on_and_off(
    mosquitto_broker: BrokerHandle, topic_root: str
) -> None:
    """--telemetry-interval 0.2 sends records; 0 sends none."""
    app = typer.Typer()
    app.command("simulate")(simulate_command)
    app.command("noop")(lambda: None)  # keep "simulate" a sub-command
    counts = []
    for interval in ("0.2", "0"):
        args = ["simulate", "-n", "3", "--broker", mosquitto_broker.url, "--topic-root"]
        args += [topic_root, "--duration", "1.5", "--json", "--telemetry-interval", interval]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        snap = json.loads(result.stdout)
        counts.append((snap["telemetry_records"], snap["telemetry_sent"]))
    (records_on, sent_on), off = counts
    assert records_on >= 3 * 4 and sent_on >= 3 * 3
    assert off == (0, 0)

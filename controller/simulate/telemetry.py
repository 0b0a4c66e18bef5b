"""Telemetry of simulated agents: one record per interval, spooled and sent like the real agent.

Every simulated device takes a TelemetryRecord each `telemetry_interval_s` on the loop's timer
heap, spools it (bounded, drop_oldest), publishes spooled records in batches while connected and
keeps each batch until its PUBACK; the last acknowledged records answer `resend_telemetry`.
A record is held as 26 packed bytes (seq, ts, interval, model, slow factor, dropped count) and
its figures are synthesized again from them whenever it is sent: the full windows of 10,000
devices hold 26 MB, not the ~600 MB their JSON would (docs/simulate.md, "Telemetry").
"""

from __future__ import annotations

import math
import random
import struct
import time
import zlib
from collections.abc import Sequence
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

import firmware_profiles
from agent.protocol import (
    LATENCY_BUCKETS_MS,
    MAX_TELEMETRY_RECORDS,
    LatencyStats,
    SeqRange,
    Telemetry,
    TelemetryRecord,
    dump,
)
from controller.simulate.download import StoredModel
from controller.simulate.figures import BENCH_THREADS, RSS_BASE_MB, synth_figures

if TYPE_CHECKING:
    from controller.simulate.agent import SimAgent
    from controller.simulate.loop import Simulation

# ---- spool and sending ------------------------------------------------------------------------
# The real agent's default interval (protocol/config.py): 10,000 devices then send 1,000 records/s.
DEFAULT_INTERVAL_S = 10.0
# Records spooled while offline. The real agent keeps 10,000 in SQLite; in memory, 1,000 packed
# records (26 KB, 2.8 h of 10 s intervals) per device keep a 10,000-device outage under 300 MB.
DEFAULT_SPOOL_RECORDS = 1_000
# Acknowledged records kept for resend_telemetry: ~17 min at 10 s, enough for a controller that
# asks for a gap after a few intervals; 2.6 KB per device when full.
DEFAULT_KEEP_ACKED = 100
# Telemetry batches awaiting PUBACK per device: paho's inflight window (20) is shared with status,
# events and Needs, and 8 batches of up to MAX_TELEMETRY_RECORDS (150) drain a full spool in one
# round trip.
MAX_INFLIGHT_BATCHES = 8
# Label of synthesized power figures (the benchmark reports say "estimated:profile").
POWER_SOURCE = "simulated"

# One spooled record: seq, ts, interval_s, model index (NO_MODEL = none), slow factor, dropped.
RECORD = struct.Struct("<IdfHfI")
NO_MODEL = 0xFFFF
_SEQ = struct.Struct("<I")

# ---- synthesized figures ----------------------------------------------------------------------
# Served requests per second of a device, seeded per device: "a few hundred per 10 s interval".
SERVED_RATE_PER_S = (20.0, 40.0)
# Interval-to-interval variation of the request count and of the median latency.
COUNT_NOISE = 0.10
LATENCY_DRIFT = 0.05
# Spread (sigma of ln latency) of served requests: wider than a benchmark's (LATENCY_SHAPE p99 is
# 1.18 x p50), because served requests queue behind each other: p90 = 1.29x, p99 = 1.59x p50.
SERVED_SIGMA = 0.2
# At most this share of one core goes to inference: the count is capped so latency x count fits.
MAX_BUSY_SHARE = 0.9
# CPU of an idle agent process, assumed: it wakes only for keepalives and its records.
IDLE_CPU_PERCENT = 1.0
_NORMAL = NormalDist()
_Z90 = _NORMAL.inv_cdf(0.90)
_Z99 = _NORMAL.inv_cdf(0.99)
_LOG_BOUNDS = tuple(math.log(bound) for bound in LATENCY_BUCKETS_MS)


def _sig(value: float) -> float:
    """`value` to 6 significant digits: short JSON that keeps a 0.03 mJ figure exact to 1e-5."""
    return float(f"{value:.6g}")


def served_stats(p50: float, count: int, sigma: float = SERVED_SIGMA) -> LatencyStats:
    """Interval latencies of `count` log-normal requests with median `p50`: no sampling needed.

    Percentiles are the distribution's quantiles and the buckets split `count` by the CDF at each
    bound (largest remainder, so they add up to `count` exactly).
    """
    log_median = math.log(p50)
    cdf = [_NORMAL.cdf((b - log_median) / sigma) for b in _LOG_BOUNDS] + [1.0]
    shares = [count * (cdf[0] if i == 0 else cdf[i] - cdf[i - 1]) for i in range(len(cdf))]
    buckets = [int(share) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: shares[i] - buckets[i], reverse=True)
    for i in by_remainder[: count - sum(buckets)]:
        buckets[i] += 1
    # The largest of `count` draws sits near the 1 - 1/(2 count) quantile.
    z_max = _NORMAL.inv_cdf(1.0 - 0.5 / count) if count > 1 else 0.0
    return LatencyStats(
        count=count,
        p50_ms=_sig(p50),
        p90_ms=_sig(p50 * math.exp(_Z90 * sigma)),
        p99_ms=_sig(p50 * math.exp(_Z99 * sigma)),
        mean_ms=_sig(p50 * math.exp(sigma * sigma / 2)),
        max_ms=_sig(p50 * math.exp(max(z_max, _Z99) * sigma)),
        buckets=tuple(buckets),
    )


def synth_record(
    profile: firmware_profiles.Profile,
    key: str,
    fields: tuple[int, float, float, str | None, int, float, int],
    *,
    threads: int = 1,
) -> TelemetryRecord:
    """One interval's record from its packed fields; the same fields give the same record.

    `fields` = (seq, ts, interval_s, model sha256 or None, model size, slow factor, dropped);
    the slow factor includes the speed model's factor for the model's recipe and threads.
    `key` names the device (seed:device) and seeds its request rate and per-interval noise.
    `threads` the model runs with keep that many cores (at most the profile's) busy per request.
    """
    seq, ts, interval_s, sha, size, slow, dropped_total = fields
    rng = random.Random(f"{key}:{seq}")
    interval_s = round(interval_s, 3)
    common: dict[str, Any] = {
        "seq": seq,
        "ts": ts,
        "interval_s": interval_s,
        "model_sha256": sha,
        "power_source": POWER_SOURCE,
        "power_estimated": True,
        "dropped_total": dropped_total,
    }
    if sha is None:
        return TelemetryRecord(
            served=None,
            invocations=0,
            throughput_ips=0.0,
            rss_mb=round(RSS_BASE_MB - 0.5, 2),
            peak_rss_mb=RSS_BASE_MB,
            cpu_percent=round(IDLE_CPU_PERCENT * rng.uniform(0.8, 1.2), 2),
            power_w=round(profile.power.estimate_w(busy_cores=0.0), 3),
            **common,
        )
    p50, peak = synth_figures(profile, size, f"{key}:{sha}", slow)
    p50 *= 1.0 + rng.uniform(-LATENCY_DRIFT, LATENCY_DRIFT)
    rate = random.Random(key).uniform(*SERVED_RATE_PER_S)
    mean_ms = p50 * math.exp(SERVED_SIGMA * SERVED_SIGMA / 2)
    capacity = MAX_BUSY_SHARE * interval_s * 1000.0 / mean_ms
    wanted = rate * interval_s * (1.0 + rng.uniform(-COUNT_NOISE, COUNT_NOISE))
    count = max(1, round(min(wanted, capacity)))
    served = served_stats(p50, count)
    busy = count * served.mean_ms / (interval_s * 1000.0) if interval_s > 0 else 0.0
    busy *= min(max(threads, 1), profile.cpu.cores)
    power_w = round(profile.power.estimate_w(busy_cores=busy), 3)
    return TelemetryRecord(
        served=served,
        invocations=count,
        throughput_ips=round(count / interval_s, 3) if interval_s > 0 else 0.0,
        rss_mb=round(peak - 0.5, 2),
        peak_rss_mb=round(peak, 2),
        cpu_percent=round(100.0 * busy + IDLE_CPU_PERCENT * rng.uniform(0.8, 1.2), 2),
        power_w=power_w,
        energy_mj_per_inference=_sig(power_w * served.mean_ms),
        **common,
    )


class FleetTelemetry:
    """Process-wide telemetry settings plus the model table every device's records point into."""

    def __init__(
        self,
        sim: Simulation,
        interval_s: float,
        spool_records: int = DEFAULT_SPOOL_RECORDS,
        keep_acked: int = DEFAULT_KEEP_ACKED,
    ) -> None:
        """Settings of one simulation; models are added as devices activate them."""
        self.sim = sim
        self.interval_s = interval_s
        self.spool_records = spool_records
        self.keep_acked = keep_acked
        self.models: list[tuple[str, StoredModel]] = []
        self._model_index: dict[tuple[str, StoredModel], int] = {}

    def model_index(self, sha: str, entry: StoredModel) -> int:
        """The table index of a model as installed (recipe, threads), added on first use."""
        index = self._model_index.get((sha, entry))
        if index is None:
            if len(self.models) >= NO_MODEL:
                raise OverflowError(f"more than {NO_MODEL} distinct models in one simulation")
            index = self._model_index[(sha, entry)] = len(self.models)
            self.models.append((sha, entry))
        return index

    def first_tick(self, device_id: str) -> float:
        """Seconds from start to a device's first record: 0.5-1.5 intervals, spread by id."""
        return self.interval_s * (0.5 + (zlib.crc32(device_id.encode()) % 1000) / 1000)

    def record(self, agent: SimAgent, packed: bytes | bytearray, offset: int) -> TelemetryRecord:
        """The record packed at `offset`, synthesized for `agent` (same bytes, same record)."""
        seq, ts, interval_s, model, slow, dropped = RECORD.unpack_from(packed, offset)
        key = f"{self.sim.seed}:{agent.device_id}"
        if model == NO_MODEL:
            return synth_record(agent.profile, key, (seq, ts, interval_s, None, 0, slow, dropped))
        sha, entry = self.models[model]
        slow *= self.sim.speed.factor(agent.profile, entry.recipe, entry.threads)
        fields = (seq, ts, interval_s, sha, entry.size, slow, dropped)
        return synth_record(agent.profile, key, fields, threads=entry.threads or BENCH_THREADS)

    def records(self, agent: SimAgent, packed: bytes | bytearray) -> list[TelemetryRecord]:
        """Every record in a run of packed records, in order."""
        return [self.record(agent, packed, off) for off in range(0, len(packed), RECORD.size)]


class DeviceTelemetry:
    """One device's telemetry: the next seq, its spool, batches awaiting PUBACK, acked window."""

    __slots__ = (
        "acked",
        "acked_start",
        "agent",
        "dropped_total",
        "inflight",
        "last_tick",
        "next_seq",
        "pending",
    )

    def __init__(self, agent: SimAgent) -> None:
        """Nothing taken yet; buffers are allocated on first use (most stay small)."""
        self.agent = agent
        self.next_seq = 1
        self.dropped_total = 0
        self.last_tick = 0.0
        # Packed records not sent yet, oldest first (bounded: FleetTelemetry.spool_records).
        self.pending = bytearray()
        # Packet id of a published batch -> its packed records, until the broker's PUBACK.
        self.inflight: dict[int, bytes] | None = None
        # Acknowledged (or lost-on-purpose) records, at most keep_acked of them: appended while
        # filling, then an exact-size ring whose oldest record starts at acked_start (a bytearray
        # trimmed at the front keeps its old allocation: that doubled the window's memory).
        self.acked = bytearray()
        self.acked_start = 0

    # ----------------------------------------------------------------- taking records
    def start(self, now: float) -> None:
        """Schedule the first record (monotonic `now` is the start of its interval)."""
        fleet = self.agent.sim.telemetry
        assert fleet is not None
        self.last_tick = now
        self.agent.sim.call_at(now + fleet.first_tick(self.agent.device_id), self.tick)

    def tick(self) -> None:
        """Take this interval's record, spool it, send what can be sent, schedule the next."""
        agent = self.agent
        sim = agent.sim
        fleet = sim.telemetry
        if fleet is None or sim.stopping:
            return
        now = time.monotonic()
        interval_s, self.last_tick = now - self.last_tick, now
        model = NO_MODEL
        if agent.current is not None and agent.current in agent.models:
            model = fleet.model_index(agent.current, agent.models[agent.current])
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        if len(self.pending) >= fleet.spool_records * RECORD.size:
            del self.pending[: RECORD.size]  # drop_oldest: recent state matters more
            self.dropped_total += 1
            sim.counters.telemetry_dropped += 1
        fields = (seq, time.time(), interval_s, model, agent.faults.slow, self.dropped_total)
        self.pending += RECORD.pack(*fields)
        sim.counters.telemetry_records += 1
        self.flush()
        when = self.last_tick + fleet.interval_s
        sim.call_at(when, self.tick)

    # ----------------------------------------------------------------- sending
    def flush(self) -> None:
        """Publish spooled records in batches while connected and the inflight window has room."""
        agent = self.agent
        fleet = agent.sim.telemetry
        if fleet is None:
            return
        counters = agent.sim.counters
        batch_bytes = MAX_TELEMETRY_RECORDS * RECORD.size
        while self.pending and agent.connected:
            if self.inflight is not None and len(self.inflight) >= MAX_INFLIGHT_BATCHES:
                return  # the next PUBACK sends more
            batch = bytes(self.pending[:batch_bytes])
            del self.pending[:batch_bytes]
            count = len(batch) // RECORD.size
            if self._lose():
                counters.telemetry_lost += count
                self._keep_acked(batch)
                continue
            payload = self._payload(fleet.records(agent, batch), ())
            mid = agent.publish(agent.base + "telemetry", payload)
            if self.inflight is None:
                self.inflight = {}
            self.inflight[mid] = batch
            counters.telemetry_sent += count

    def on_puback(self, mid: int) -> None:
        """The broker acknowledged a publish: a telemetry batch moves to the acked window."""
        if self.inflight is None:
            return
        batch = self.inflight.pop(mid, None)
        if batch is None:
            return  # a status, event or Need
        if not self.inflight:
            self.inflight = None
        self.agent.sim.counters.telemetry_acked += len(batch) // RECORD.size
        self._keep_acked(batch)
        if self.pending:
            # Not from inside paho's PUBACK handling: the loop runs it in its next turn.
            self.agent.sim.call_at(0.0, self.flush)

    def resend(self, ranges: Sequence[SeqRange]) -> None:
        """Answer resend_telemetry: held records again, `unavailable` for those no longer held.

        Sequence numbers not sent yet (still spooled) or not taken yet are left out: they are
        neither lost nor answerable.
        """
        agent = self.agent
        fleet = agent.sim.telemetry
        held: dict[int, bytes] = {}
        blobs: list[bytes | bytearray] = [self.acked, *(self.inflight or {}).values()]
        for blob in blobs:
            for off in range(0, len(blob), RECORD.size):
                held[_SEQ.unpack_from(blob, off)[0]] = bytes(blob[off : off + RECORD.size])
        upper = _SEQ.unpack_from(self.pending)[0] - 1 if self.pending else self.next_seq - 1
        found: dict[int, bytes] = {}
        gaps: list[tuple[int, int]] = []
        for wanted in ranges:
            first, last = wanted.first, min(wanted.last, upper)
            if first > last:
                continue
            cursor = first
            for seq in sorted(s for s in held if first <= s <= last):
                if seq > cursor:
                    gaps.append((cursor, seq - 1))
                found[seq] = held[seq]
                cursor = seq + 1
            if cursor <= last:
                gaps.append((cursor, last))
        unavailable = _merge(gaps)
        counters = agent.sim.counters
        counters.telemetry_unavailable += sum(last - first + 1 for first, last in unavailable)
        packed = b"".join(found[seq] for seq in sorted(found))
        records = fleet.records(agent, packed) if fleet is not None else []
        step = MAX_TELEMETRY_RECORDS
        for i in range(0, max(len(records), len(unavailable)), step):
            part, gap_part = records[i : i + step], unavailable[i : i + step]
            if self._lose():
                counters.telemetry_lost += len(part)
                continue
            agent.publish(agent.base + "telemetry", self._payload(part, gap_part))
            counters.telemetry_resent += len(part)

    # ----------------------------------------------------------------- helpers
    def _payload(
        self, records: Sequence[TelemetryRecord], unavailable: Sequence[tuple[int, int]]
    ) -> bytes:
        """One Telemetry message of this device."""
        message = Telemetry(
            device_id=self.agent.device_id,
            records=tuple(records),
            unavailable=tuple(SeqRange(first, last) for first, last in unavailable),
        )
        return dump(message)

    def _lose(self) -> bool:
        """telemetry-loss fault: this publish is lost before it leaves (seeded per device)."""
        agent = self.agent
        loss = agent.faults.telemetry_loss
        return bool(loss) and agent.rng is not None and agent.rng.random() < loss

    def _keep_acked(self, batch: bytes) -> None:
        """Add to the acked window, overwriting the oldest records once it holds keep_acked."""
        fleet = self.agent.sim.telemetry
        keep = (fleet.keep_acked if fleet is not None else 0) * RECORD.size
        if len(batch) >= keep:
            self.acked, self.acked_start = bytearray(batch[len(batch) - keep :]), 0
            return
        if len(self.acked) < keep:
            room = keep - len(self.acked)
            self.acked += batch[:room]
            batch = batch[room:]
            if len(self.acked) == keep:
                self.acked = bytearray(self.acked)  # exact size from now on
        if batch:
            start = self.acked_start
            head = min(len(batch), keep - start)
            self.acked[start : start + head] = batch[:head]
            self.acked[: len(batch) - head] = batch[head:]
            self.acked_start = (start + len(batch)) % keep

    def describe(self) -> dict[str, int]:
        """Counts for snapshots and tests: next seq, spooled, awaiting PUBACK, acked, dropped."""
        inflight = sum(len(b) for b in (self.inflight or {}).values()) // RECORD.size
        return {
            "next_seq": self.next_seq,
            "pending": len(self.pending) // RECORD.size,
            "inflight": inflight,
            "acked": len(self.acked) // RECORD.size,
            "dropped_total": self.dropped_total,
        }


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping inclusive ranges (adjacent ones joined)."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


__all__ = [
    "DEFAULT_INTERVAL_S",
    "DeviceTelemetry",
    "FleetTelemetry",
    "served_stats",
    "synth_record",
]

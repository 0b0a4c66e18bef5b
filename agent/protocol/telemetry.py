"""Telemetry messages: per-interval device measurements with per-device sequence numbers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from agent.protocol.errors import ProtocolError
from agent.protocol.limits import LATENCY_BUCKETS_MS, MAX_TELEMETRY_RECORDS, SCHEMA_VERSION
from agent.protocol.names import validate_label
from agent.protocol.topics import validate_device_id, validate_sha256

# Number of histogram counts a LatencyStats carries: one per bound plus the +Inf bucket.
BUCKET_COUNT = len(LATENCY_BUCKETS_MS) + 1


def _check(ok: bool, path: str, problem: str) -> None:
    """Raise a ProtocolError naming the field when a check fails."""
    if not ok:
        raise ProtocolError(f"{path}: {problem}")


@dataclass(frozen=True)
class LatencyStats:
    """Latencies of one interval: exact percentiles from the device plus mergeable buckets."""

    count: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    # Counts per LATENCY_BUCKETS_MS bound (latency <= bound, non-cumulative), then +Inf.
    buckets: tuple[int, ...]

    def __post_init__(self) -> None:
        """Counts agree with the bucket layout; times are non-negative and ordered."""
        # One combined test on the hot path (every record carries one); the messages, built
        # only on failure, name the first field that is wrong, in the order checked below.
        buckets = self.buckets
        if (
            self.count >= 0
            and len(buckets) == BUCKET_COUNT
            and min(buckets) >= 0
            and sum(buckets) == self.count
            and 0 <= self.p50_ms <= self.p90_ms <= self.p99_ms <= self.max_ms
            and self.mean_ms >= 0
        ):
            return
        _check(self.count >= 0, "$.count", f"must be >= 0, got {self.count}")
        _check(
            len(buckets) == BUCKET_COUNT,
            "$.buckets",
            f"{len(buckets)} counts for {BUCKET_COUNT} buckets",
        )
        _check(min(buckets) >= 0, "$.buckets", "counts must be >= 0")
        _check(
            sum(buckets) == self.count,
            "$.buckets",
            f"counts add up to {sum(buckets)}, not count={self.count}",
        )
        for name in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms"):
            value = getattr(self, name)
            _check(value >= 0, f"$.{name}", f"must be >= 0, got {value}")
        _check(
            self.p50_ms <= self.p90_ms <= self.p99_ms <= self.max_ms,
            "$",
            "percentiles must satisfy p50 <= p90 <= p99 <= max",
        )


@dataclass(frozen=True)
class Environment:
    """Conditions a measurement ran under: they explain a slow device better than the model."""

    governor: str | None = None
    cpu_freq_mhz: float | None = None
    cpu_max_freq_mhz: float | None = None
    temperature_c: float | None = None
    threads: int | None = None
    delegate: str | None = None


@dataclass(frozen=True)
class SeqRange:
    """An inclusive range of telemetry sequence numbers."""

    first: int
    last: int

    def __post_init__(self) -> None:
        """Sequence numbers start at 1 and a range is not empty."""
        _check(self.first >= 1, "$.first", f"must be >= 1, got {self.first}")
        _check(self.last >= self.first, "$.last", f"must be >= first ({self.first})")


# Fields of a TelemetryRecord that must not be negative (checked in this order).
_COUNTER_FIELDS = (
    "interval_s",
    "invocations",
    "throughput_ips",
    "rss_mb",
    "peak_rss_mb",
    "cpu_percent",
    "cache_hits",
    "errors",
    "dropped_total",
)


@dataclass(frozen=True)
class TelemetryRecord:
    """What one device measured during one interval; `seq` is unique and increasing per device."""

    seq: int
    ts: float
    interval_s: float
    model_sha256: str | None
    # Inferences served through the local inference service in this interval.
    served: LatencyStats | None
    # Interpreter invocations (fewer than served requests when micro-batching merges them).
    invocations: int
    throughput_ips: float
    rss_mb: float
    peak_rss_mb: float
    cpu_percent: float
    power_source: str
    power_estimated: bool
    temperature_c: float | None = None
    # Average device power over the interval, and that power x the mean served latency.
    power_w: float | None = None
    energy_mj_per_inference: float | None = None
    cache_hits: int = 0
    errors: int = 0
    # Records this device's spool has dropped since it was created (overflow policy).
    dropped_total: int = 0

    def __post_init__(self) -> None:
        """Validate the sequence number, digest and counters."""
        if self.seq < 1:
            raise ProtocolError(f"$.seq: must be >= 1, got {self.seq}")
        if self.model_sha256 is not None:
            validate_sha256(self.model_sha256)
        try:
            validate_label("power source", self.power_source)
        except ProtocolError as exc:
            raise ProtocolError(f"$.power_source: {exc}") from None
        counters = (
            self.interval_s,
            self.invocations,
            self.throughput_ips,
            self.rss_mb,
            self.peak_rss_mb,
            self.cpu_percent,
            self.cache_hits,
            self.errors,
            self.dropped_total,
        )
        if min(counters) < 0:  # one C-level check on the hot path; name the field on failure
            for name in _COUNTER_FIELDS:
                value = getattr(self, name)
                _check(value >= 0, f"$.{name}", f"must be >= 0, got {value}")
        for name in ("power_w", "energy_mj_per_inference"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ProtocolError(f"$.{name}: must be >= 0, got {value}")


@dataclass(frozen=True)
class Telemetry:
    """A batch of telemetry records from one device, in increasing sequence order.

    `unavailable` answers a resend request for records the device no longer holds (dropped on
    overflow), so the controller can count them lost instead of asking forever.
    """

    device_id: str
    records: tuple[TelemetryRecord, ...] = ()
    unavailable: tuple[SeqRange, ...] = ()
    ts: float = field(default_factory=time.time)
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        """Bounded, non-empty, strictly increasing."""
        # Messages are formatted only on failure: this runs for every telemetry message.
        if self.v != SCHEMA_VERSION:
            raise ProtocolError(f"$.v: unsupported schema version {self.v}")
        validate_device_id(self.device_id)
        records = self.records
        _check(bool(records or self.unavailable), "$", "carries neither records nor unavailable")
        if len(records) > MAX_TELEMETRY_RECORDS:
            raise ProtocolError(
                f"$.records: {len(records)} records exceed the {MAX_TELEMETRY_RECORDS}-record cap"
            )
        _check(
            len(self.unavailable) <= MAX_TELEMETRY_RECORDS,
            "$.unavailable",
            f"more than {MAX_TELEMETRY_RECORDS} ranges",
        )
        for i in range(1, len(records)):
            if records[i].seq <= records[i - 1].seq:
                raise ProtocolError(f"$.records[{i}].seq: sequence numbers must increase")


# Overflow policies of the device spool (agent/spool.py): which record goes when it is full.
OverflowPolicy = Literal["drop_oldest", "drop_newest"]

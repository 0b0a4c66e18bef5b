"""Telemetry records and messages as a device sends them, for the store, report, CLI,
metrics and dashboard tests."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from agent.protocol import BUCKET_COUNT, LatencyStats, SeqRange, Telemetry, TelemetryRecord
from controller.fleet.telemetry.reports import bucket_index
from controller.fleet.telemetry.store import IngestResult, TelemetryStore

SHA_A = "a" * 64
SHA_B = "b" * 64
T0 = 1_699_999_980.0  # a whole minute (divisible by 60), so minute arithmetic is readable


def stats(latencies: Sequence[float]) -> LatencyStats:
    """Nearest-rank percentiles and bucket counts of some latencies, as a device sends them."""
    xs = sorted(latencies)

    def pct(q: float) -> float:
        """Nearest-rank quantile."""
        return xs[max(0, math.ceil(q * len(xs)) - 1)]

    buckets = [0] * BUCKET_COUNT
    for x in xs:
        buckets[bucket_index(x)] += 1
    return LatencyStats(
        len(xs), pct(0.5), pct(0.9), pct(0.99), sum(xs) / len(xs), xs[-1], tuple(buckets)
    )


def record(
    seq: int,
    ts: float | None = None,
    latencies: Sequence[float] = (1.0, 2.0, 4.0),
    *,
    sha: str | None = SHA_A,
    power_w: float | None = 2.0,
    interval_s: float = 10.0,
    rss_mb: float = 50.0,
    dropped_total: int = 0,
    estimated: bool = True,
) -> TelemetryRecord:
    """One telemetry record; ts defaults to T0 + 10 s per seq."""
    served = stats(latencies) if latencies else None
    return TelemetryRecord(
        seq=seq,
        ts=T0 + 10.0 * seq if ts is None else ts,
        interval_s=interval_s,
        model_sha256=sha,
        served=served,
        invocations=len(latencies),
        throughput_ips=len(latencies) / interval_s,
        rss_mb=rss_mb,
        peak_rss_mb=rss_mb + 5.0,
        cpu_percent=12.5,
        power_source="estimated" if estimated else "rapl",
        power_estimated=estimated,
        temperature_c=45.0,
        power_w=power_w,
        energy_mj_per_inference=None if power_w is None or not served else power_w * served.mean_ms,
        cache_hits=1,
        errors=0,
        dropped_total=dropped_total,
    )


def message(
    device: str, seqs: Sequence[int] = (), unavailable: Sequence[tuple[int, int]] = ()
) -> Telemetry:
    """A Telemetry message with default records for `seqs` and unavailable ranges."""
    return Telemetry(
        device_id=device,
        records=tuple(record(s) for s in sorted(seqs)),
        unavailable=tuple(SeqRange(a, b) for a, b in unavailable),
    )


def hold_telemetry_ingest(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make every telemetry batch wait (up to 30 s) until the returned gate is set, so a test
    can build a backlog behind a stuck ingest and then let it through."""
    gate = threading.Event()
    original = TelemetryStore.ingest_many

    def held(self: TelemetryStore, messages: Sequence[Telemetry], received: float) -> Any:
        gate.wait(30)
        result: IngestResult = original(self, messages, received)
        return result

    monkeypatch.setattr(TelemetryStore, "ingest_many", held)
    return gate

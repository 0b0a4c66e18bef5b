"""Telemetry wire types: round trips, and every inconsistent record is refused naming the field."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import (
    BUCKET_COUNT,
    LATENCY_BUCKETS_MS,
    MAX_JSON_BYTES,
    MAX_TELEMETRY_BYTES,
    MAX_TELEMETRY_RECORDS,
    BenchmarkReport,
    Command,
    Environment,
    LatencyStats,
    ProtocolError,
    SeqRange,
    Telemetry,
    TelemetryRecord,
    dump,
    parse,
)
from agent.protocol.schema import decode_dataclass

pytestmark = pytest.mark.agent

SHA = "cd" * 32


def stats(count: int = 4) -> LatencyStats:
    """Latency stats with `count` requests, all in the 1 ms bucket."""
    buckets = [0] * BUCKET_COUNT
    buckets[LATENCY_BUCKETS_MS.index(1.0)] = count
    return LatencyStats(count, 0.8, 0.9, 0.95, 0.85, 0.99, tuple(buckets))


def record(seq: int = 1, **changes: Any) -> TelemetryRecord:
    """A plausible record from a Raspberry Pi serving a small model."""
    base = TelemetryRecord(
        seq=seq,
        ts=1_700_000_000.0 + seq * 10,
        interval_s=10.0,
        model_sha256=SHA,
        served=stats(),
        invocations=4,
        throughput_ips=0.4,
        rss_mb=61.5,
        peak_rss_mb=70.25,
        cpu_percent=12.5,
        power_source="hwmon:ina3221",
        power_estimated=False,
        temperature_c=48.3,
        power_w=3.1,
        energy_mj_per_inference=2.6,
    )
    return replace(base, **changes)


def test_bucket_bounds_increase_and_span_tenth_ms_to_seconds() -> None:
    assert list(LATENCY_BUCKETS_MS) == sorted(set(LATENCY_BUCKETS_MS))
    assert LATENCY_BUCKETS_MS[0] == 0.1 and LATENCY_BUCKETS_MS[-1] == 7500.0
    assert len(LATENCY_BUCKETS_MS) + 1 == BUCKET_COUNT


def test_telemetry_round_trips_and_fits_the_cap_at_its_largest() -> None:
    message = Telemetry(
        "pi-007",
        tuple(record(seq) for seq in range(1, MAX_TELEMETRY_RECORDS + 1)),
        unavailable=(SeqRange(1, 3),),
    )
    payload = dump(message)
    assert len(payload) < min(MAX_JSON_BYTES, MAX_TELEMETRY_BYTES)
    assert parse(payload, Telemetry) == message


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"seq": 0}, "$.seq"),
        ({"interval_s": -1.0}, "$.interval_s"),
        ({"power_w": -0.5}, "$.power_w"),
        ({"dropped_total": -1}, "$.dropped_total"),
    ],
)
def test_record_refuses_bad_values_naming_the_field(changes: dict[str, Any], path: str) -> None:
    with pytest.raises(ProtocolError, match=path.replace("$", r"\$")):
        record(**changes)


def test_latency_stats_must_agree_with_its_buckets() -> None:
    good = stats(4)
    with pytest.raises(ProtocolError, match=r"\$.buckets: counts add up to 4, not count=5"):
        replace(good, count=5)
    with pytest.raises(ProtocolError, match=r"\$.buckets: 3 counts"):
        replace(good, buckets=(1, 2, 1))
    with pytest.raises(ProtocolError, match="p50 <= p90"):
        replace(good, p50_ms=2.0)


def test_batch_must_increase_be_bounded_and_not_empty() -> None:
    with pytest.raises(ProtocolError, match=r"\$.records\[1\].seq: sequence numbers must increase"):
        Telemetry("pi-1", (record(2), record(2)))
    with pytest.raises(ProtocolError, match="carries neither"):
        Telemetry("pi-1")
    with pytest.raises(ProtocolError, match="record cap"):
        Telemetry("pi-1", tuple(record(s) for s in range(1, MAX_TELEMETRY_RECORDS + 2)))
    with pytest.raises(ProtocolError, match=r"\$.last: must be >= first"):
        SeqRange(5, 4)


def test_unknown_field_in_a_nested_record_is_named() -> None:
    data = json.loads(dump(Telemetry("pi-1", (record(1),))))
    data["records"][0]["served"]["p95_ms"] = 1.0
    with pytest.raises(ProtocolError, match=r"\$.records\[0\].served.p95_ms: unknown field"):
        parse(json.dumps(data), Telemetry)


def test_resend_command_needs_ranges() -> None:
    command = Command("gap-1", "resend_telemetry", seq_ranges=(SeqRange(4, 9),))
    assert parse(dump(command), Command) == command
    with pytest.raises(ProtocolError, match="needs at least one range"):
        Command("gap-2", "resend_telemetry")


def test_benchmark_report_carries_the_environment_and_older_reports_still_parse() -> None:
    fields: dict[str, Any] = {
        "model_sha256": SHA,
        "runtime": "tflite-runtime",
        "runtime_version": "2.14.0",
        "threads": 2,
        "runs": 50,
        "warmup": 5,
        "power_source": "estimate",
        "power_estimated": True,
    }
    timings = ("init_ms", "first_inference_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms")
    others = ("std_ms", "min_ms", "max_ms", "peak_rss_mb", "rss_mb", "power_w")
    for name in (*timings, *others, "energy_mj_per_inference"):
        fields[name] = 1.0
    older = BenchmarkReport(**fields)
    assert older.environment is None
    env = Environment("schedutil", 1500.0, 1800.0, 51.2, 2, "xnnpack")
    report = replace(older, environment=env)
    assert decode_dataclass(json.loads(dump(report)), BenchmarkReport) == report
    assert decode_dataclass(json.loads(dump(older)), BenchmarkReport) == older


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=20,
    )
)
def test_arbitrary_json_is_parsed_or_cleanly_refused(value: object) -> None:
    payload = json.dumps({"v": 1, "device_id": "pi-1", "records": [value]})
    with contextlib.suppress(ProtocolError):  # anything else (KeyError, TypeError) fails
        parse(payload, Telemetry)

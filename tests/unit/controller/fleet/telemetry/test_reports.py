"""Reports on a small synthetic fleet (2 profiles × 2 models) checked by hand; series; plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.protocol import (
    MAX_TELEMETRY_RECORDS,
    BenchmarkReport,
    Environment,
    Event,
    Telemetry,
)
from controller.fleet.registry import Fleet
from controller.fleet.telemetry.plots import model_changes, plot_device, plot_profile
from controller.fleet.telemetry.reports import device_series, profile_series, report
from controller.fleet.telemetry.store import TelemetryStore
from tests.paths import TEST_DATA
from tests.telemetry_records import T0, record

DATA = TEST_DATA
UNKNOWN_SHA = "c" * 64


@pytest.fixture
def fleet_of_four(fleet: Fleet) -> Fleet:
    """rpi4: pi-1, pi-2; x86-64-gateway: x-1, x-2; model tiny:1 (fp32) and tiny:2 (int8)."""
    for device, profile in (
        ("pi-1", "rpi4"),
        ("pi-2", "rpi4"),
        ("x-1", "x86-64-gateway"),
        ("x-2", "x86-64-gateway"),
    ):
        fleet.register_device(device, profile)
    fleet.add_model(DATA / "tiny_fp32.tflite", name="tiny", version="1")
    fleet.add_model(DATA / "tiny_int8.tflite", name="tiny", version="2")
    return fleet


def shas(fleet: Fleet) -> tuple[str, str]:
    """sha256 of tiny:1 and tiny:2."""
    return (
        fleet.model("tiny:1")["artifacts"][0]["sha256"],
        fleet.model("tiny:2")["artifacts"][0]["sha256"],
    )


def ingest(fleet: Fleet, device: str, *records: object) -> None:
    """Ingest records of one device as one message."""
    TelemetryStore(fleet.db).ingest(Telemetry(device, tuple(records)), received=T0)  # type: ignore[arg-type]


def benchmark(fleet: Fleet, device: str, sha: str, p50: float, p95: float, n: int) -> None:
    """Store an on-device benchmark through the real event path."""
    fleet.record_event(
        Event(
            device_id=device,
            event_id=f"bench-{device}-{n}",
            kind="benchmark",
            message="benchmark done",
            model_sha256=sha,
            ts=T0,
            benchmark=BenchmarkReport(
                model_sha256=sha, runtime="litert", runtime_version="2.21", threads=4, runs=50,
                warmup=5, init_ms=1.0, first_inference_ms=p95, p50_ms=p50, p90_ms=p95,
                p95_ms=p95, p99_ms=p95, mean_ms=p50, std_ms=0.1, min_ms=p50, max_ms=p95,
                peak_rss_mb=60.0, rss_mb=55.0, power_w=2.0, energy_mj_per_inference=2 * p50,
                power_source="estimated", power_estimated=True,
                environment=Environment(governor="performance", cpu_freq_mhz=1500.0),
            ),
        )
    )  # fmt: skip


@pytest.fixture
def synthetic(fleet_of_four: Fleet) -> tuple[str, str]:
    """The telemetry and benchmarks the hand-computed numbers below come from."""
    v1, v2 = shas(fleet_of_four)
    # rpi4 × tiny:1 — pi-1 and pi-2, each 8 × 2.5 ms + 2 × 12 ms (mean 4.4 ms).
    lat = [2.5] * 8 + [12.0] * 2
    ingest(
        fleet_of_four,
        "pi-1",
        record(1, T0 + 10, lat, sha=v1, power_w=2.0, interval_s=10, rss_mb=50),
    )
    ingest(
        fleet_of_four,
        "pi-2",
        record(1, T0 + 10, lat, sha=v1, power_w=3.0, interval_s=30, rss_mb=80, estimated=False),
    )
    # rpi4 × tiny:2 — pi-1, 10 × 1.2 ms.
    ingest(
        fleet_of_four, "pi-1", record(2, T0 + 20, [1.2] * 10, sha=v2, power_w=1.0, interval_s=10)
    )
    # x86 × tiny:1 — x-1, 4 × 0.4 ms; x86 × tiny:2 — x-1 and x-2, 5 × 0.2 ms each.
    ingest(fleet_of_four, "x-1", record(1, T0 + 10, [0.4] * 4, sha=v1, power_w=None))
    ingest(fleet_of_four, "x-1", record(2, T0 + 20, [0.2] * 5, sha=v2, power_w=None))
    ingest(fleet_of_four, "x-2", record(1, T0 + 20, [0.2] * 5, sha=v2, power_w=None))
    # x-2 also ran a file the registry does not know, and idled with no model.
    ingest(
        fleet_of_four,
        "x-2",
        record(2, T0 + 30, [0.3], sha=UNKNOWN_SHA),
        record(3, T0 + 40, [], sha=None),
    )
    benchmark(fleet_of_four, "pi-1", v1, p50=3.0, p95=4.0, n=1)
    benchmark(fleet_of_four, "pi-2", v1, p50=5.0, p95=6.0, n=2)
    return v1, v2


def by_key(rows: list[dict[str, object]], group: str) -> dict[tuple[object, object], dict]:  # type: ignore[type-arg]
    """Report rows by (group, model)."""
    return {(r[group], r["model"]): r for r in rows}


def test_report_by_profile_matches_hand_computed_numbers(
    fleet_of_four: Fleet, synthetic: tuple[str, str]
) -> None:
    v1, _ = synthetic
    rows = by_key(report(fleet_of_four.db), "profile")
    assert set(rows) == {
        ("rpi4", "tiny:1"),
        ("rpi4", "tiny:2"),
        ("x86-64-gateway", "tiny:1"),
        ("x86-64-gateway", "tiny:2"),
        ("x86-64-gateway", UNKNOWN_SHA[:12]),
        ("x86-64-gateway", "-"),
    }
    pi1 = rows[("rpi4", "tiny:1")]
    assert (pi1["devices"], pi1["records"], pi1["inferences"]) == (2, 2, 20)
    assert pi1["model_sha256"] == [v1]
    # 16 in (2, 3] and 4 in (10, 15], max 12 caps the top bucket at 12:
    # p50: rank 10 of 16 in (2, 3] → 2 + 1 × 10/16; p95: rank 19 → 10 + 2 × 3/4; p99: 10 + 2 × 3.8/4
    assert pi1["p50_ms"] == pytest.approx(2.625)
    assert pi1["p95_ms"] == pytest.approx(11.5)
    assert pi1["p99_ms"] == pytest.approx(11.9)
    assert pi1["mean_ms"] == pytest.approx(4.4)
    assert pi1["max_ms"] == 12.0
    # Power and RSS weighted by interval (10 s at 2 W / 50 MB, 30 s at 3 W / 80 MB).
    assert pi1["mean_power_w"] == pytest.approx((2 * 10 + 3 * 30) / 40)
    assert pi1["mean_rss_mb"] == pytest.approx((50 * 10 + 80 * 30) / 40)
    assert pi1["peak_rss_mb"] == 85.0
    # Energy per inference weighted by inferences: (2 × 4.4 × 10 + 3 × 4.4 × 10) / 20.
    assert pi1["energy_mj_per_inference"] == pytest.approx(11.0)
    assert pi1["power_sources"] == ["estimated", "rapl"] and pi1["power_estimated"] is True
    # Benchmarks side by side: medians of 3 and 5 (p50), 4 and 6 (p95).
    assert (pi1["bench_reports"], pi1["bench_p50_ms"], pi1["bench_p95_ms"]) == (2, 4.0, 5.0)
    assert pi1["bench_environment"]["governor"] == "performance"

    pi2 = rows[("rpi4", "tiny:2")]
    assert (pi2["devices"], pi2["inferences"]) == (1, 10)
    assert pi2["p50_ms"] == pytest.approx(1.0 + 0.2 * 5 / 10)  # (1, 1.5] capped at max 1.2
    assert pi2["mean_ms"] == pytest.approx(1.2)
    assert pi2["bench_reports"] == 0 and pi2["bench_p50_ms"] is None

    x1 = rows[("x86-64-gateway", "tiny:1")]
    assert x1["p50_ms"] == pytest.approx(0.3 + 0.1 * 2 / 4)
    assert x1["mean_power_w"] is None and x1["energy_mj_per_inference"] is None
    x2 = rows[("x86-64-gateway", "tiny:2")]
    assert (x2["devices"], x2["inferences"]) == (2, 10)
    assert x2["p50_ms"] == pytest.approx(0.15 + 0.05 * 5 / 10)
    idle = rows[("x86-64-gateway", "-")]
    assert (idle["inferences"], idle["p50_ms"], idle["mean_ms"]) == (0, None, None)


def test_report_filters_by_model_device_since_and_profile(
    fleet_of_four: Fleet, synthetic: tuple[str, str]
) -> None:
    only_v2 = report(fleet_of_four.db, model="tiny:2")
    assert {(r["profile"], r["model"]) for r in only_v2} == {
        ("rpi4", "tiny:2"),
        ("x86-64-gateway", "tiny:2"),
    }
    assert {r["model"] for r in report(fleet_of_four.db, model="tiny")} == {"tiny:1", "tiny:2"}
    assert [r["model"] for r in report(fleet_of_four.db, model=UNKNOWN_SHA[:8])] == [
        UNKNOWN_SHA[:12]
    ]

    per_device = by_key(report(fleet_of_four.db, by="device", model="tiny:1"), "device")
    assert set(per_device) == {("pi-1", "tiny:1"), ("pi-2", "tiny:1"), ("x-1", "tiny:1")}
    pi2 = per_device[("pi-2", "tiny:1")]
    assert pi2["profile"] == "rpi4" and pi2["mean_power_w"] == pytest.approx(3.0)
    assert (pi2["bench_reports"], pi2["bench_p50_ms"]) == (1, 5.0)  # only its own benchmark

    late = report(fleet_of_four.db, since=T0 + 15)  # the seq-1 records at T0 + 10 drop out
    assert ("rpi4", "tiny:1") not in by_key(late, "profile")
    assert {r["profile"] for r in report(fleet_of_four.db, profile="rpi4")} == {"rpi4"}


def test_report_is_unchanged_by_compaction(
    fleet_of_four: Fleet, synthetic: tuple[str, str]
) -> None:
    before = report(fleet_of_four.db)
    assert TelemetryStore(fleet_of_four.db).compact(T0 + 30 * 86_400, raw_days=7) == 8
    after = report(fleet_of_four.db)
    assert len(after) == len(before)
    for a, b in zip(before, after, strict=True):
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-9), key
            else:
                assert b[key] == value, key


# ---------------------------------------------------------------------------- series and plots
@pytest.fixture
def rollout_history(fleet_of_four: Fleet) -> tuple[str, str]:
    """pi-1 and pi-2 over 40 minutes: tiny:1, then tiny:2 from minute 15, pi-1 back at 30."""
    v1, v2 = shas(fleet_of_four)
    for device, offset in (("pi-1", 0.0), ("pi-2", 0.3)):
        records = []
        for seq in range(1, 241):
            minute = seq / 6
            back = device == "pi-1" and minute >= 30
            sha = v1 if minute < 15 or back else v2
            base = 8.0 if sha == v1 else 3.0
            lat = [base * (1 + offset + 0.02 * (i % 10)) for i in range(20)]
            records.append(
                record(seq, T0 + 10 * seq, lat, sha=sha, power_w=2.5 if sha == v1 else 1.5)
            )
        for start in range(0, 240, MAX_TELEMETRY_RECORDS):
            ingest(fleet_of_four, device, *records[start : start + MAX_TELEMETRY_RECORDS])
    return v1, v2


def test_series_bin_by_minute_and_mark_model_changes(
    fleet_of_four: Fleet, rollout_history: tuple[str, str]
) -> None:
    points = device_series(fleet_of_four.db, "pi-1")
    assert {p["bin_s"] for p in points} == {60}
    assert sum(p["records"] for p in points) == 240
    assert [label for _, label in model_changes(points)] == ["tiny:1", "tiny:2", "tiny:1"]
    profile_points = profile_series(fleet_of_four.db, "rpi4", bin_s=300)
    assert sum(p["records"] for p in profile_points) == 480
    assert max(p["devices"] for p in profile_points) == 2
    # pi-2 stays on tiny:2 while pi-1 goes back: the profile shows tiny:1 starting again.
    changes = model_changes(profile_series(fleet_of_four.db, "rpi4"))
    assert [(ts - T0, label) for ts, label in changes] == [
        (0.0, "tiny:1"),
        (900.0, "tiny:2"),
        (1800.0, "tiny:1"),
    ]
    assert all(p["p50_ms"] <= p["p95_ms"] for p in profile_points)
    assert device_series(fleet_of_four.db, "pi-1", since=T0 + 2000)[0]["ts"] >= T0 + 1980


def _png_shape(path: Path) -> tuple[int, ...]:
    """(height, width, channels) of a PNG, read back with matplotlib."""
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert float(image.std()) > 0.05  # not a blank canvas
    return tuple(image.shape)


def test_plots_are_written_and_readable(
    fleet_of_four: Fleet, rollout_history: tuple[str, str], tmp_path: Path
) -> None:
    device_png = plot_device(fleet_of_four.db, "pi-1", tmp_path / "plots" / "pi-1.png")
    profile_png = plot_profile(fleet_of_four.db, "rpi4", tmp_path / "rpi4.png")
    for png in (device_png, profile_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 20_000
        assert _png_shape(png)[:2] == (650, 1100)


def test_plot_without_telemetry_is_a_clear_error(fleet_of_four: Fleet, tmp_path: Path) -> None:
    from controller.errors import FleetError

    with pytest.raises(FleetError, match="no telemetry to plot for device pi-1"):
        plot_device(fleet_of_four.db, "pi-1", tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()

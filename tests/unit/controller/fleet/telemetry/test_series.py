"""Fleet series for the dashboard's charts: buckets from the range, groups per profile and/or
model, numbers equal to the report's, bounded size; on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol import Telemetry
from controller.errors import FleetError
from controller.fleet.registry import Fleet
from controller.fleet.telemetry import series as series_module
from controller.fleet.telemetry.queries import fleet_series_query
from controller.fleet.telemetry.reports import report
from controller.fleet.telemetry.series import buckets_touched, choose_bucket, fleet_series
from tests.paths import TEST_DATA
from tests.unit.controller.fleet.telemetry.test_store import T0, record

DEVICES = {"pi-1": "rpi4", "pi-2": "rpi4", "x-1": "x86-64-gateway"}
# 30 minutes of records every 10 s per device.
RECORDS = 180
UNTIL = T0 + 10.0 * (RECORDS + 1)


@pytest.fixture
def fleet(tmp_path: Path, db_target: str) -> Iterator[Fleet]:  # on both backends, unlike conftest's
    """rpi4 pi-1, pi-2 run tiny:1; x-1 runs tiny:2; 30 minutes of telemetry each."""
    f = Fleet(tmp_path / "home", db=db_target)
    for device, profile in DEVICES.items():
        f.register_device(device, profile)
    f.add_model(TEST_DATA / "tiny_fp32.tflite", name="tiny", version="1")
    f.add_model(TEST_DATA / "tiny_int8.tflite", name="tiny", version="2")
    sha1 = f.model("tiny:1")["artifacts"][0]["sha256"]
    sha2 = f.model("tiny:2")["artifacts"][0]["sha256"]
    for device in DEVICES:
        sha, slow = (sha2, 3.0) if device == "x-1" else (sha1, 1.0)
        records = [
            record(seq, latencies=(slow * (1 + seq % 5), 2.0 * slow), sha=sha)
            for seq in range(1, RECORDS + 1)
        ]
        half = RECORDS // 2  # two messages: one holds at most MAX_TELEMETRY_RECORDS
        f.telemetry.ingest_many(
            [Telemetry(device, tuple(records[:half])), Telemetry(device, tuple(records[half:]))],
            UNTIL,
        )
    yield f
    f.close()


@pytest.mark.parametrize(
    ("span_s", "points", "width"),
    [(3600, 120, 60), (86_400, 120, 900), (7 * 86_400, 120, 7200), (30 * 86_400, 10, 7 * 86_400)],
)
def test_the_bucket_grows_with_the_range_and_never_exceeds_points(
    span_s: float, points: int, width: int
) -> None:
    since = T0 + 17.0  # not aligned: the first bucket starts before it
    assert choose_bucket(since, since + span_s, points) == width
    assert buckets_touched(since, since + span_s, width) <= points
    wide = choose_bucket(T0, T0 + 400 * 86_400, 10)
    assert wide % 86_400 == 0 and buckets_touched(T0, T0 + 400 * 86_400, wide) <= 10


def test_series_per_profile_and_model_match_the_report(fleet: Fleet) -> None:
    got = fleet_series(fleet.db, since=T0, until=UNTIL, points=10)
    assert got["bucket_s"] == 300 and got["omitted"] == 0
    assert [s["key"] for s in got["series"]] == ["rpi4 tiny:1", "x86-64-gateway tiny:2"]
    rows = {(r["profile"], r["model"]): r for r in report(fleet.db)}
    for s in got["series"]:
        assert 1 < len(s["points"]) <= 10
        assert all(p["ts"] % 300 == 0 for p in s["points"])
        row = rows[(s["profile"], s["model"])]
        assert s["served"] == sum(p["served"] for p in s["points"]) == row["inferences"]
        assert {p["devices"] for p in s["points"]} == {row["devices"]}
        assert all(p["p50_ms"] <= p["p95_ms"] for p in s["points"])
        assert all(p["power_w"] == pytest.approx(2.0) for p in s["points"])
        assert all(p["energy_mj_per_inference"] > 0 for p in s["points"])
    slow, fast = got["series"][1]["points"][2], got["series"][0]["points"][2]
    assert slow["p95_ms"] > fast["p95_ms"]  # x-1 is 3x slower


def test_one_bucket_over_everything_has_the_reports_percentiles(fleet: Fleet) -> None:
    # One bucket over every row: its percentiles are the report's (the same histograms).
    one = fleet_series(fleet.db, since=T0, until=UNTIL, points=1)
    everything = {(r["profile"], r["model"]): r for r in report(fleet.db)}
    for s in one["series"]:
        (point,) = s["points"]
        row = everything[(s["profile"], s["model"])]
        assert (point["p50_ms"], point["p95_ms"]) == (row["p50_ms"], row["p95_ms"])


def test_lines_per_profile_or_per_model_and_filters(fleet: Fleet) -> None:
    per_profile = fleet_series(fleet.db, since=T0, until=UNTIL, by="profile", points=10)
    assert [(s["key"], s["profile"], s["model"]) for s in per_profile["series"]] == [
        ("rpi4", "rpi4", None),
        ("x86-64-gateway", "x86-64-gateway", None),
    ]
    per_model = fleet_series(fleet.db, since=T0, until=UNTIL, by="model", points=10)
    assert [s["key"] for s in per_model["series"]] == ["tiny:1", "tiny:2"]
    only = fleet_series(fleet.db, since=T0, until=UNTIL, profile="rpi4", points=10)
    assert [s["key"] for s in only["series"]] == ["rpi4 tiny:1"]
    named = fleet_series(fleet.db, since=T0, until=UNTIL, model="tiny:2", points=10)
    assert [s["key"] for s in named["series"]] == ["x86-64-gateway tiny:2"]


def test_compacted_minutes_give_the_same_series(fleet: Fleet) -> None:
    before = fleet_series(fleet.db, since=T0, until=UNTIL, points=10)
    while fleet.telemetry.compact(now=UNTIL + 8 * 86_400):
        pass
    assert fleet.db.query_one("SELECT COUNT(*) AS n FROM telemetry")["n"] == 0  # type: ignore[index]
    after = fleet_series(fleet.db, since=T0, until=UNTIL, points=10)
    assert [s["key"] for s in after["series"]] == [s["key"] for s in before["series"]]
    for a, b in zip(after["series"], before["series"], strict=True):
        assert [(p["ts"], p["served"], p["p95_ms"]) for p in a["points"]] == [
            (p["ts"], p["served"], p["p95_ms"]) for p in b["points"]
        ]


def test_the_answer_is_bounded_by_series_and_points(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(series_module, "MAX_SERIES", 1)
    got = fleet_series(fleet.db, since=T0, until=UNTIL, points=10)
    # The most served series is kept (two rpi4 devices served twice x-1's inferences).
    assert [s["key"] for s in got["series"]] == ["rpi4 tiny:1"] and got["omitted"] == 1
    everything = fleet_series(fleet.db, since=None, until=UNTIL, points=12)
    assert everything["since"] <= T0 and len(everything["series"][0]["points"]) <= 12


def test_bad_arguments_are_one_line_errors(fleet: Fleet) -> None:
    with pytest.raises(FleetError, match="by must be one of profile, model, profile_model"):
        fleet_series_query(fleet, by="device")
    with pytest.raises(FleetError, match=r"points must be 10\.\.1000, got 5"):
        fleet_series_query(fleet, points=5)
    with pytest.raises(FleetError, match="unknown model"):
        fleet_series_query(fleet, model="nope:1")
    with pytest.raises(FleetError, match="since must be in the past"):
        fleet_series_query(fleet, since=UNTIL + 10, now=UNTIL)


def test_the_bucket_follows_the_data_in_a_wide_window(fleet: Fleet) -> None:
    # Thirty minutes of data in a 7-day window: drawn in 5-minute buckets, not in daily ones.
    got = fleet_series(fleet.db, since=T0 - 7 * 86_400, until=UNTIL, points=10)
    assert got["bucket_s"] == 300 and got["since"] >= T0 - 300

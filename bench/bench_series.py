"""Fleet series (GET /report/series) and the per-profile report, each read from the fleet
rollup and from every stored record (the path before the rollup), on the same database in one
run, at several fleet sizes: the rollup's time should not grow with the number of devices.
Then a 30-day series from rollup minutes only (before the hourly level) and from folded hours
plus edge minutes, rows read and time, on one database (rollup rows written directly: 30 days
of records would take hours to ingest; the rollup's size depends on profiles × models only).

    .venv/bin/python -m bench.bench_series [--devices 100,1000,10000] [--minutes 60] [--repeats 3]
        [--days 30]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy

from agent.protocol import MAX_TELEMETRY_RECORDS, Telemetry
from controller.fleet.registry import Fleet
from controller.fleet.telemetry.reports import report
from controller.fleet.telemetry.rollup import record_sums
from controller.fleet.telemetry.series import fleet_series
from controller.fleet.telemetry.store import TelemetryStore
from controller.storage.queries import fleet as fleet_queries
from controller.storage.tables import telemetry_fleet_hour, telemetry_fleet_minute
from tests.paths import TEST_DATA
from tests.unit.controller.fleet.telemetry.test_store import record

PROFILES = ("rpi4", "x86-64-gateway", "jetson-orin-nano-cpu")
# Seconds between two telemetry records of a device (the agent's default is 10 s).
INTERVAL_S = 10.0


def build(devices: int, minutes: int) -> tuple[Fleet, float, int]:
    """A fleet of `devices` over PROFILES running one of two models, `minutes` of telemetry."""
    home = Path(tempfile.mkdtemp(prefix="bench-series-")) / "home"
    fleet = Fleet(home)
    fleet.add_model(TEST_DATA / "tiny_fp32.tflite", name="tiny", version="1")
    fleet.add_model(TEST_DATA / "tiny_int8.tflite", name="tiny", version="2")
    shas = [fleet.model(f"tiny:{v}")["artifacts"][0]["sha256"] for v in (1, 2)]
    now = time.time()
    start = now - minutes * 60
    count = int(minutes * 60 / INTERVAL_S)
    rows = 0
    for i in range(devices):
        device = f"dev-{i:05d}"
        fleet.register_device(device, PROFILES[i % len(PROFILES)])
        records = [
            record(seq, ts=start + INTERVAL_S * seq, sha=shas[i % 2], interval_s=INTERVAL_S)
            for seq in range(1, count + 1)
        ]
        messages = [
            Telemetry(device, tuple(records[k : k + MAX_TELEMETRY_RECORDS]))
            for k in range(0, len(records), MAX_TELEMETRY_RECORDS)
        ]
        fleet.telemetry.ingest_many(messages, now)
        rows += len(records)
    return fleet, now, rows


def timed(call: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    """Build each size, time series and report from both sources, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="100,1000", help="fleet sizes, comma-separated")
    parser.add_argument("--minutes", type=int, default=60, help="telemetry per device")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--days", type=int, default=30, help="the long window (0: skip)")
    args = parser.parse_args()
    print(f"{'devices':>8} {'rows':>9} {'rollup rows':>11} {'series old s':>12} "
          f"{'series new s':>12} {'old/new':>8} {'report old s':>12} {'report new s':>12} "
          f"{'old/new':>8} {'points':>7}")  # fmt: skip
    for devices in (int(n) for n in args.devices.split(",")):
        measure(devices, args.minutes, args.repeats)
    if args.days:
        measure_long(args.days, args.repeats)


def measure(devices: int, minutes: int, repeats: int) -> None:
    """One fleet size: build it, time both sources over a 24 h window, check they agree."""
    fleet, now, rows = build(devices, minutes)
    try:
        since = now - 86_400
        # The rollup counts whole minutes (until's too): compared at a whole minute.
        whole = math.ceil(now / 60) * 60
        new = fleet_series(fleet.db, since=since, until=whole)
        old = fleet_series(fleet.db, since=since, until=whole, source="records")
        # Same buckets and served counts (tests/unit/.../test_fleet_rollup.py checks all).
        assert [(s["key"], [(p["ts"], p["served"]) for p in s["points"]]) for s in new["series"]] \
            == [(s["key"], [(p["ts"], p["served"]) for p in s["points"]]) for s in old["series"]]
        rollup_rows = fleet.db.conn.sa.execute(
            sqlalchemy.select(sqlalchemy.func.count()).select_from(telemetry_fleet_minute)
        ).scalar()
        s_old = timed(lambda: fleet_series(fleet.db, since=since, until=now, source="records"),
                      repeats)  # fmt: skip
        s_new = timed(lambda: fleet_series(fleet.db, since=since, until=now), repeats)
        r_old = timed(lambda: report(fleet.db, since=since, source="records"), repeats)
        r_new = timed(lambda: report(fleet.db, since=since), repeats)
        points = sum(len(s["points"]) for s in new["series"])
        print(f"{devices:>8} {rows:>9} {rollup_rows:>11} {s_old:>12.4f} {s_new:>12.4f} "
              f"{s_old / s_new:>8.1f} {r_old:>12.4f} {r_new:>12.4f} {r_old / r_new:>8.1f} "
              f"{points:>7}", flush=True)  # fmt: skip
    finally:
        fleet.close()


def rows_in(fleet: Fleet, table: sqlalchemy.Table, column: str, lo: float, hi: float) -> int:
    """Rows of a rollup table with `column` in [lo, hi)."""
    c = table.c[column]
    query = sqlalchemy.select(sqlalchemy.func.count()).where(c >= lo, c < hi)
    return int(fleet.db.conn.sa.execute(query).scalar() or 0)


def measure_long(days: int, repeats: int) -> None:
    """`days` of rollup minutes for 3 profiles × 2 models, folded into hours; a series over all
    of them from minutes only (old) and from hours plus edge minutes (new), checked equal."""
    home = Path(tempfile.mkdtemp(prefix="bench-series-long-")) / "home"
    fleet = Fleet(home)
    try:
        shas = ["a" * 64, "b" * 64]
        now = time.time()
        first = int((now - days * 86_400) // 60) * 60
        sums = record_sums(record(1, ts=first, interval_s=60.0))
        minutes = range(first, int(now // 60) * 60 + 60, 60)
        keys = [(p, s) for p in PROFILES for s in shas]
        for k in range(0, len(minutes), 1440):
            with fleet.db.transaction() as tx:
                fleet_queries.add_fleet_minutes(
                    tx, [(m, p, s, 100, *sums) for m in minutes[k : k + 1440] for p, s in keys]
                )
        started = time.perf_counter()
        TelemetryStore(fleet.db).fold_fleet_hours(now)
        fold_s = time.perf_counter() - started
        since, until = now - days * 86_400, math.ceil(now / 60) * 60
        new = fleet_series(fleet.db, since=since, until=until)
        old = fleet_series(fleet.db, since=since, until=until, source="minutes")
        assert new == old or _close(new, old), "hours and minutes disagree"
        start = new["since"]
        mark = fleet_queries.fold_mark(fleet.db.conn) or start
        edge = max(start, min(mark, until - until % 3600))  # as fleet_queries.fleet_series
        edge = start if new["bucket_s"] % 3600 else edge  # hours only in buckets of hours
        read_old = rows_in(fleet, telemetry_fleet_minute, "minute", start, until)
        read_new = rows_in(fleet, telemetry_fleet_hour, "hour", start, edge) + rows_in(
            fleet, telemetry_fleet_minute, "minute", edge, until
        )
        t_old = timed(lambda: fleet_series(fleet.db, since=since, until=until,
                                           source="minutes"), repeats)  # fmt: skip
        t_new = timed(lambda: fleet_series(fleet.db, since=since, until=until), repeats)
        print(f"\n{days}-day series, {len(keys)} series, bucket {new['bucket_s']} s "
              f"(fold of {len(minutes)} minutes into hours: {fold_s:.2f} s):")
        print(f"{'rows old':>9} {'rows new':>9} {'series old s':>12} {'series new s':>12} "
              f"{'old/new':>8}")  # fmt: skip
        print(f"{read_old:>9} {read_new:>9} {t_old:>12.4f} {t_new:>12.4f} "
              f"{t_old / t_new:>8.1f}", flush=True)  # fmt: skip
    finally:
        fleet.close()


def _close(a: object, b: object) -> bool:
    """Equal structures, floats to 1e-9 relative (sums added in another order)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


if __name__ == "__main__":
    main()

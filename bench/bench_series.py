"""Fleet series (GET /report/series) and the per-profile report, each read from the fleet
rollup and from every stored record (the path before the rollup), on the same database in one
run, at several fleet sizes: the rollup's time should not grow with the number of devices.

    .venv/bin/python -m bench.bench_series [--devices 100,1000,10000] [--minutes 60] [--repeats 3]
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
from controller.fleet.telemetry.series import fleet_series
from controller.storage.tables import telemetry_fleet_minute
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
    args = parser.parse_args()
    print(f"{'devices':>8} {'rows':>9} {'rollup rows':>11} {'series old s':>12} "
          f"{'series new s':>12} {'old/new':>8} {'report old s':>12} {'report new s':>12} "
          f"{'old/new':>8} {'points':>7}")  # fmt: skip
    for devices in (int(n) for n in args.devices.split(",")):
        measure(devices, args.minutes, args.repeats)


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


if __name__ == "__main__":
    main()

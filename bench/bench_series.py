"""Fleet series (GET /report/series) against the report over the same rows, at two fleet sizes
in one run: the answer's size stays bounded, the query's time grows with the rows it reads.

    .venv/bin/python -m bench.bench_series [--devices 100,1000] [--minutes 60] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.protocol import MAX_TELEMETRY_RECORDS, Telemetry
from controller.fleet.registry import Fleet
from controller.fleet.telemetry.reports import report
from controller.fleet.telemetry.series import fleet_series
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
    """Build each size, time series and report over the window, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="100,1000", help="fleet sizes, comma-separated")
    parser.add_argument("--minutes", type=int, default=60, help="telemetry per device")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'devices':>8} {'rows':>9} {'series s':>9} {'report s':>9} {'series/report':>14} "
          f"{'answer bytes':>13} {'points':>7}")  # fmt: skip
    for devices in (int(n) for n in args.devices.split(",")):
        measure(devices, args.minutes, args.repeats)


def measure(devices: int, minutes: int, repeats: int) -> None:
    """One fleet size: build it, time series and report over a 24 h window, print a row."""
    fleet, now, rows = build(devices, minutes)
    try:
        since = now - 86_400
        answer = fleet_series(fleet.db, since=since, until=now)
        series_s = timed(lambda: fleet_series(fleet.db, since=since, until=now), repeats)
        report_s = timed(lambda: report(fleet.db, since=since), repeats)
        points = sum(len(s["points"]) for s in answer["series"])
        size = len(json.dumps(answer))
        print(f"{devices:>8} {rows:>9} {series_s:>9.3f} {report_s:>9.3f} "
              f"{series_s / report_s:>14.2f} {size:>13} {points:>7}")  # fmt: skip
    finally:
        fleet.close()

if __name__ == "__main__":
    main()

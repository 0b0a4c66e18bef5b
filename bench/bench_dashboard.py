"""The dashboard's overview at fleet size: page load in headless Chromium and the devices API,
with 1,000 and 10,000 devices in the same run (server-side paging should make them equal).

    .venv/bin/python -m bench.bench_dashboard [--loads 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from controller.fleet.registry import Fleet
from controller.http.auth import ensure_local_token
from controller.http.server import HttpServer
from tests.e2e.browser import chromium
from tests.fleet_rows import insert_devices

# Fleet sizes compared in one run: the 10,000 and a tenth of it.
SIZES = (1_000, 10_000)
# API calls timed per size (the median is reported; the first warms the thread's connection).
API_CALLS = 20


def measure(size: int, loads: int) -> dict[str, float]:
    """Median first-row time of `loads` full page loads (after one cold one), cold load, API."""
    home = Path(tempfile.mkdtemp(prefix="bench-dash-")) / "home"
    fleet = Fleet(home)
    ids = insert_devices(fleet, size)
    fleet.close()
    token = ensure_local_token(home)
    server = HttpServer(home).start()
    try:
        headers = {"Authorization": f"Bearer {token}"}
        api = []
        with httpx.Client(base_url=server.url, headers=headers) as client:  # keep-alive
            for _ in range(API_CALLS):
                started = time.perf_counter()
                client.get("/api/v1/devices?limit=50&q=sim-0").raise_for_status()
                api.append(time.perf_counter() - started)
        with chromium() as context:
            page = context.new_page()
            times = []
            for i in range(loads + 1):
                page.goto("about:blank")
                started = time.perf_counter()
                page.goto(f"{server.url}/#token={token}" if i == 0 else f"{server.url}/#/")
                page.get_by_test_id(f"device-row-{ids[0]}").wait_for(state="visible")
                times.append(time.perf_counter() - started)
        return {
            "cold_s": times[0],
            "load_s": statistics.median(times[1:]),
            "api_ms": statistics.median(api[1:]) * 1000,
        }
    finally:
        server.stop()


def main() -> None:
    """Measure both sizes and print the figures and the 10k/1k ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loads", type=int, default=5, help="measured page loads per size")
    args = parser.parse_args()
    results = {size: measure(size, args.loads) for size in SIZES}
    for size, r in results.items():
        print(
            f"{size:>6} devices: first load {r['cold_s']:.3f} s, page load median "
            f"{r['load_s']:.3f} s, GET /devices?limit=50&q= median {r['api_ms']:.1f} ms"
        )
    small, large = results[SIZES[0]], results[SIZES[1]]
    print(
        f"ratio 10k/1k: page load {large['load_s'] / small['load_s']:.2f}, "
        f"API {large['api_ms'] / small['api_ms']:.2f}"
    )


if __name__ == "__main__":
    main()

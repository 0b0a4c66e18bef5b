"""`edgefleet demo` as a user runs it: real broker, controller, agent processes and CNN."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
# What TensorFlow prints on its own: absl's pre-init warning, oneDNN, MLIR's quantizer, XNNPACK,
# Python warnings from inside TF.
TF_NOISE = re.compile(
    r"absl::InitializeLog|oneDNN|fully_quantize|XNNPACK|^[IW]\d{4} |Warning: |warnings\.warn"
)


def _demo_processes() -> list[psutil.Process]:
    """Agent processes started by a demo (their configs live in an edgefleet-demo-* dir)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "agent.cli" in cmdline and "edgefleet-demo-" in cmdline:
            found.append(proc)
    return found


def test_demo_json_reports_every_device_and_cleans_up() -> None:
    before = {p.pid for p in _demo_processes()}
    out = subprocess.run(
        [EDGEFLEET, "demo", "--devices", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    data = json.loads(out.stdout)
    rows = data["devices"]
    assert data["state"] == "completed"
    assert [r["device"] for r in rows] == ["demo-1", "demo-2", "demo-3"]
    assert len({r["profile"] for r in rows}) == 3, "each agent declares its own profile"
    shas = {r["model_sha256"] for r in rows}
    assert len(shas) == 1 and None not in shas
    for row in rows:
        bench = row["benchmark"]
        assert row["deployment_state"] == "succeeded"
        assert bench["runs"] == 100, "the demo's rollout policy sets the benchmark runs"
        assert 0 < bench["p50_ms"] <= bench["p99_ms"]
        assert 0 < bench["peak_rss_mb"] < 400, "peak RSS is the agent's own, not its parent's"
        assert bench["power_source"] == "estimated" and bench["energy_mj_per_inference"] > 0
    assert "registered" in out.stderr and "egress" in out.stderr, "progress is shown"
    tf_noise = [line for line in out.stderr.splitlines() if TF_NOISE.search(line)]
    assert tf_noise == [], "TensorFlow's logging is silenced in the demo"
    # The application's requests, counted by the controller from each device's telemetry.
    telemetry = {r["device"]: r for r in data["telemetry"]}
    assert sorted(telemetry) == ["demo-1", "demo-2", "demo-3"]
    for device, row in telemetry.items():
        assert row["inferences"] == 300, device
        assert row["model"] == "digits-cnn:1"
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["energy_mj_per_inference"] > 0 and row["power_estimated"]
    assert "accuracy demo-1" in out.stderr
    leftovers = [p for p in _demo_processes() if p.pid not in before]
    assert leftovers == [], f"demo left processes running: {leftovers}"


def test_demo_table_output() -> None:
    out = subprocess.run(
        [EDGEFLEET, "demo", "--devices", "1"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-4000:]
    header = out.stdout.splitlines()[0]
    for column in (
        "DEVICE",
        "PROFILE",
        "RUNTIME",
        "MODEL",
        "P50 MS",
        "P99 MS",
        "PEAK RSS MB",
        "POWER SOURCE",
    ):
        assert column in header
    assert "demo-1" in out.stdout


def test_demo_rejects_a_bad_device_count() -> None:
    out = subprocess.run(
        [EDGEFLEET, "demo", "--devices", "0"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2


def test_demo_serve_keeps_the_fleet_with_its_dashboard_until_interrupted() -> None:
    """`demo --serve`: prints the dashboard address, serves the API over the live fleet, and
    stops everything on SIGINT."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [EDGEFLEET, "demo", "--devices", "1", "--serve", "--http", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 600
        dashboard = ""
        while time.monotonic() < deadline and not dashboard:
            line = proc.stderr.readline()
            assert line, "demo ended before serving"
            if "dashboard: " in line:
                dashboard = line.split("dashboard: ", 1)[1].strip()
        assert dashboard.startswith(f"http://127.0.0.1:{port}/#token="), dashboard
        token = dashboard.split("#token=", 1)[1]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/devices", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            devices = json.loads(response.read())["items"]
        assert [(d["id"], d["online"]) for d in devices] == [("demo-1", True)]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert b"<html" in response.read().lower()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

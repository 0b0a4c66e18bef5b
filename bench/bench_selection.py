"""Closed loop on this machine: real agents measure the digits CNN candidates; host pick vs winner.

One run: the trained digits CNN → `optimize --candidates K` for rpi4 (int8, fp32, dynamic), so the
host ranks (variant × threads) pairs; mosquitto on a free loopback port; the controller service;
N real agent processes (`edgefleet-agent run`, ai-edge-litert here); then a rollout with
`--candidates K --canaries N`. Prints each candidate's host latency and its on-device p50/p95,
the ratio host pick p95 / winner p95 (how much the on-device selection gained over the host's
choice, measured in this run), and how long the selection phase took per trial.

Run: .venv/bin/python bench/bench_selection.py [--candidates 4] [--canaries 2] [--runs 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import firmware_profiles  # noqa: E402
from agent.protocol.config import AgentConfig, dump_config  # noqa: E402
from bench.bench_rollout import wait  # noqa: E402
from controller.brokers.mosquitto import start_mosquitto  # noqa: E402
from controller.fleet.registry import Fleet  # noqa: E402
from controller.fleet.rollout.policy import Policy, Threshold, parse_waves  # noqa: E402
from controller.runtime.service import ControllerService  # noqa: E402
from converters.datasets import Samples  # noqa: E402
from converters.digits import digits_keras, load_digits_dataset  # noqa: E402
from converters.pipeline import optimize  # noqa: E402


def main() -> int:
    """Run the benchmark and print a table and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--canaries", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200, help="timed runs per benchmark")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-selection-"))
    data = load_digits_dataset()
    rpi4 = firmware_profiles.load("rpi4")
    profile = dataclasses.replace(
        rpi4, quantization=firmware_profiles.Quantization("int8", ("int8", "fp32", "dynamic"))
    )
    cache = Path(tempfile.gettempdir()) / "edgefleet-test-cache"
    report = optimize(
        digits_keras(cache), [profile], calib=data.x_train,
        val=Samples(data.x_val, data.y_val), out_dir=work / "opt", candidates=args.candidates,
    )  # fmt: skip
    assert report.ok, report.to_dict()
    broker = start_mosquitto(work / "mosquitto")
    root = "bench/edgefleet/v1"
    home = work / "ctl"
    service = ControllerService(home, broker.url, topic_root=root, client_id="bench-ctl")
    service.start()
    agents: list[subprocess.Popen[bytes]] = []
    ids = [f"canary-{i}" for i in range(args.canaries)]
    assert service.ready.wait(15), "controller did not connect"
    fleet = Fleet(home)
    try:
        for device in ids:
            config = AgentConfig(
                device_id=device, data_dir=work / "agents" / device, broker=broker.url,
                topic_root=root, profile="rpi4", threads=1,
            )  # fmt: skip
            config.data_dir.mkdir(parents=True)
            path = work / "agents" / f"{device}.toml"
            path.write_text(dump_config(config))
            log = (work / "agents" / f"{device}.log").open("ab")
            agents.append(
                subprocess.Popen(
                    [sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        wait(lambda: sum(d["online"] for d in fleet.devices()) == len(ids), 60, "agents online")
        fleet.add_model(work / "opt", name="digits", version="1")
        policy = Policy(
            waves=parse_waves("100"), max_failures=Threshold(count=0), device_timeout_s=300,
            candidates=args.candidates, canaries=args.canaries, benchmark_runs=args.runs,
        )  # fmt: skip
        started = time.monotonic()
        rollout = fleet.start_rollout("digits:1", "all", policy)
        wait(lambda: fleet.deployment(rollout["id"])["phase"] == "waves", args.timeout, "selection")
        selection_s = time.monotonic() - started
        final = wait(
            lambda: (r := fleet.deployment(rollout["id"]))["state"] != "running" and r,
            args.timeout,
            "rollout end",
        )
    finally:
        fleet.close()
        for proc in agents:
            proc.terminate()
            proc.wait(10)
        service.stop()
        broker.stop()
    (decision,) = final["decisions"]
    entries = decision["explanation"]["candidates"]
    host_pick = next(c for c in entries if c["rank"] == 1)
    winner = next(c for c in entries if c["rank"] == decision["winner_rank"])
    print(f"{'cand':<16}{'host ms':>9}{'p50 ms':>9}{'p95 ms':>9}{'MB':>7}{'mJ':>8}  verdict")
    for c in entries:
        m = c["metrics"] or {}
        print(
            f"{c['label']:<16}{c['host'].get('latency_ms') or 0:>9.4f}{m.get('p50_ms', 0):>9.4f}"
            f"{m.get('p95_ms', 0):>9.4f}{m.get('peak_rss_mb', 0):>7.1f}"
            f"{m.get('energy_mj', 0):>8.3f}  {c['verdict']}"
        )
    trials = len(final["trials"])
    gain = host_pick["metrics"]["p95_ms"] / winner["metrics"]["p95_ms"]
    print(f"host pick {host_pick['label']} p95 / winner {winner['label']} p95: {gain:.2f}")
    print(
        f"selection phase {selection_s:.1f} s for {trials} trials on {args.canaries} canaries "
        f"({selection_s / (trials / args.canaries):.1f} s per candidate per canary); "
        f"rollout {final['state']}"
    )
    print(
        json.dumps(
            {
                "candidates": [
                    {"label": c["label"], "verdict": c["verdict"], "metrics": c["metrics"]}
                    for c in entries
                ],
                "host_pick_over_winner_p95": round(gain, 3),
                "selection_s": round(selection_s, 2),
                "trials": trials,
                "state": final["state"],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

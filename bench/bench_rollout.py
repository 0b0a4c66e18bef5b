"""A staged rollout to many simulated agents: total time and the controller's footprint.

One run: mosquitto on a free loopback port, `edgefleet up` as its own process, N simulated
agents (controller/simulate/: one MQTT connection each, real protocol, real chunk hashing)
in this process, then `rollout start` of a real .tflite padded to --artifact-mib with three
waves and gates. Prints wall time per wave and in total, the controller process's peak RSS
(VmHWM), the controller's egress (chunk bytes it published) over the artifact size, and the
simulator's RSS per agent.

Run: .venv/bin/python bench/bench_rollout.py [--devices 1000] [--waves 10,50,100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controller.brokers.mosquitto import start_mosquitto  # noqa: E402
from controller.fleet.registry import Fleet  # noqa: E402
from controller.fleet.rollout.policy import Gate, Policy, Threshold, parse_waves  # noqa: E402
from controller.simulate import Simulation  # noqa: E402

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
MODEL = ROOT / "tests" / "data" / "tiny_int8.tflite"


def padded_model(directory: Path, mib: float) -> Path:
    """A real .tflite padded with trailing bytes to `mib` MiB: it still loads, and it chunks."""
    out = directory / f"model-{mib:g}mib.tflite"
    shutil.copyfile(MODEL, out)
    with out.open("ab") as fh:
        fh.write(os.urandom(max(0, int(mib * 1024 * 1024) - MODEL.stat().st_size)))
    return out


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process in MiB (its peak resident set)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def egress_bytes(log: Path) -> int:
    """Chunk bytes the controller says it published (its periodic stats line)."""
    total = 0
    for line in log.read_text(errors="replace").splitlines():
        if "chunk bytes published" in line:
            total = int(line.split("chunk bytes published", 1)[0].split()[-1])
    return total


def wait(predicate: Any, timeout: float, what: str) -> Any:
    """Poll until truthy or raise naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def main() -> int:
    """Run the benchmark and print a table and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--waves", default="10,50,100")
    parser.add_argument("--artifact-mib", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-rollout-"))
    broker = start_mosquitto(work / "mosquitto")
    home = work / "ctl"
    log = work / "ctl.log"
    root = "bench/edgefleet/v1"
    ctl = subprocess.Popen(
        [EDGEFLEET, "up", "--broker", broker.url, "--topic-root", root, "--home", str(home),
         "--stats-interval", "1"],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    sim = Simulation(broker.url, args.devices, topic_root=root, prefix="bench")
    fleet = Fleet(home)
    try:
        t0 = time.monotonic()
        sim.start()
        wait(lambda: sim.wait_connected(1.0), args.timeout, "simulated agents to connect")
        wait(
            lambda: sum(d["online"] for d in fleet.devices()) >= args.devices,
            args.timeout,
            "every simulated agent to be registered",
        )
        t_registered = time.monotonic() - t0
        artifact = padded_model(work, args.artifact_mib)
        fleet.add_model(artifact, name="bench", version="1")
        policy = Policy(
            waves=parse_waves(args.waves),
            max_failures=Threshold(percent=5.0),
            min_executed=10,
            gates=(Gate("p95_ms", 10_000.0),),
            device_timeout_s=600.0,
        )
        t1 = time.monotonic()
        rollout = fleet.start_rollout("bench:1", "all", policy)
        wave_done: dict[int, float] = {}
        while True:
            status = fleet.deployment(rollout["id"])
            for w in status["waves"]:
                if w["done"] == w["devices"] and w["wave"] not in wave_done:
                    wave_done[w["wave"]] = time.monotonic() - t1
            if status["state"] not in ("running", "paused"):
                break
            if time.monotonic() - t1 > args.timeout:
                raise TimeoutError(f"rollout still {status['state']}: {status['counts']}")
            time.sleep(0.2)
        total = time.monotonic() - t1
        ctl_peak = peak_rss_mb(ctl.pid)
        ctl_rss = psutil.Process(ctl.pid).memory_info().rss / 2**20
        time.sleep(1.5)  # one more stats line
        egress = egress_bytes(log)
        snap = sim.snapshot()
        size = artifact.stat().st_size
        result = {
            "devices": args.devices,
            "waves": [w.label() for w in policy.waves],
            "artifact_bytes": size,
            "state": status["state"],
            "counts": status["counts"],
            "register_s": round(t_registered, 2),
            "rollout_total_s": round(total, 2),
            "wave_done_s": {str(k): round(v, 2) for k, v in sorted(wave_done.items())},
            "controller_peak_rss_mb": round(ctl_peak, 1),
            "controller_rss_mb": round(ctl_rss, 1),
            "controller_egress_over_artifact": round(egress / size, 3) if egress else None,
            "simulator": {k: snap[k] for k in snap if k in ("rss_mb", "rss_per_agent_kb")},
        }
        print(f"{'devices':<34}{args.devices}")
        print(f"{'rollout state':<34}{status['state']} {status['counts']}")
        print(f"{'registration of all agents':<34}{t_registered:.1f} s")
        for k, v in sorted(wave_done.items()):
            print(f"{f'wave {k} ({policy.waves[k].label()}) done after':<34}{v:.1f} s")
        print(f"{'rollout total':<34}{total:.1f} s")
        print(f"{'controller peak RSS (VmHWM)':<34}{ctl_peak:.1f} MiB")
        print(f"{'controller egress / artifact':<34}{result['controller_egress_over_artifact']}")
        print(json.dumps(result))
        return 0 if status["state"] == "completed" else 1
    finally:
        fleet.close()
        sim.stop()
        ctl.send_signal(signal.SIGTERM)
        try:
            ctl.wait(20)
        except subprocess.TimeoutExpired:
            ctl.kill()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

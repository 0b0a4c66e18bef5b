"""The rollout engine's own cost (database work only): a 3-wave rollout of N devices in-process.

No broker, no agents: devices are driven by feeding Fleet the events agents send (activation,
benchmark), desired states are marked published as the service does, and `tick()` advances the
waves. With `--against REF` the same workload also runs on git REF's tree (extracted to a
temporary directory, own process), and the ratio of the two is printed from this one run.

`idle tick` is one reconcile while no device row can change (published, deadlines ahead, no
event yet), in ms per tick: it should not grow with the number of such rows.

Run: .venv/bin/python bench/bench_rollout_engine.py [--devices 1000] [--against 0ba1f62]
     [--max-idle-ratio 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "data" / "tiny_int8.tflite"
OLD_MODEL = ROOT / "tests" / "data" / "tiny_fp32.tflite"
# Default repetitions per tree; the best is reported (on a shared machine the minimum is the
# cost, the rest is other load).
REPEATS = 3
# Ticks per round while no device row can change (published, deadlines ahead, no events yet):
# what the service's reconcile loop pays every 50 ms between device events.
IDLE_TICKS = 5


def workload(devices: int) -> dict[str, float]:
    """Seconds spent in create, publish, events and ticks for one rollout of `devices`."""
    from agent.protocol import BenchmarkReport, Event, Status
    from controller.fleet.registry import Fleet

    try:
        from controller.fleet.rollout.policy import Gate, Policy, Threshold, parse_waves
    except ImportError:  # before the layered layout
        from controller.policy import Gate, Policy, Threshold, parse_waves  # type: ignore

    spent = {"create": 0.0, "publish": 0.0, "events": 0.0, "tick": 0.0, "idle": 0.0,
             "status": 0.0}  # fmt: skip
    with tempfile.TemporaryDirectory() as home:
        fleet = Fleet(Path(home))
        fleet.add_model(OLD_MODEL, name="m", version="0")
        fleet.add_model(MODEL, name="m", version="1")
        old = fleet.model("m:0")["artifacts"][0]["sha256"]
        for i in range(devices):
            fleet.register_device(f"d{i:05d}", "rpi4")
            fleet.record_status(Status(device_id=f"d{i:05d}", online=True, model_sha256=old))
        policy = Policy(
            waves=parse_waves("10,50,100"),
            max_failures=Threshold(percent=10),
            gates=(Gate("p95_ms", 100.0),),
        )
        t = time.perf_counter()
        rid = fleet.start_rollout("m:1", "all", policy)["id"]
        spent["create"] += time.perf_counter() - t
        for _ in range(3):
            t = time.perf_counter()
            desired = fleet.unpublished_desired()
            fleet.mark_published_many([(d, dv.generation) for d, dv, _ in desired])
            spent["publish"] += time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(IDLE_TICKS):
                assert fleet.rollouts.tick() == [], "an idle tick changed something"
            spent["idle"] += time.perf_counter() - t
            t = time.perf_counter()
            for device, dv, _ in desired:
                sha = dv.artifact.sha256 if dv.artifact else ""
                for kind, extra in (
                    ("update", {"state": "active"}),
                    ("benchmark", {"benchmark": _bench(BenchmarkReport, sha)}),
                ):
                    fleet.record_event(
                        Event(device_id=device, event_id=uuid.uuid4().hex, kind=kind,
                              message=kind, deployment_id=rid, generation=dv.generation,
                              **extra)  # type: ignore[arg-type]
                    )  # fmt: skip
            spent["events"] += time.perf_counter() - t
            # The retained status an agent publishes after its update (the service applies
            # every one); outside `total`, which stays comparable with the figures before it.
            t = time.perf_counter()
            for device, dv, _ in desired:
                sha = dv.artifact.sha256 if dv.artifact else ""
                fleet.record_status(Status(device_id=device, online=True, model_sha256=sha,
                                           generation=dv.generation))  # fmt: skip
            spent["status"] += time.perf_counter() - t
            t = time.perf_counter()
            fleet.rollouts.tick()
            spent["tick"] += time.perf_counter() - t
        status = fleet.deployment(rid)
        assert status["state"] == "completed", status["state"]
        assert status["counts"] == {"succeeded": devices}, status["counts"]
        fleet.close()
    # Reported per tick (ms), outside the total: the cost of one reconcile with nothing to drive.
    idle, status = spent.pop("idle"), spent.pop("status")
    spent["total"] = sum(spent.values())
    spent["status"] = status
    spent["idle tick"] = idle * 1000 / (3 * IDLE_TICKS)
    return spent


def _bench(cls: type, sha: str) -> object:
    """A benchmark report within the gate."""
    return cls(
        model_sha256=sha, runtime="litert", runtime_version="2.3.0", threads=1, runs=50,
        warmup=5, init_ms=1.0, first_inference_ms=1.0, p50_ms=4.0, p90_ms=4.5, p95_ms=5.0,
        p99_ms=5.5, mean_ms=4.2, std_ms=0.1, min_ms=2.5, max_ms=6.0, peak_rss_mb=50.0,
        rss_mb=50.0, power_w=3.0, energy_mj_per_inference=1.0, power_source="estimated:profile",
        power_estimated=True,
    )  # fmt: skip


def tree(ref: str | None, into: str) -> str:
    """A directory holding git `ref`'s tree (extracted into `into`), or this checkout."""
    if ref is None:
        return str(ROOT)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "agent", "controller", "firmware_profiles"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run_once(path: str, devices: int) -> dict[str, float]:
    """One workload on the tree at `path`, in a process of its own."""
    out = subprocess.run(
        [sys.executable, __file__, "--devices", str(devices), "--json"],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        cwd=path,
    ).stdout
    result: dict[str, float] = json.loads(out.splitlines()[-1])
    return result


def main() -> None:
    """Parse arguments, run both trees interleaved (same load for both), print the best."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--against", help="git ref to compare with (same workload, same run)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="runs per tree (best kept)")
    parser.add_argument("--json", action="store_true", help="one run of this tree, as JSON")
    parser.add_argument(
        "--max-idle-ratio",
        type=float,
        help="exit 1 if this tree's idle tick costs more than this times REF's (needs --against)",
    )
    args = parser.parse_args()
    if args.json:
        print(json.dumps(workload(args.devices)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this tree": tree(None, tmp)}
        if args.against:
            trees[args.against] = tree(args.against, tmp)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
        for _ in range(args.repeats):
            for name, path in trees.items():
                runs[name].append(run_once(path, args.devices))
    best = {n: {k: min(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    here = best["this tree"]
    there = best.get(args.against) if args.against else None
    print(f"rollout engine, {args.devices} devices, 3 waves, best of {args.repeats} (interleaved)")
    head = f"{'phase':<10}{'this tree':>12}"
    print(head + (f"{args.against:>14}{'ratio':>8}" if there else ""))
    for phase, seconds in here.items():
        unit = "ms" if phase == "idle tick" else "s"  # per tick; the others are phase totals
        line = f"{phase:<10}{seconds:>10.2f}{unit:<2}"
        if there:
            line += f"{there[phase]:>12.2f}{unit:<2}{seconds / there[phase]:>7.2f}"
        print(line)
    if there and args.max_idle_ratio is not None:
        ratio = here["idle tick"] / there["idle tick"]
        if ratio > args.max_idle_ratio:
            sys.exit(f"idle tick {ratio:.2f}x {args.against}'s, above --max-idle-ratio")


if __name__ == "__main__":
    main()

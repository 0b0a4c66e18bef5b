"""A staged rollout to many simulated agents: total time and the controller's footprint.

One run: mosquitto on a free loopback port, `edgefleet up` as its own process, N simulated
agents (controller/simulate/: one MQTT connection each, real protocol, real chunk hashing)
in this process, then `rollout start` of a real .tflite padded to --artifact-mib with three
waves and gates. Prints wall time per wave and in total, the controller's egress (chunk bytes
it published) over the artifact size, the chunks it published and the repair requests (`need`)
it received, the broker's and the controller's RSS and CPU sampled all through the run
(bench/sampling.py), and the simulator's RSS per agent. A timeout still prints all of that and
keeps the controller and broker logs (their directory goes to stderr).

Run: .venv/bin/python bench/bench_rollout.py [--devices 1000] [--waves 10,50,100] [--timeout 300]
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
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sampling import Sampler  # noqa: E402
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


def stats_line(log: Path) -> dict[str, int]:
    """The controller's last periodic stats line as numbers (chunk bytes, chunks, needs...)."""
    last = ""
    for line in log.read_text(errors="replace").splitlines():
        if "chunk bytes published" in line:
            last = line
    if not last:
        return {}
    text = last.split("stats:", 1)[-1]
    out: dict[str, int] = {}
    for part in text.replace("(", ",").replace(")", "").split(","):
        words = part.split()
        if words and words[0].isdigit():
            out["_".join(words[1:])] = int(words[0])
    return out


def stored_series(log: Path) -> list[tuple[float, int]]:
    """(wall-clock time, telemetry records stored) from every stats line of the controller."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if "telemetry records stored" not in line:
            continue
        stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        count = int(line.split(" telemetry records stored", 1)[0].split()[-1])
        out.append((stamp, count))
    return out


def ingest_lag_s(acked: list[tuple[float, int]], stored: list[tuple[float, int]]) -> float | None:
    """Longest time between the broker acknowledging records (the simulator's PUBACK count) and
    the controller having stored as many: the ingest lag, sampled at ~1 s resolution."""
    if not acked or not stored or acked[-1][1] == 0:
        return None  # no telemetry in this run
    worst = 0.0
    for t, count in acked:
        done = next((ts for ts, n in stored if n >= count and ts >= t - 1.0), None)
        if done is None:
            continue  # not stored by the end (lost, or the run ended): counted as backlog
        worst = max(worst, done - t)
    return round(worst, 1)


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


class Run:
    """Everything measured so far, printed whether the rollout finished or not."""

    def __init__(self, devices: int) -> None:
        """Nothing measured yet."""
        self.devices = devices
        self.phase = "starting"
        self.error = ""
        self.register_s: float | None = None
        self.rollout_t0: float | None = None  # sampler time of `rollout start`
        self.rollout_total_s: float | None = None
        self.wave_done: dict[int, float] = {}
        self.wave_labels: list[str] = []
        self.status: dict[str, Any] = {}
        self.artifact_bytes = 0
        # Simulator figures once every agent registered (before any chunk traffic).
        self.sim_at_rest: dict[str, Any] = {}
        # (wall time, telemetry records the broker acknowledged), sampled through the rollout.
        self.acked: list[tuple[float, int]] = []

    def report(self, sampler: Sampler, log: Path, snap: dict[str, Any]) -> dict[str, Any]:
        """Print the table and return the JSON result."""
        stats = stats_line(log) if log.exists() else {}
        egress = stats.get("chunk_bytes_published", 0)
        size = self.artifact_bytes
        broker = sampler.series.get("broker")
        t0 = self.rollout_t0 if self.rollout_t0 is not None else sampler.now()
        t1 = sampler.now()
        stored = stored_series(log) if log.exists() else []
        result: dict[str, Any] = {
            "devices": self.devices,
            "telemetry": {
                "sent": snap.get("telemetry_sent"),
                "acked": snap.get("telemetry_acked"),
                "resent": snap.get("telemetry_resent"),
                "stored": stats.get("telemetry_records_stored"),
                "duplicates": stats.get("duplicates"),
                "resend_requests": stats.get("resend_requests"),
                "max_ingest_lag_s": ingest_lag_s(self.acked, stored),
            },
            "phase": self.phase,
            "error": self.error,
            "waves": self.wave_labels,
            "artifact_bytes": size,
            "state": self.status.get("state"),
            "counts": self.status.get("counts"),
            "register_s": self.register_s,
            "rollout_total_s": self.rollout_total_s,
            "wave_done_s": {str(k): round(v, 2) for k, v in sorted(self.wave_done.items())},
            "controller_stats": stats,
            "egress_bytes": egress,
            "egress_over_artifact": round(egress / size, 3) if egress and size else None,
            "processes": sampler.summary(),
            "broker_peak_rss_mib_during_rollout": round(broker.peak_between(t0, t1), 1)
            if broker
            else None,
            "broker_cpu_s_during_rollout": round(broker.cpu_between(t0, t1), 1) if broker else None,
            # Cores each process got during the rollout (CPU seconds / wall seconds), and the
            # machine's load: on a shared 2-vCPU box the simulator's share is the usual limit.
            "cores_during_rollout": {
                name: round(series.cpu_between(t0, t1) / max(t1 - t0, 1e-9), 2)
                for name, series in sampler.series.items()
            },
            "loadavg_1_5_15": [round(x, 1) for x in os.getloadavg()],
            "simulator_at_rest": self.sim_at_rest,
            "simulator": {
                k: snap[k]
                for k in (
                    "rss_mb", "rss_per_device_kb", "connects", "chunks_received",
                    "chunks_accepted", "needs_sent", "bytes_received",
                )
                if k in snap
            },
        }  # fmt: skip
        received = snap.get("bytes_received", 0)
        if size and received:
            result["broker_out_over_devices_x_artifact"] = round(
                received / (size * self.devices), 3
            )
        procs = result["processes"]
        print(f"{'devices':<40}{self.devices}")
        print(f"{'phase reached':<40}{self.phase} {self.error}")
        print(f"{'rollout state':<40}{result['state']} {result['counts']}")
        if self.register_s is not None:
            print(f"{'registration of all agents':<40}{self.register_s:.1f} s")
        for k, v in sorted(self.wave_done.items()):
            label = self.wave_labels[k] if k < len(self.wave_labels) else "?"
            print(f"{f'wave {k} ({label}) done after':<40}{v:.1f} s")
        if self.rollout_total_s is not None:
            print(f"{'rollout total (start to verdict)':<40}{self.rollout_total_s:.1f} s")
        print(f"{'controller egress / artifact':<40}{result['egress_over_artifact']}")
        print(f"{'chunks published / needs received':<40}"
              f"{stats.get('chunks', '?')} / {stats.get('need_messages', '?')}")  # fmt: skip
        for name, figures in procs.items():
            print(
                f"{name + ' peak RSS / CPU':<40}{figures['peak_rss_mib']:.1f} MiB / "
                f"{figures['cpu_s']:.1f} s"
            )
        if self.acked:
            print(f"{'telemetry':<40}{result['telemetry']}")
        print(f"{'cores used during the rollout':<40}{result['cores_during_rollout']}")
        print(f"{'load average (1, 5, 15 min)':<40}{result['loadavg_1_5_15']}")
        print(
            f"{'simulator RSS per device at rest / end':<40}"
            f"{self.sim_at_rest.get('rss_per_device_kb')} / {snap.get('rss_per_device_kb')} KiB"
        )
        print(json.dumps(result))
        return result


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (e.g. from `timeout`): end like a timeout, so the figures are still printed."""
    raise TimeoutError(f"terminated by signal {signum}")


def main() -> int:
    """Run the benchmark and print a table and one JSON line (also on a timeout)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--waves", default="10,50,100")
    parser.add_argument("--artifact-mib", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=900.0, help="for each phase, seconds")
    parser.add_argument(
        "--telemetry-interval",
        type=float,
        default=10.0,
        help="simulated telemetry every N s (0: off; 10 s is the agent's default and what the "
        "issue-20 figures ran with)",
    )
    parser.add_argument(
        "--keep-logs",
        type=Path,
        default=None,
        help="copy the controller and broker logs here (kept on failure anyway)",
    )
    parser.add_argument("--up-args", default="", help="extra `edgefleet up` options")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminated)

    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-rollout-"))
    broker = start_mosquitto(work / "mosquitto")
    home = work / "ctl"
    log = work / "ctl.log"
    root = "bench/edgefleet/v1"
    ctl = subprocess.Popen(
        [EDGEFLEET, "up", "--broker", broker.url, "--topic-root", root, "--home", str(home),
         "--stats-interval", "1", *args.up_args.split()],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    sim = Simulation(
        broker.url,
        args.devices,
        topic_root=root,
        prefix="bench",
        telemetry_interval_s=args.telemetry_interval,
    )
    sampler = Sampler(broker=broker.pid, controller=ctl.pid, simulator=os.getpid()).start()
    fleet = Fleet(home)
    run = Run(args.devices)
    ok = False
    try:
        t0 = time.monotonic()
        sim.start()
        run.phase = "connecting"
        wait(lambda: sim.wait_connected(1.0), args.timeout, "simulated agents to connect")
        run.phase = "registering"
        wait(
            lambda: sum(d["online"] for d in fleet.devices()) >= args.devices,
            args.timeout,
            "every simulated agent to be registered",
        )
        run.register_s = round(time.monotonic() - t0, 2)
        rest = sim.snapshot()
        run.sim_at_rest = {k: rest[k] for k in ("rss_mb", "rss_per_device_kb")}
        artifact = padded_model(work, args.artifact_mib)
        run.artifact_bytes = artifact.stat().st_size
        fleet.add_model(artifact, name="bench", version="1")
        policy = Policy(
            waves=parse_waves(args.waves),
            max_failures=Threshold(percent=5.0),
            min_executed=10,
            gates=(Gate("p95_ms", 10_000.0),),
            device_timeout_s=600.0,
        )
        run.wave_labels = [w.label() for w in policy.waves]
        run.phase = "rolling out"
        t1 = time.monotonic()
        run.rollout_t0 = sampler.now()
        rollout = fleet.start_rollout("bench:1", "all", policy)
        while True:
            run.status = fleet.deployment(rollout["id"])
            run.acked.append((time.time(), sim.counters.telemetry_acked))
            for w in run.status["waves"]:
                if w["done"] == w["devices"] and w["wave"] not in run.wave_done:
                    run.wave_done[w["wave"]] = time.monotonic() - t1
            if run.status["state"] not in ("running", "paused"):
                break
            if time.monotonic() - t1 > args.timeout:
                raise TimeoutError(f"rollout still {run.status['state']} after {args.timeout:g} s")
            time.sleep(0.2)
        run.rollout_total_s = round(time.monotonic() - t1, 2)
        run.phase = "done"
        time.sleep(1.5)  # one more stats line
        ok = run.status["state"] == "completed"
    except (TimeoutError, OSError, RuntimeError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        sampler.stop()
        snap = sim.snapshot()
        try:
            run.report(sampler, log, snap)
        finally:
            fleet.close()
            sim.stop()
            ctl.send_signal(signal.SIGTERM)
            try:
                ctl.wait(20)
            except subprocess.TimeoutExpired:
                ctl.kill()
            broker.stop()
            keep = args.keep_logs
            if keep is None and not ok:
                keep = Path(tempfile.mkdtemp(prefix="edgefleet-bench-rollout-logs-"))
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                for src in (log, work / "mosquitto" / "mosquitto.log"):
                    if src.exists():
                        shutil.copyfile(src, keep / src.name)
                print(f"logs kept in {keep}", file=sys.stderr)
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""A staged rollout to many simulated agents: total time and the controller's footprint.

One run: mosquitto on a free loopback port (generated config, open-files limit raised to the
hard limit), `edgefleet up` as its own process, N simulated agents (controller/simulate/: one
MQTT connection each, real protocol, real chunk hashing) sharded over --processes child
processes (one epoll loop each; default min(CPUs, N / 2,000 rounded up), 1 = in this process),
then `rollout start` of a real .tflite padded to --artifact-mib with three waves and gates.
Prints wall time per wave and to the verdict, the controller's egress (chunk bytes it
published) over the artifact size, the chunks it published and the repair requests (`need`)
it received, the broker's, the controller's and each simulator process's RSS and CPU sampled
all through the run (bench/sampling.py), the simulator's RSS per agent at rest per process,
the devices' update latency, the telemetry ingest lag and the load average. A timeout (or
SIGTERM, Ctrl-C) still prints all of that and keeps the controller and broker logs (their
directory goes to stderr).

Run: .venv/bin/python bench/bench_rollout.py [--devices 1000] [--processes N] [--waves 10,50,100]
     [--timeout 300] [--telemetry-interval 10]
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

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sampling import Sampler  # noqa: E402
from controller.brokers.mosquitto import start_mosquitto  # noqa: E402
from controller.fleet.device_search import fleet_summary  # noqa: E402
from controller.fleet.registry import Fleet  # noqa: E402
from controller.fleet.rollout.policy import Gate, Policy, Threshold, parse_waves  # noqa: E402
from controller.fleet.rollout.states import DONE  # noqa: E402
from controller.simulate.shard import default_processes, make_simulation  # noqa: E402
from controller.simulate.worker import raise_fd_limit  # noqa: E402

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


def ingest_lags_s(acked: list[tuple[float, int]], stored: list[tuple[float, int]]) -> list[float]:
    """For each sample of the broker acknowledging records (the simulator's PUBACK count), the
    time until the controller had stored as many: the ingest lag, at ~1 s resolution. A count
    never stored by the end (lost, or the run ended) is the time to the end of the run."""
    if not acked or not stored or acked[-1][1] == 0:
        return []  # no telemetry in this run
    end = stored[-1][0]
    lags = []
    for t, count in acked:
        done = next((ts for ts, n in stored if n >= count and ts >= t - 1.0), None)
        lags.append(max(0.0, (done if done is not None else end) - t))
    return lags


def lag_figures(lags: list[float]) -> dict[str, float | None]:
    """Max and p95 of the ingest lag samples (None without telemetry)."""
    if not lags:
        return {"max": None, "p95": None}
    ordered = sorted(lags)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {"max": round(ordered[-1], 1), "p95": round(p95, 1)}


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


def rollout_progress(fleet: Fleet, rollout_id: str) -> tuple[str, dict[str, int], dict[int, bool]]:
    """(rollout state, devices per state, wave -> every device done): three small queries, not
    the full status of 10,000 rows, so polling costs the shared CPUs nothing measurable."""
    state = fleet.db.query_one("SELECT state FROM deployments WHERE id = ?", (rollout_id,))
    counts: dict[str, int] = {}
    waves: dict[int, bool] = {}
    for row in fleet.db.query(
        "SELECT wave, state, COUNT(*) AS n FROM deployment_devices WHERE deployment_id = ? "
        "GROUP BY wave, state",
        (rollout_id,),
    ):
        counts[row["state"]] = counts.get(row["state"], 0) + int(row["n"])
        waves[int(row["wave"])] = waves.get(int(row["wave"]), True) and row["state"] in DONE
    return (state["state"] if state else "?"), counts, waves


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 1) for x in os.getloadavg()]


class Run:
    """Everything measured so far, printed whether the rollout finished or not."""

    def __init__(self, devices: int, processes: int) -> None:
        """Nothing measured yet."""
        self.devices = devices
        self.processes = processes
        self.phase = "starting"
        self.error = ""
        self.register_s: float | None = None
        self.rollout_t0: float | None = None  # sampler time of `rollout start`
        self.rollout_total_s: float | None = None
        self.wave_done: dict[int, float] = {}
        self.wave_labels: list[str] = []
        self.state = ""
        self.counts: dict[str, int] = {}
        self.artifact_bytes = 0
        # Simulator figures once every agent registered (before any chunk traffic).
        self.sim_at_rest: dict[str, Any] = {}
        # (wall time, telemetry records the broker acknowledged), sampled through the rollout.
        self.acked: list[tuple[float, int]] = []
        self.load = {"start": loadavg()}
        self.broker_fd_limit: int | None = None

    def report(self, sampler: Sampler, log: Path, snap: dict[str, Any]) -> dict[str, Any]:
        """Print the table and return the JSON result."""
        self.load["end"] = loadavg()
        stats = stats_line(log) if log.exists() else {}
        egress = stats.get("chunk_bytes_published", 0)
        size = self.artifact_bytes
        broker = sampler.series.get("broker")
        t0 = self.rollout_t0 if self.rollout_t0 is not None else sampler.now()
        t1 = sampler.now()
        during = sampler.load_between(t0, t1)
        stored = stored_series(log) if log.exists() else []
        cores = {
            name: round(series.cpu_between(t0, t1) / max(t1 - t0, 1e-9), 2)
            for name, series in sampler.series.items()
        }
        sims = {n: s for n, s in sampler.series.items() if n.startswith("simulator")}
        result: dict[str, Any] = {
            "devices": self.devices,
            "simulator_processes": self.processes,
            "telemetry": {
                "sent": snap.get("telemetry_sent"),
                "acked": snap.get("telemetry_acked"),
                "resent": snap.get("telemetry_resent"),
                "stored": stats.get("telemetry_records_stored"),
                "duplicates": stats.get("duplicates"),
                "resend_requests": stats.get("resend_requests"),
                **{
                    f"{k}_ingest_lag_s": v
                    for k, v in lag_figures(ingest_lags_s(self.acked, stored)).items()
                },
            },
            "phase": self.phase,
            "error": self.error,
            "waves": self.wave_labels,
            "artifact_bytes": size,
            "state": self.state,
            "counts": self.counts,
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
            "broker_fd_limit": self.broker_fd_limit,
            # Cores each process got during the rollout (CPU seconds / wall seconds), and the
            # machine's load: on a shared 2-vCPU box the simulator's share is the usual limit.
            "cores_during_rollout": cores,
            "simulator_cpu_s_during_rollout": {
                n: round(s.cpu_between(t0, t1), 1) for n, s in sims.items()
            },
            "loadavg": {**self.load, "during_rollout_1min_min_max": during},
            "simulator_at_rest": self.sim_at_rest,
            "update_latency_s": snap.get("update_latency"),
            "simulator": {
                k: snap[k]
                for k in (
                    "rss_mb", "rss_per_device_kb", "connects", "chunks_received",
                    "chunks_accepted", "needs_sent", "repair_rounds", "bytes_received",
                    "processes", "processes_lost",
                )
                if k in snap
            },
        }  # fmt: skip
        received = snap.get("bytes_received", 0)
        if size and received:
            result["broker_out_over_devices_x_artifact"] = round(
                received / (size * self.devices), 3
            )
        self._print(result, stats)
        print(json.dumps(result))
        return result

    def _print(self, result: dict[str, Any], stats: dict[str, int]) -> None:
        """The human-readable table (the JSON line follows it)."""

        def line(label: str, value: object) -> None:
            print(f"{label:<56}{value}")

        line("devices / simulator processes", f"{self.devices} / {self.processes}")
        line("phase reached", f"{self.phase} {self.error}")
        line("rollout state", f"{result['state']} {result['counts']}")
        if self.register_s is not None:
            line("registration of all agents", f"{self.register_s:.1f} s")
        for k, v in sorted(self.wave_done.items()):
            label = self.wave_labels[k] if k < len(self.wave_labels) else "?"
            line(f"wave {k} ({label}) done after", f"{v:.1f} s")
        if self.rollout_total_s is not None:
            line("rollout total (start to verdict)", f"{self.rollout_total_s:.1f} s")
        line("controller egress / artifact", result["egress_over_artifact"])
        line("chunks published / needs received",
             f"{stats.get('chunks', '?')} / {stats.get('need_messages', '?')}")  # fmt: skip
        line("bytes delivered / (devices x artifact)",
             result.get("broker_out_over_devices_x_artifact"))  # fmt: skip
        line("broker peak RSS during rollout",
             f"{result['broker_peak_rss_mib_during_rollout']} MiB")  # fmt: skip
        broker = result["processes"].get("broker", {})
        line("broker peak fds / open-files limit",
             f"{broker.get('peak_fds')} / {self.broker_fd_limit}")  # fmt: skip
        for name, figures in result["processes"].items():
            line(f"{name} peak RSS / CPU (whole run)",
                 f"{figures['peak_rss_mib']:.1f} MiB / {figures['cpu_s']:.1f} s")  # fmt: skip
        line("cores used during the rollout", result["cores_during_rollout"])
        line("simulator CPU-s during the rollout", result["simulator_cpu_s_during_rollout"])
        for proc in result["simulator"].get("processes", []):
            rest: dict[str, Any] = next(
                (p for p in self.sim_at_rest.get("processes", []) if p["pid"] == proc["pid"]), {}
            )
            line(f"simulator pid {proc['pid']} ({proc['devices']} devices)",
                 f"at rest {rest.get('rss_per_device_kb')} KiB/device, end "
                 f"{proc['rss_per_device_kb']} KiB/device, {proc['rss_mb']} MB")  # fmt: skip
        line("simulator RSS per device at rest / end (worst process)",
             f"{self.sim_at_rest.get('rss_per_device_kb')} / "
             f"{result['simulator'].get('rss_per_device_kb')} KiB")  # fmt: skip
        line("update latency, desired -> verdict (s)", result["update_latency_s"])
        if self.acked:
            line("telemetry", result["telemetry"])
        line("load average start / end (1, 5, 15 min)",
             f"{self.load['start']} / {self.load['end']}")  # fmt: skip
        line("load average at rollout start", self.load.get("rollout"))
        line("1-min load during the rollout (min, max)",
             result["loadavg"]["during_rollout_1min_min_max"])  # fmt: skip


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (e.g. from `timeout`): end like a timeout, so the figures are still printed."""
    raise TimeoutError(f"terminated by signal {signum}")


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="simulator processes (default: min(CPUs, devices / 2000 rounded up); 1 = in the "
        "bench process)",
    )
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
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write a cProfile of the controller's service loop here (EDGEFLEET_PROFILE)",
    )
    return parser.parse_args()


def broker_fd_limit(pid: int | None, devices: int) -> int | None:
    """mosquitto's open-files limit (one fd per connection); warn when `devices` cannot fit."""
    if pid is None:
        return None
    limit: int = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)[0]
    # mosquitto's own 7 fds (listener, log, epoll, stdio; measured) + the controller's session.
    need = devices + 8
    if limit < need:
        print(f"warning: mosquitto's open-files limit {limit} is below the ~{need} fds "
              f"{devices} devices need (hard limit: `ulimit -Hn`); devices past it cannot "
              "connect", file=sys.stderr)  # fmt: skip
    return limit


def watch_simulator(sampler: Sampler, pids: list[int]) -> None:
    """Sample each simulator process by name (`simulator` when it is this process)."""
    for k, pid in enumerate(pids):
        if pid == os.getpid():
            sampler.series["simulator"] = sampler.series.pop("bench")
        else:
            sampler.watch(f"simulator-{k}", pid)


def main() -> int:
    """Run the benchmark and print a table and one JSON line (also on a timeout)."""
    args = parse_args()
    signal.signal(signal.SIGTERM, _terminated)
    processes = args.processes or default_processes(args.devices)
    raise_fd_limit()  # the in-process simulator's sockets; children and mosquitto raise theirs

    run = Run(args.devices, processes)
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-rollout-"))
    broker = start_mosquitto(work / "mosquitto")
    run.broker_fd_limit = broker_fd_limit(broker.pid, args.devices)
    home = work / "ctl"
    log = work / "ctl.log"
    root = "bench/edgefleet/v1"
    ctl = subprocess.Popen(
        [EDGEFLEET, "up", "--broker", broker.url, "--topic-root", root, "--home", str(home),
         "--stats-interval", "1", *args.up_args.split()],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **({"EDGEFLEET_PROFILE": str(args.profile.resolve())}
                              if args.profile else {})},
    )  # fmt: skip
    sim = make_simulation(
        broker.url,
        args.devices,
        processes=processes,
        topic_root=root,
        prefix="bench",
        telemetry_interval_s=args.telemetry_interval,
    )
    sampler = Sampler(broker=broker.pid, controller=ctl.pid, bench=os.getpid())
    fleet = Fleet(home)
    ok = False
    snap: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        sim.start()
        watch_simulator(sampler, sim.pids)
        sampler.start()
        run.phase = "connecting"
        wait(lambda: sim.wait_connected(1.0), args.timeout, "simulated agents to connect")
        run.phase = "registering"
        wait(
            lambda: fleet_summary(fleet.db)["online"] >= args.devices,
            args.timeout,
            "every simulated agent to be registered",
        )
        run.register_s = round(time.monotonic() - t0, 2)
        rest = sim.snapshot()
        run.sim_at_rest = {k: rest[k] for k in ("rss_mb", "rss_per_device_kb", "processes")
                           if k in rest}  # fmt: skip
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
        run.load["rollout"] = loadavg()
        t1 = time.monotonic()
        run.rollout_t0 = sampler.now()
        rollout = fleet.start_rollout("bench:1", "all", policy)
        while True:
            run.state, run.counts, waves = rollout_progress(fleet, rollout["id"])
            run.acked.append((time.time(), sim.counters.telemetry_acked))
            for wave, done in waves.items():
                if done and wave not in run.wave_done:
                    run.wave_done[wave] = time.monotonic() - t1
            if run.state not in ("running", "paused"):
                break
            if time.monotonic() - t1 > args.timeout:
                raise TimeoutError(f"rollout still {run.state} after {args.timeout:g} s")
            time.sleep(0.5)  # 20,000 rows grouped twice a second cost the bench ~0.1 core
        run.rollout_total_s = round(time.monotonic() - t1, 2)
        run.phase = "done"
        time.sleep(1.5)  # one more stats line
        ok = run.state == "completed"
    except (TimeoutError, OSError, RuntimeError, ValueError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        run.error = "interrupted"
    finally:
        sampler.stop()
        try:
            snap = sim.snapshot()
        except Exception as exc:  # the figures of the rest still print
            run.error += f"; simulator snapshot failed: {exc}"
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

"""A simulation sharded over processes: one child per share of the fleet, each one epoll loop.

One Python thread drives 10,000 idle agents on 0.22 of a core, but a rollout needs ~11 ms of CPU
per device (chunk hashing, events, benchmark reports), so 10,000 devices were bound by the one
thread (bench/RESULTS.md). `ShardedSimulation` starts N children (`python -m
controller.simulate.worker`), gives child k the devices whose index i has i % N == k (same ids,
profiles and faults as one process would give them), and merges what they report: counters,
per-state tallies, update latency, memory and CPU per process. paho's own threads are no way
out (loop_start() stopped working past ~340 clients), hence one epoll loop per process.

Children stop cleanly with the parent: on stop(), and when the parent dies (their stdin pipe
closes, worker.py); Ctrl-C reaches the parent, whose stop() ends them.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import pickle
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import IO, Any

from agent.protocol import DEFAULT_ROOT
from controller.simulate.agent import SimCounters
from controller.simulate.faults import Faults, FaultSpec, SimulationError
from controller.simulate.latency import LatencyHistogram
from controller.simulate.loop import SHUTDOWN_TIMEOUT_S, Simulation, check_parameters
from controller.simulate.speed import NO_SPEED, SpeedModel

# The directory holding the `controller` package (the children's import path).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
# Devices per process by default: 2,000 agents take ~0.05 core at rest and ~22 CPU-s through a
# 1 MiB rollout, so a process stays responsive (keepalives, repairs) beside the others.
DEVICES_PER_PROCESS = 2000
# Time for a child to import, build its agents (~0.3 ms each) and say it is ready.
READY_TIMEOUT_S = 60.0
# Time for a child to answer a request (a snapshot of 10,000 agents takes ~20 ms).
REQUEST_TIMEOUT_S = 30.0


def default_processes(devices: int) -> int:
    """min(usable CPUs, devices / DEVICES_PER_PROCESS rounded up), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux; the simulation needs epoll anyway
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, math.ceil(devices / DEVICES_PER_PROCESS)))


class _Shard:
    """One child process and the last things it said."""

    def __init__(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        """Track `proc`; a reader thread fills in what it sends."""
        self.index = index
        self.proc = proc
        self.ready = threading.Event()
        self.ended = threading.Event()
        self.error = ""
        self.devices = 0
        self.counters: dict[str, int] = {}
        self.final: dict[str, Any] | None = None
        self.replies: dict[int, dict[str, Any]] = {}
        self.replied = threading.Condition()
        self.write_lock = threading.Lock()

    def read(self) -> None:
        """Reader thread: route each message of the child until its stdout closes."""
        stream: IO[bytes] | None = self.proc.stdout
        try:
            while stream is not None:
                message = pickle.load(stream)
                kind = message.get("kind")
                if kind == "counters":
                    self.counters = message["counters"]
                elif kind == "ready":
                    self.devices = message["devices"]
                    self.ready.set()
                elif kind == "error":
                    self.error = message["error"]
                elif kind == "final":
                    final = self.final = message["snapshot"]
                    self.counters = {f.name: final[f.name] for f in fields(SimCounters)}
                elif kind == "reply":
                    with self.replied:
                        self.replies[message["id"]] = message
                        self.replied.notify_all()
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        finally:
            self.ended.set()
            self.ready.set()  # wake a start() waiting on a child that died first
            with self.replied:
                self.replied.notify_all()

    def send(self, message: Any) -> bool:
        """Write one pickled message to the child; False once it is gone."""
        stdin = self.proc.stdin
        if stdin is None or self.ended.is_set():
            return False
        with self.write_lock:
            try:
                pickle.dump(message, stdin, protocol=pickle.HIGHEST_PROTOCOL)
                stdin.flush()
            except (OSError, ValueError):
                return False
        return True

    def reply(self, ident: int, timeout: float) -> dict[str, Any] | None:
        """Wait for the reply to request `ident` (None: the child ended or did not answer)."""
        deadline = time.monotonic() + timeout
        with self.replied:
            while ident not in self.replies:
                left = deadline - time.monotonic()
                if left <= 0 or self.ended.is_set():
                    return None
                self.replied.wait(left)
            return self.replies.pop(ident)


class ShardedSimulation:
    """N simulated agents over `processes` child processes; the API of Simulation."""

    def __init__(
        self,
        broker_url: str,
        devices: int,
        *,
        processes: int,
        profiles: Sequence[str] | None = None,
        faults: Sequence[FaultSpec] = (),
        prefix: str = "sim",
        topic_root: str = DEFAULT_ROOT,
        seed: int = 0,
        speed: SpeedModel = NO_SPEED,
        telemetry_interval_s: float = 10.0,
        **options: Any,
    ) -> None:
        """Check every parameter here (the children get them already checked); nothing runs
        before start(). `options` are Simulation's other keyword arguments."""
        if processes < 1:
            raise SimulationError(f"processes must be >= 1, got {processes}")
        _, self._ids, _ = check_parameters(
            broker_url, devices, profiles, faults, prefix, seed, speed, telemetry_interval_s
        )
        self._index = {device_id: i for i, device_id in enumerate(self._ids)}
        self.processes = min(processes, devices)
        self._options: dict[str, Any] = {
            "broker_url": broker_url, "devices": devices, "profiles": profiles,
            "faults": tuple(faults), "prefix": prefix, "topic_root": topic_root, "seed": seed,
            "speed": speed, "telemetry_interval_s": telemetry_interval_s, **options,
        }  # fmt: skip
        self._shards: list[_Shard] = []
        self._ids_seq = itertools.count(1)
        self._started = 0.0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the children, each with its share, and wait until all have built it."""
        self._started = time.monotonic()
        command = [sys.executable, "-m", "controller.simulate.worker"]
        # The children import this very tree, wherever the parent was started from.
        paths = [str(PACKAGE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
        for k in range(self.processes):
            proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, env=env
            )
            shard = _Shard(k, proc)
            self._shards.append(shard)
            threading.Thread(target=shard.read, name=f"shard-{k}", daemon=True).start()
            shard.send({**self._options, "shard": (k, self.processes)})
        deadline = time.monotonic() + READY_TIMEOUT_S
        for shard in self._shards:
            shard.ready.wait(max(0.0, deadline - time.monotonic()))
            if shard.devices == 0:
                code = shard.proc.poll()
                late = f"not ready in {READY_TIMEOUT_S:g} s"
                why = shard.error or (f"exit code {code}" if code is not None else late)
                self.stop()
                raise SimulationError(f"simulation process {shard.index} failed to start: {why}")

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S + 10.0) -> None:
        """Each child: offline statuses and DISCONNECTs, then exit; killed if it hangs."""
        for shard in self._shards:
            shard.send(("stop", (), 0))
            if shard.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    shard.proc.stdin.close()
        deadline = time.monotonic() + timeout
        for shard in self._shards:
            try:
                shard.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                shard.proc.kill()
                shard.proc.wait()
            shard.ended.wait(5.0)
            if shard.proc.stdout is not None:
                shard.proc.stdout.close()

    @property
    def pids(self) -> list[int]:
        """The child processes' ids, in shard order."""
        return [shard.proc.pid for shard in self._shards]

    # ----------------------------------------------------------------- reads
    @property
    def counters(self) -> SimCounters:
        """Every shard's counters added up (as of their last report, every 0.25 s)."""
        total = Counter[str]()
        for shard in self._shards:
            total.update(shard.counters)
        return SimCounters(**{f.name: total.get(f.name, 0) for f in fields(SimCounters)})

    @property
    def device_ids(self) -> list[str]:
        """Every simulated device id, in index order."""
        return list(self._ids)

    def wait_connected(self, timeout: float, count: int | None = None) -> bool:
        """Block until `count` (default: all) clients are connected; False on timeout."""
        wanted = len(self._ids) if count is None else count
        deadline = time.monotonic() + timeout
        while self.counters.connected < wanted:
            if time.monotonic() > deadline or all(s.ended.is_set() for s in self._shards):
                return False
            time.sleep(0.05)
        return True

    def _call(self, shards: Sequence[_Shard], op: str, *args: Any) -> list[Any]:
        """Send one request to each shard, then collect the answers (None from a dead one)."""
        sent: list[tuple[_Shard, int | None]] = []
        for shard in shards:
            ident = next(self._ids_seq)
            sent.append((shard, ident if shard.send((op, args, ident)) else None))
        out = []
        for shard, asked in sent:
            reply = None if asked is None else shard.reply(asked, REQUEST_TIMEOUT_S)
            if reply is not None and "error" in reply:
                raise SimulationError(f"simulation process {shard.index}: {reply['error']}")
            out.append(None if reply is None else reply["result"])
        return out

    def snapshot(self) -> dict[str, Any]:
        """Every shard's snapshot merged, plus one entry per process (see merge_snapshots)."""
        parts = self._call(self._shards, "snapshot")
        # A shard that ended already is represented by its final snapshot.
        got = [p if p is not None else s.final for p, s in zip(parts, self._shards, strict=True)]
        elapsed = time.monotonic() - self._started if self._started else 0.0
        return merge_snapshots([p for p in got if p is not None], elapsed, len(self._shards))

    def _shard_of(self, device_id: str) -> _Shard:
        """The shard running a device (index i runs on shard i % processes)."""
        return self._shards[self._index[device_id] % len(self._shards)]

    def device(self, device_id: str) -> dict[str, Any]:
        """One device's state (see SimAgent.describe)."""
        result: dict[str, Any] = self._call([self._shard_of(device_id)], "device", device_id)[0]
        return result

    def devices_with(self, fault: str) -> list[str]:
        """Ids of devices carrying a fault kind, in index order."""
        found = {d for part in self._call(self._shards, "devices_with", fault) for d in part or ()}
        return [d for d in self._ids if d in found]

    def set_faults(self, device_ids: Sequence[str], faults: Faults) -> None:
        """Give devices other faults from now on."""
        for shard, ids in self._by_shard(device_ids).items():
            self._call([shard], "set_faults", ids, faults)

    def drop_connections(self, device_ids: Sequence[str], down_for: float) -> None:
        """Cut devices' TCP links without DISCONNECT; each stays down `down_for` s."""
        for shard, ids in self._by_shard(device_ids).items():
            self._call([shard], "drop_connections", ids, down_for)

    def _by_shard(self, device_ids: Sequence[str]) -> dict[_Shard, list[str]]:
        """Device ids grouped by the shard that runs them."""
        out: dict[_Shard, list[str]] = {}
        for device_id in device_ids:
            out.setdefault(self._shard_of(device_id), []).append(device_id)
        return out


def merge_snapshots(parts: list[dict[str, Any]], elapsed_s: float, shards: int) -> dict[str, Any]:
    """One snapshot of the whole fleet from the shards' ones.

    Counters, states, faults and spooled telemetry add up; `rss_mb` is the shards' total and
    `rss_per_device_kb` the worst shard's (the ≤ 10 KB limit holds per process); update latency
    merges the shards' buckets; `processes` lists each shard's pid, devices, RSS and CPU.
    """
    counters = {f.name: sum(p.get(f.name, 0) for p in parts) for f in fields(SimCounters)}
    states: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    for part in parts:
        states.update(part.get("states", {}))
        faults.update(part.get("faults", {}))
    latency = LatencyHistogram.merged([p["update_latency_raw"] for p in parts])
    return {
        "devices": sum(p["devices"] for p in parts),
        "elapsed_s": round(elapsed_s, 2),
        **counters,
        "states": dict(sorted(states.items())),
        "faults": dict(sorted(faults.items())),
        "telemetry_spooled": sum(p.get("telemetry_spooled", 0) for p in parts),
        "rss_mb": round(sum(p["rss_mb"] for p in parts), 1),
        "rss_per_device_kb": max((p["rss_per_device_kb"] for p in parts), default=0.0),
        "update_latency": latency.summary(),
        "processes": [
            {k: p[k] for k in ("pid", "devices", "rss_mb", "rss_per_device_kb", "cpu_s")}
            for p in parts
        ],
        "processes_lost": shards - len(parts),
    }


def make_simulation(
    broker_url: str, devices: int, *, processes: int | None = None, **options: Any
) -> Simulation | ShardedSimulation:
    """`processes` (default: default_processes(devices)) children, or this process for 1."""
    n = default_processes(devices) if processes is None else processes
    if n == 1:
        return Simulation(broker_url, devices, **options)
    return ShardedSimulation(broker_url, devices, processes=n, **options)

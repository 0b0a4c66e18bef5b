"""The simulation: N simulated agents on one epoll loop in one thread (paho scales no further)."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import os
import platform
import random
import select
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, cast

import psutil

import firmware_profiles
from agent.protocol import (
    DEFAULT_ROOT,
    DeviceFacts,
    Manifest,
    ProtocolError,
    Topics,
    dump,
    parse,
    validate_device_id,
)
from controller.brokers.base import parse_broker_url
from controller.simulate.agent import SimAgent, SimCounters
from controller.simulate.download import Assembly
from controller.simulate.faults import (
    FAULT_ATTRS,
    FAULT_KINDS,
    NO_FAULTS,
    Faults,
    FaultSpec,
    SimulationError,
    assign_faults,
)
from controller.simulate.figures import MIB
from controller.simulate.latency import LatencyHistogram
from controller.simulate.netutil import unread_bytes
from controller.simulate.plumbing import PahoPlumbing
from controller.simulate.speed import NO_SPEED, SpeedModel
from controller.simulate.telemetry import (
    DEFAULT_INTERVAL_S,
    DEFAULT_KEEP_ACKED,
    DEFAULT_SPOOL_RECORDS,
    RECORD,
    FleetTelemetry,
)

# One logger for the whole package, named as before the split (log lines show the name).
log = logging.getLogger("controller.simulate")

# Keepalive as the agent (protocol/transport.py).
KEEPALIVE_S = 30
# A CONNECT unanswered for this long is dropped and retried (a broker that slow is broken).
CONNACK_TIMEOUT_S = 10.0
# Longest epoll wait: bounds how late stop() and the keepalive sweep are noticed.
POLL_INTERVAL_S = 0.1
# The keepalive sweep (loop_misc: PINGREQ when due) runs this often; keepalive is 30 s...
MISC_INTERVAL_S = 1.0
# ...one slice of them per interval: every client is swept every 10 s (see _sweep).
SWEEP_SLICES = 10
# At stop, time allowed for offline statuses and DISCONNECTs to be written.
SHUTDOWN_TIMEOUT_S = 5.0
# Download deadline and repair interval: the real agent's defaults (agent/protocol/config.py).
FETCH_TIMEOUT_S = 300.0
REPAIR_INTERVAL_S = 2.0
# More devices than this in one process is a typo (10,000 were measured at ~5 KB each).
MAX_DEVICES = 100_000


def default_profiles() -> list[str]:
    """Every profile that runs the agent (not MCUs), sorted by id."""
    return [p.id for p in firmware_profiles.load_all().values() if p.runs_agent]


class Simulation(PahoPlumbing):
    """N simulated agents on one epoll loop in one thread; start(), then stop()."""

    def __init__(
        self,
        broker_url: str,
        devices: int,
        *,
        profiles: Sequence[str] | None = None,
        faults: Sequence[FaultSpec] = (),
        prefix: str = "sim",
        topic_root: str = DEFAULT_ROOT,
        seed: int = 0,
        fetch_timeout_s: float = FETCH_TIMEOUT_S,
        repair_interval_s: float = REPAIR_INTERVAL_S,
        keepalive_s: int = KEEPALIVE_S,
        telemetry_interval_s: float = DEFAULT_INTERVAL_S,
        telemetry_spool_records: int = DEFAULT_SPOOL_RECORDS,
        telemetry_keep_acked: int = DEFAULT_KEEP_ACKED,
        speed: SpeedModel = NO_SPEED,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """Resolve profiles and faults and build the clients; nothing connects before start().

        `telemetry_interval_s` = 0 turns telemetry off; the spool keeps at most
        `telemetry_spool_records` unsent records and `telemetry_keep_acked` acknowledged ones.
        `speed` scales latencies per profile by recipe and threads (controller/simulate/speed.py).
        `shard` (k, n): this process runs only the devices whose index i has i % n == k, with
        the ids, profiles and faults they have in the whole fleet of `devices` (shard.py).
        """
        chosen, ids, fault_map = check_parameters(
            broker_url, devices, profiles, faults, prefix, seed, speed, telemetry_interval_s
        )
        if telemetry_spool_records < 1 or telemetry_keep_acked < 0:
            raise SimulationError(
                "telemetry spool must hold >= 1 record and keep >= 0 acknowledged ones"
            )
        index, shards = shard
        if not 0 <= index < shards:
            raise SimulationError(f"shard must be (k, n) with 0 <= k < n, got {shard}")
        self.host, self.port = parse_broker_url(broker_url)
        self.topics = Topics(topic_root)
        self.seed = seed
        self.fetch_timeout_s = fetch_timeout_s
        self.repair_interval_s = repair_interval_s
        self.keepalive_s = keepalive_s
        self.speed = speed
        self.telemetry: FleetTelemetry | None = None
        if telemetry_interval_s > 0:
            self.telemetry = FleetTelemetry(
                self, telemetry_interval_s, telemetry_spool_records, telemetry_keep_acked
            )
        self.counters = SimCounters()
        # Desired state received -> verdict, per update (latency.py; merged across shards).
        self.update_latency = LatencyHistogram()
        self._rss_before = psutil.Process().memory_info().rss
        self._facts: dict[str, DeviceFacts] = {}
        self._assemblies: dict[str, Assembly] = {}
        self._manifests: dict[bytes, Manifest] = {}
        self._ep = select.epoll()
        self._by_fd: dict[int, SimAgent] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._connect_queue: deque[SimAgent] = deque()
        self._connecting = 0
        self._dirty: set[SimAgent] = set()
        self._stop = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._slice = 0  # the keepalive sweep's current slice
        self.agents = [
            SimAgent(self, ids[i], chosen[i % len(chosen)], fault_map.get(i, NO_FAULTS))
            for i in range(index, devices, shards)
        ]
        for agent in self.agents:
            agent.rng = self._fault_rng(agent.device_id, agent.faults)
        self._by_id = {agent.device_id: agent for agent in self.agents}

    # ----------------------------------------------------------------- public API
    @property
    def device_ids(self) -> list[str]:
        """Every simulated device id, in index order."""
        return [agent.device_id for agent in self.agents]

    def devices_with(self, fault: str) -> list[str]:
        """Ids of devices carrying a fault kind (one of FAULT_KINDS, e.g. telemetry-loss)."""
        if fault not in FAULT_KINDS:
            raise SimulationError(f"unknown fault {fault!r} ({', '.join(FAULT_KINDS)})")
        attr = FAULT_ATTRS.get(fault, fault)
        empty = getattr(NO_FAULTS, attr)
        return [a.device_id for a in self.agents if getattr(a.faults, attr) != empty]

    def set_faults(self, device_ids: Sequence[str], faults: Faults) -> None:
        """Give devices other faults from now on (e.g. after a clean first rollout)."""
        for device_id in device_ids:
            agent = self._by_id[device_id]
            agent.faults = faults
            agent.rng = self._fault_rng(device_id, faults)

    def drop_connections(self, device_ids: Sequence[str], down_for: float) -> None:
        """Cut devices' TCP links without DISCONNECT (wills fire); each stays down `down_for` s.

        Callable from any thread: the cut itself runs in the loop (a heap push is atomic).
        """
        for device_id in device_ids:
            self.drop_connection(self._by_id[device_id], down_for)

    def device(self, device_id: str) -> dict[str, Any]:
        """One device's state (see SimAgent.describe)."""
        return self._by_id[device_id].describe()

    def start(self) -> None:
        """Queue every client for connecting, schedule telemetry and start the loop thread."""
        self._started = time.monotonic()
        self._connect_queue.extend(self.agents)
        for agent in self.agents:
            if agent.telemetry is not None:
                agent.telemetry.start(self._started)
        self._thread = threading.Thread(target=self._run, name="edgefleet-simulate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S + 5.0) -> None:
        """Publish offline statuses, DISCONNECT every client and end the loop thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_connected(self, timeout: float, count: int | None = None) -> bool:
        """Block until `count` (default: all) clients are connected; False on timeout."""
        wanted = len(self.agents) if count is None else count
        deadline = time.monotonic() + timeout
        while self.counters.connected < wanted:
            if time.monotonic() > deadline or self._thread is None or not self._thread.is_alive():
                return False
            time.sleep(0.05)
        return True

    def snapshot(self) -> dict[str, Any]:
        """Counters, states and memory as plain JSON-ready values."""
        rss = psutil.Process().memory_info().rss
        agents = list(self.agents)
        faults = Counter(name.split("=")[0] for a in agents for name in a.faults.names())
        return {
            "devices": len(agents),
            "elapsed_s": round(time.monotonic() - self._started, 2) if self._started else 0.0,
            **asdict(self.counters),
            "states": dict(sorted(Counter(a.state.value for a in agents).items())),
            "faults": dict(sorted(faults.items())),
            "telemetry_spooled": sum(
                len(a.telemetry.pending) // RECORD.size for a in agents if a.telemetry is not None
            ),
            "rss_mb": round(rss / MIB, 1),
            "rss_per_device_kb": round((rss - self._rss_before) / len(agents) / 1024, 2),
            "update_latency": self.update_latency.summary(),
        }

    @property
    def pids(self) -> list[int]:
        """The processes running the agents: this one."""
        return [os.getpid()]

    # ----------------------------------------------------------------- shared helpers
    @property
    def stopping(self) -> bool:
        """Whether the loop is shutting down (timers then stop re-arming)."""
        return self._stopping or self._stop.is_set()

    def _fault_rng(self, device_id: str, faults: Faults) -> random.Random | None:
        """The seeded generator behind the drop and telemetry-loss faults (None without them)."""
        if faults.drop or faults.telemetry_loss:
            return random.Random(f"{self.seed}:drop:{device_id}")
        return None

    def touch(self, agent: SimAgent) -> None:
        """Mark a client as having output to flush at the end of this loop iteration."""
        self._dirty.add(agent)

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Run `callback` in the loop thread at monotonic time `when`."""
        heapq.heappush(self._timers, (when, next(self._seq), callback))

    def facts_for(self, profile: firmware_profiles.Profile) -> DeviceFacts:
        """Hello facts consistent with a profile (shared by every agent of that profile)."""
        facts = self._facts.get(profile.id)
        if facts is None:
            facts = DeviceFacts(
                arch=profile.cpu.arch,
                system="Linux",
                cpu_count=profile.cpu.cores,
                ram_mb=profile.memory.ram_mb,
                runtime=profile.runtime.name,
                runtime_version=profile.runtime.version,
                python=platform.python_version(),
                delegates=("xnnpack", *profile.delegates),
            )
            self._facts[profile.id] = facts
        return facts

    def parse_manifest(self, payload: bytes) -> Manifest:
        """Strictly parse a manifest, once per distinct payload (every agent gets the same)."""
        manifest = self._manifests.get(payload)
        if manifest is None:
            manifest = parse(payload, Manifest)
            if len(self._manifests) >= 16:
                self._manifests.clear()
            self._manifests[payload] = manifest
        return manifest

    def assembly_for(self, manifest: Manifest) -> Assembly:
        """The process-wide assembly of an artifact, shared by every agent fetching it."""
        assembly = self._assemblies.get(manifest.sha256)
        if assembly is None or assembly.manifest.chunk_sha256 != manifest.chunk_sha256:
            assembly = self._assemblies[manifest.sha256] = Assembly(manifest)
        assembly.users += 1
        return assembly

    def release(self, assembly: Assembly) -> None:
        """One agent is done with an assembly; an unverified one goes with its last user."""
        assembly.users -= 1
        if assembly.users <= 0 and assembly.digest is None:
            if self._assemblies.get(assembly.manifest.sha256) is assembly:
                del self._assemblies[assembly.manifest.sha256]
            assembly.close()

    def verify(self, assembly: Assembly) -> str:
        """Whole-file sha256 of an assembly, counted the one time it is computed."""
        if assembly.digest is None:
            self.counters.artifacts_verified += 1
        return assembly.verify()

    def drop_connection(self, agent: SimAgent, down_for: float) -> None:
        """Lose the TCP link without DISCONNECT (the will fires); stay down `down_for` s."""
        agent.down_until = time.monotonic() + down_for

        def drop() -> None:
            """Flush what was published just before, then cut the socket."""
            if agent.client.want_write():
                agent.client.loop_write()
            sock = agent.client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    # EOF → loop_read → on_disconnect (paho types it as a SocketLike)
                    cast(socket.socket, sock).shutdown(socket.SHUT_RDWR)

        self.call_at(0.0, drop)

    # ----------------------------------------------------------------- the loop
    def _run(self) -> None:
        """The one loop: epoll, timers, keepalive sweep, connects, then flush writes."""
        next_misc = time.monotonic() + MISC_INTERVAL_S
        try:
            while not self._stop.is_set():
                self._start_connects()
                self._poll(self._poll_timeout())
                self._run_timers()
                if time.monotonic() >= next_misc:
                    next_misc = time.monotonic() + MISC_INTERVAL_S
                    self._sweep()
                self._flush()
            self._shutdown()
        except Exception:
            log.exception("simulation loop crashed")
            raise
        finally:
            for assembly in list(self._assemblies.values()):
                assembly.close()
            self._ep.close()

    def _poll_timeout(self) -> float:
        """Wait until the next timer, at most POLL_INTERVAL_S."""
        if self._dirty:
            return 0.0
        if self._timers:
            return min(POLL_INTERVAL_S, max(0.0, self._timers[0][0] - time.monotonic()))
        return POLL_INTERVAL_S

    def _poll(self, timeout: float) -> None:
        """Read and write every ready socket once (epoll is level-triggered: rest next turn)."""
        for fd, mask in self._ep.poll(timeout):
            agent = self._by_fd.get(fd)
            if agent is None:
                continue
            if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                agent.client.loop_read()
            if mask & select.EPOLLOUT and agent.fd == fd:
                agent.client.loop_write()
            self._dirty.add(agent)

    def _run_timers(self) -> None:
        """Run the timers due now; ones they schedule wait for the next turn (no starvation)."""
        now = time.monotonic()
        due = []
        while self._timers and self._timers[0][0] <= now:
            due.append(heapq.heappop(self._timers)[2])
        for callback in due:
            try:
                callback()
            except Exception:
                self.counters.errors += 1
                log.exception("simulation timer failed")

    def _sweep(self) -> None:
        """Keepalive for one slice of the clients; drop connects that never got a CONNACK.

        Each client is visited every SWEEP_SLICES × MISC_INTERVAL_S (10 s): its PINGREQ then
        goes out at most 10 s late (30-40 s of silence; the broker waits 1.5 × 30 s), and the
        sweep costs a tenth of visiting 10,000 clients every second, which was ~0.1 core. A
        client with unread bytes is skipped: when this one thread is starved of CPU its CONNACKs
        and PINGRESPs wait in the socket, and judging timeouts then dropped ~3,000 healthy
        connections of 10,000 (bench/RESULTS.md, "Rollout at scale").
        """
        now = time.monotonic()
        self._slice = (self._slice + 1) % SWEEP_SLICES
        for agent in self.agents[self._slice :: SWEEP_SLICES]:
            if agent.fd is None:
                continue
            if unread_bytes(agent.fd):
                continue  # the loop is behind, not the broker: read first (a CONNACK, a PINGRESP)
            if agent.connecting is not None and now - agent.connecting > CONNACK_TIMEOUT_S:
                self.drop_connection(agent, 0.0)
            agent.client.loop_misc()
            if agent.client.want_write():
                self._dirty.add(agent)

    def _flush(self) -> None:
        """Write pending output of touched clients; watch for writability only when blocked."""
        dirty, self._dirty = self._dirty, set()
        for agent in dirty:
            client = agent.client
            if agent.fd is None:
                continue
            if client.want_write():
                client.loop_write()
            fd = agent.fd
            if fd is None:
                continue
            want = client.want_write()
            if want != agent.write_registered:
                agent.write_registered = want
                self._ep.modify(fd, select.EPOLLIN | (select.EPOLLOUT if want else 0))

    def _shutdown(self) -> None:
        """Offline status + DISCONNECT for every client, like a daemon stopping cleanly."""
        self._stopping = True
        for agent in self.agents:
            if agent.connected:
                agent.publish(agent.base + "status", dump(agent.status(online=False)), retain=True)
                agent.client.disconnect()
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        while self._by_fd and time.monotonic() < deadline:
            self._flush()
            self._poll(0.05)
        for agent in list(self._by_fd.values()):
            sock = agent.client.socket()
            self._on_socket_close(agent.client, agent, sock)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()


def check_parameters(
    broker_url: str,
    devices: int,
    profiles: Sequence[str] | None,
    faults: Sequence[FaultSpec],
    prefix: str,
    seed: int,
    speed: SpeedModel,
    telemetry_interval_s: float,
) -> tuple[list[firmware_profiles.Profile], list[str], dict[int, Faults]]:
    """Check a simulation's parameters (SimulationError naming the bad one); return the
    profiles to assign round-robin, every device id and the faults by device index."""
    if not 1 <= devices <= MAX_DEVICES:
        raise SimulationError(f"devices must be in 1..{MAX_DEVICES}, got {devices}")
    if not hasattr(select, "epoll"):
        raise SimulationError("edgefleet simulate needs Linux (select.epoll)")
    parse_broker_url(broker_url)
    speed.check_profiles(firmware_profiles.load_all())
    if telemetry_interval_s < 0 or not math.isfinite(telemetry_interval_s):
        raise SimulationError(f"telemetry interval must be >= 0 s, got {telemetry_interval_s}")
    chosen = _resolve_profiles(profiles)
    width = max(4, len(str(devices - 1)))
    ids = [f"{prefix}-{i:0{width}d}" for i in range(devices)]
    try:
        validate_device_id(ids[-1])
    except ProtocolError as exc:
        raise SimulationError(f"bad --prefix {prefix!r}: {exc}") from None
    return chosen, ids, assign_faults(faults, devices, seed)


def _resolve_profiles(ids: Sequence[str] | None) -> list[firmware_profiles.Profile]:
    """Profiles to assign round-robin; each must exist and run the agent."""
    known = firmware_profiles.load_all()
    chosen: list[firmware_profiles.Profile] = []
    for profile_id in ids or default_profiles():
        profile = known.get(profile_id)
        if profile is None:
            raise SimulationError(
                f"unknown profile {profile_id!r}; known profiles: {', '.join(known)}"
            )
        if not profile.runs_agent:
            raise SimulationError(
                f"profile {profile_id!r} does not run the agent (runs_agent=false)"
            )
        chosen.append(profile)
    return chosen

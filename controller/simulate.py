"""`edgefleet simulate`: many simulated agents in one process, speaking the real wire protocol.

Each simulated agent holds its own MQTT connection (client id = device id) and follows its
retained desired state the way agent/daemon.py does, without a model runtime: chunks are hashed
for real, self-test and benchmark figures are synthesized from the device profile
(docs/simulate.md). Every connection is driven from one epoll loop in one thread: paho's
loop_start() costs a thread per client and its select() cannot see fds past 1024, which made
~340 clients the silent ceiling.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import platform
import random
import select
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any

import paho.mqtt.client as paho
import psutil
import typer
from paho.mqtt.enums import CallbackAPIVersion

import firmware_profiles
from agent import __version__ as AGENT_VERSION
from agent.protocol import (
    DEFAULT_ROOT,
    BenchmarkReport,
    Command,
    Desired,
    DeviceFacts,
    Event,
    Hello,
    Manifest,
    Need,
    ProtocolError,
    Status,
    Topics,
    dump,
    parse,
    validate_device_id,
)
from controller.broker import parse_broker_url

log = logging.getLogger(__name__)

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
# Clients whose CONNECT is out but whose CONNACK is not in yet: a 1,000-device start then
# reaches the broker as a steady stream instead of 1,000 simultaneous handshakes.
MAX_CONNECTING = 64
# Keepalive, inflight window and reconnect backoff as the real agent (agent/mqtt.py).
KEEPALIVE_S = 30
MAX_INFLIGHT = 20
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 30.0
# ±20 % jitter on reconnect delays, so a broker restart is not answered by one burst.
RECONNECT_JITTER = 0.2
# A CONNECT unanswered for this long is dropped and retried (a broker that slow is broken).
CONNACK_TIMEOUT_S = 10.0
# How long a simulated agent whose model "crashed the self-test" stays down before restarting.
CRASH_RESTART_S = 2.0
# Longest epoll wait: bounds how late stop() and the keepalive sweep are noticed.
POLL_INTERVAL_S = 0.1
# Each connected client gets loop_misc() (PINGREQ when due) this often; keepalive is 30 s.
MISC_INTERVAL_S = 1.0
# At stop, time allowed for offline statuses and DISCONNECTs to be written.
SHUTDOWN_TIMEOUT_S = 5.0
# Download deadline and repair interval: the real agent's defaults (agent/config.py).
FETCH_TIMEOUT_S = 300.0
REPAIR_INTERVAL_S = 2.0
# One progress line per this many seconds from the CLI.
PROGRESS_INTERVAL_S = 5.0
# More devices than this in one process is a typo (10,000 were measured at ~5 KB each).
MAX_DEVICES = 100_000

# ---- synthesized measurements (docs/simulate.md, "Benchmark model") -------------------------
MIB = 1024 * 1024
# p50 per MiB of model on a 4-core device: a round figure near the real agent's measurement
# (MobileNetV2 int8, 3.9 MB, 10-13 ms on one x86 thread with litert; bench/RESULTS.md). It is
# a load generator's number, not a prediction for any board.
LATENCY_MS_PER_MB = 10.0
REFERENCE_CORES = 4
# Fixed per-invoke cost (interpreter dispatch), so a 5 KB model is not reported as 0 ms.
LATENCY_FLOOR_MS = 0.05
# Seeded per device and model: a fleet shows spread, and a rerun shows the same numbers.
LATENCY_NOISE = 0.03
# Benchmark distribution relative to p50: an assumed, typical right-skewed shape.
LATENCY_SHAPE = {
    "p90_ms": 1.06,
    "p95_ms": 1.09,
    "p99_ms": 1.18,
    "mean_ms": 1.02,
    "std_ms": 0.04,
    "min_ms": 0.96,
    "max_ms": 1.35,
    "first_inference_ms": 2.5,
}
# Idle agent RSS and per-MB model cost: 45-48 MB idle, +18.5 MB for a 3.94 MB model with
# XNNPACK's repacked weights (bench/RESULTS.md).
RSS_BASE_MB = 46.0
RSS_PER_MODEL_MB = 4.7
# Interpreter init: mmap + allocate; a few ms plus a little per MB.
INIT_BASE_MS = 2.0
INIT_MS_PER_MB = 0.8
# Threads the simulated benchmark uses (the demo agents use 1); also the busy cores for power.
BENCH_THREADS = 1

FAULT_KINDS = ("slow", "crash", "nan", "offline", "drop")
_FAULT_VALUE = {"slow": "a factor > 0", "offline": "seconds > 0", "drop": "a fraction in (0, 1)"}


class SimulationError(ValueError):
    """A bad simulation parameter (fault spec, profile, prefix); the text names it."""


# =========================================================================== faults


@dataclass(frozen=True)
class FaultSpec:
    """One --fault: the fault, its parameter, and how many devices get it (count or percent)."""

    kind: str
    value: float | None
    count: int | None = None
    percent: float | None = None
    text: str = ""

    def devices(self, total: int) -> int:
        """How many of `total` devices get this fault (a percentage > 0 means at least one)."""
        if self.count is not None:
            return min(self.count, total)
        share = total * (self.percent or 0.0) / 100.0
        return min(total, max(1, round(share))) if share > 0 else 0


def parse_fault(spec: str) -> FaultSpec:
    """Parse KIND[=VALUE]:COUNT or KIND[=VALUE]:PERCENT% strictly, naming the bad spec."""
    head, sep, amount = spec.strip().rpartition(":")
    if not sep or not head:
        raise SimulationError(
            f"bad --fault {spec!r}: expected KIND[=VALUE]:COUNT or KIND[=VALUE]:PERCENT%, "
            "e.g. nan:5%, slow=3:10%, offline=30:2%, crash:1"
        )
    kind, has_value, raw = head.partition("=")
    if kind not in FAULT_KINDS:
        raise SimulationError(
            f"bad --fault {spec!r}: unknown fault {kind!r} ({', '.join(FAULT_KINDS)})"
        )
    value: float | None = None
    if kind in _FAULT_VALUE:
        if not has_value:
            raise SimulationError(f"bad --fault {spec!r}: {kind} needs ={_FAULT_VALUE[kind]}")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and value > 0 and (kind != "drop" or value < 1)
        if not ok:
            raise SimulationError(
                f"bad --fault {spec!r}: {kind} value must be {_FAULT_VALUE[kind]}"
            )
    elif has_value:
        raise SimulationError(f"bad --fault {spec!r}: {kind} takes no value")
    if amount.endswith("%"):
        try:
            percent = float(amount[:-1])
        except ValueError:
            percent = math.nan
        if not 0 < percent <= 100:
            raise SimulationError(f"bad --fault {spec!r}: percentage must be in (0, 100]")
        return FaultSpec(kind, value, percent=percent, text=spec)
    if not amount.isdigit() or int(amount) < 1:
        raise SimulationError(f"bad --fault {spec!r}: count must be an integer >= 1 or N%")
    return FaultSpec(kind, value, count=int(amount), text=spec)


@dataclass(frozen=True)
class Faults:
    """The faults one simulated agent carries (shared, immutable; most agents have none)."""

    slow: float = 1.0
    crash: bool = False
    nan: bool = False
    offline_s: float = 0.0
    drop: float = 0.0

    def names(self) -> list[str]:
        """Fault names as in --fault, for snapshots."""
        out = [f"slow={self.slow:g}"] if self.slow != 1.0 else []
        out += ["crash"] if self.crash else []
        out += ["nan"] if self.nan else []
        out += [f"offline={self.offline_s:g}"] if self.offline_s else []
        out += [f"drop={self.drop:g}"] if self.drop else []
        return out


NO_FAULTS = Faults()


def assign_faults(specs: Sequence[FaultSpec], total: int, seed: int) -> dict[int, Faults]:
    """Device index -> faults: a seeded subset per spec, preferring devices without a fault."""
    assigned: dict[int, Faults] = {}
    for position, spec in enumerate(specs):
        wanted = spec.devices(total)
        rng = random.Random(f"{seed}:{position}:{spec.text}")
        free = [i for i in range(total) if i not in assigned]
        pool = free if len(free) >= wanted else list(range(total))
        change: dict[str, Any] = {
            "slow": {"slow": spec.value},
            "crash": {"crash": True},
            "nan": {"nan": True},
            "offline": {"offline_s": spec.value},
            "drop": {"drop": spec.value},
        }[spec.kind]
        for index in sorted(rng.sample(pool, wanted)):
            assigned[index] = replace(assigned.get(index, NO_FAULTS), **change)
    return assigned


# =========================================================================== synthesized figures


def synth_figures(
    profile: firmware_profiles.Profile, size: int, key: str, slow: float = 1.0
) -> tuple[float, float]:
    """(p50 ms, peak RSS MB) of a model on a device class: linear in size, inverse in cores."""
    size_mb = size / MIB
    noise = 1.0 + random.Random(key).uniform(-LATENCY_NOISE, LATENCY_NOISE)
    scale = REFERENCE_CORES / profile.cpu.cores
    p50 = (LATENCY_FLOOR_MS + LATENCY_MS_PER_MB * size_mb) * scale * slow * noise
    return p50, RSS_BASE_MB + RSS_PER_MODEL_MB * size_mb


def synth_report(
    profile: firmware_profiles.Profile,
    sha256: str,
    size: int,
    p50: float,
    peak_mb: float,
    *,
    runs: int,
    warmup: int,
) -> BenchmarkReport:
    """A complete BenchmarkReport from the profile: shaped latencies, estimated power."""
    figures = {name: round(p50 * factor, 4) for name, factor in LATENCY_SHAPE.items()}
    power_w = profile.power.estimate_w(busy_cores=BENCH_THREADS)
    return BenchmarkReport(
        model_sha256=sha256,
        runtime=profile.runtime.name,
        runtime_version=profile.runtime.version,
        threads=BENCH_THREADS,
        runs=runs,
        warmup=warmup,
        init_ms=round(INIT_BASE_MS + INIT_MS_PER_MB * size / MIB, 3),
        p50_ms=round(p50, 4),
        peak_rss_mb=round(peak_mb, 2),
        rss_mb=round(peak_mb - 0.5, 2),
        power_w=round(power_w, 3),
        energy_mj_per_inference=round(power_w * figures["mean_ms"], 4),
        power_source="estimated:profile",
        power_estimated=True,
        **figures,
    )


def derived_event_id(base: str, suffix: str) -> str:
    """`base-suffix`, hashed down to the protocol's 64 characters when longer (as the daemon)."""
    text = f"{base}-{suffix}"
    if len(text) <= 64:
        return text
    return f"{hashlib.sha256(base.encode()).hexdigest()[:40]}-{suffix}"[:64]


def default_profiles() -> list[str]:
    """Every profile that runs the agent (not MCUs), sorted by id."""
    return [p.id for p in firmware_profiles.load_all().values() if p.runs_agent]


# =========================================================================== counters & state


@dataclass
class SimCounters:
    """What the simulation counted since start; rejected input is counted, never silent."""

    connected: int = 0  # clients connected right now
    connects: int = 0  # successful CONNACKs, reconnects included
    connect_failures: int = 0  # refused TCP connects and refused CONNACKs
    activated: int = 0  # updates that reached `active` (not "already in desired state")
    failed: int = 0  # updates that ended `failed` (error event sent)
    already_in_state: int = 0  # desired states the device already satisfied
    bytes_received: int = 0  # chunk payload bytes, duplicates and dropped ones included
    chunks_received: int = 0
    chunks_accepted: int = 0  # new chunks whose sha256 matched the manifest
    chunks_rejected: int = 0  # chunks with a wrong length or digest
    chunks_dropped: int = 0  # chunks lost on purpose by the drop fault
    needs_sent: int = 0
    events_sent: int = 0
    benchmarks_sent: int = 0
    commands_handled: int = 0
    commands_repeated: int = 0  # a command id seen before: ignored
    stale_ignored: int = 0  # desired generations <= the applied one
    rejected_messages: int = 0  # messages that broke the protocol
    artifacts_verified: int = 0  # whole-file sha256 computations (once per artifact)
    files_verified: int = 0  # agents whose downloaded model passed the whole-file check
    errors: int = 0  # bugs caught by the loop's guards (should stay 0)


class _Assembly:
    """One artifact assembled once per process from the chunks any simulated agent verified.

    Once its whole-file digest is known the bytes are dropped and only the digest is kept: any
    later assembly of the same manifest would consist of the same verified chunks.
    """

    def __init__(self, manifest: Manifest) -> None:
        """A sparse temp file of the artifact's size (page cache, not RSS, holds the bytes)."""
        self.manifest = manifest
        # Closed by close() once the digest is known or the last user gave up.
        self.file = tempfile.TemporaryFile(prefix="edgefleet-sim-")  # noqa: SIM115
        self.file.truncate(manifest.size)
        self.have = bytearray(manifest.chunk_count)
        self.users = 0
        self.digest: str | None = None

    def put(self, index: int, data: bytes) -> None:
        """Write a verified chunk the first time any agent has it (not once the digest is known)."""
        if self.digest is None and not self.have[index]:
            os.pwrite(self.file.fileno(), data, index * self.manifest.chunk_size)
            self.have[index] = 1

    def verify(self) -> str:
        """The whole file's sha256, computed once; the temp file is closed afterwards."""
        if self.digest is None:
            digest = hashlib.sha256()
            self.file.seek(0)
            while block := self.file.read(MIB):
                digest.update(block)
            self.digest = digest.hexdigest()
            self.close()
        return self.digest

    def close(self) -> None:
        """Release the temp file."""
        self.file.close()


class _Update:
    """One desired generation being applied by one agent: chunk bitmaps, never the bytes."""

    __slots__ = (
        "assembly",
        "blob",
        "deadline",
        "desired",
        "fetched",
        "have",
        "missing",
        "model_manifest",
        "offline_done",
        "prefix",
        "quiet_since",
        "sha",
        "waiting_manifest",
    )

    def __init__(self, desired: Desired) -> None:
        """Nothing known yet: the model's manifest is the first thing to wait for."""
        assert desired.artifact is not None
        self.desired = desired
        self.sha = desired.artifact.sha256
        self.deadline = 0.0
        self.waiting_manifest: str | None = None
        self.model_manifest: Manifest | None = None
        # The blob whose chunks are arriving (the model, then its golden), and its bitmap.
        self.blob: Manifest | None = None
        self.prefix = ""
        self.have = bytearray()
        self.missing = 0
        self.assembly: _Assembly | None = None
        self.fetched: list[_Assembly] = []
        self.quiet_since = time.monotonic()
        self.offline_done = False


# =========================================================================== one simulated agent


class SimAgent:
    """One simulated device: its paho client plus the daemon's update state machine, in memory."""

    __slots__ = (
        "applied_generation",
        "backoff",
        "base",
        "client",
        "connected",
        "connecting",
        "current",
        "detail",
        "device_id",
        "down_until",
        "faults",
        "fd",
        "latest_generation",
        "models",
        "pending_crash",
        "previous",
        "profile",
        "reconnect_pending",
        "rng",
        "seen_commands",
        "sim",
        "state",
        "update",
        "write_registered",
    )

    def __init__(
        self, sim: Simulation, device_id: str, profile: firmware_profiles.Profile, faults: Faults
    ) -> None:
        """Build the client (not connected) and an empty state: no model, idle."""
        self.sim = sim
        self.device_id = device_id
        self.profile = profile
        self.faults = faults
        self.base = f"{sim.topics.root}/devices/{device_id}/"
        self.fd: int | None = None
        self.write_registered = False
        self.connected = False
        self.connecting: float | None = None
        self.backoff = RECONNECT_MIN_S
        self.down_until = 0.0
        self.reconnect_pending = False
        # The model store: sha -> (size, golden sha); like the daemon's, current + previous only.
        self.models: dict[str, tuple[int, str | None]] = {}
        self.current: str | None = None
        self.previous: str | None = None
        self.state = "idle"
        self.detail = ""
        self.applied_generation = 0
        self.latest_generation = 0
        self.seen_commands: set[str] | None = None
        self.update: _Update | None = None
        self.pending_crash: Desired | None = None
        self.rng: random.Random | None = None
        self.client = sim.new_client(self)

    # ----------------------------------------------------------------- output
    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS1 publish, flushed at the end of this loop turn."""
        self.client.publish(topic, payload, qos=1, retain=retain)
        self.sim.touch(self)

    def subscribe(self, *topics: str) -> None:
        """QoS1 subscriptions."""
        self.client.subscribe([(t, 1) for t in topics])
        self.sim.touch(self)

    def unsubscribe(self, *topics: str) -> None:
        """Drop subscriptions (nothing to do while offline: the session is clean)."""
        if self.connected:
            self.client.unsubscribe(list(topics))
            self.sim.touch(self)

    def status(self, *, online: bool) -> Status:
        """Current status message (the offline variant is the last will)."""
        return Status(
            device_id=self.device_id,
            online=online,
            state=self.state,  # type: ignore[arg-type]
            model_sha256=self.current,
            previous_sha256=self.previous,
            generation=self.applied_generation,
            detail=self.detail[:500],
        )

    def publish_status(self) -> None:
        """Publish the retained online status."""
        self.publish(self.base + "status", dump(self.status(online=True)), retain=True)

    def emit(
        self,
        kind: str,
        message: str,
        *,
        event_id: str | None = None,
        desired: Desired | None = None,
        stage: str | None = None,
        benchmark: BenchmarkReport | None = None,
    ) -> None:
        """Publish an event; ids are the daemon's (g<generation>-<suffix>, command ids)."""
        event = Event(
            device_id=self.device_id,
            event_id=event_id or uuid.uuid4().hex,
            kind=kind,  # type: ignore[arg-type]
            message=message[:4000],
            deployment_id=desired.deployment_id if desired else None,
            generation=desired.generation if desired else None,
            state=self.state,  # type: ignore[arg-type]
            stage=stage,  # type: ignore[arg-type]
            model_sha256=self.current,
            benchmark=benchmark,
        )
        self.publish(self.base + "events", dump(event))
        self.sim.counters.events_sent += 1

    def announce(self) -> None:
        """Hello (facts from the profile) and the retained status, as on every connect."""
        hello = Hello(
            device_id=self.device_id,
            agent_version=AGENT_VERSION,
            facts=self.sim.facts_for(self.profile),
            profile=self.profile.id,
        )
        self.publish(self.base + "hello", dump(hello))
        self.publish_status()

    # ----------------------------------------------------------------- input
    def on_connected(self) -> None:
        """Report a crash from before, (re)subscribe, announce, resume a download."""
        if self.pending_crash is not None:
            desired, self.pending_crash = self.pending_crash, None
            reason = "self-test failed: model crashed the self-test (signal 11)"
            self._failed(desired, "self-testing", reason)
        topics = [self.base + "desired", self.base + "cmd"]
        upd = self.update
        if upd is not None and upd.waiting_manifest:
            topics.append(self.sim.topics.manifest(upd.waiting_manifest))
        if upd is not None and upd.prefix:
            topics.append(upd.prefix + "+")
        self.subscribe(*topics)
        self.announce()
        if upd is not None and upd.prefix and upd.missing:
            self._send_need(upd)  # resume from the bitmap: ask only for the gaps

    def on_message(self, topic: str, payload: bytes) -> None:
        """Route one message; bad input is rejected, counted and reported, never fatal."""
        upd = self.update
        if upd is not None and upd.prefix and topic.startswith(upd.prefix):
            self._on_chunk(upd, topic, payload)
            return
        try:
            parsed = self.sim.topics.parse(topic)
            if parsed.channel == "chunks":  # a late chunk of a finished or abandoned download
                self.sim.counters.bytes_received += len(payload)
                self.sim.counters.chunks_received += 1
            elif parsed.channel == "manifest":
                if not payload:
                    return  # a cleared retained manifest
                manifest = self.sim.parse_manifest(payload)
                if manifest.sha256 != parsed.ident:
                    raise ProtocolError("$.sha256: does not match the manifest topic")
                self._on_manifest(manifest)
            elif parsed.channel == "desired":
                self._on_desired(parse(payload, Desired))
            elif parsed.channel == "cmd":
                self._on_command(parse(payload, Command))
        except ProtocolError as exc:
            self.sim.counters.rejected_messages += 1
            log.warning("%s rejected message on %s: %s", self.device_id, topic, exc)
            self.emit("rejected", f"rejected message on {topic}: {exc}")

    # ----------------------------------------------------------------- desired state
    def _on_desired(self, desired: Desired) -> None:
        """Follow the daemon: ignore stale generations, short-cut a model already active."""
        self.latest_generation = max(self.latest_generation, desired.generation)
        upd = self.update
        if upd is not None:
            if desired.generation <= upd.desired.generation:
                return  # the retained copy again (reconnect) or an older one: keep going
            self._abandon(upd)  # superseded by a newer generation
        if desired.generation <= self.applied_generation:
            self.sim.counters.stale_ignored += 1
            self.publish_status()
            return
        artifact = desired.artifact
        if artifact is None or artifact.sha256 == self.current:
            self.state = "active" if self.current else "idle"
            self.applied_generation = desired.generation
            self.detail = "already in desired state"
            self.publish_status()
            self.sim.counters.already_in_state += 1
            if self.current:
                self._activated(desired)
            else:
                gen = desired.generation
                self.emit("update", self.detail, event_id=f"g{gen}-idle", desired=desired)
            return
        upd = self.update = _Update(desired)
        upd.deadline = time.monotonic() + self.sim.fetch_timeout_s
        self._step(upd, "fetching")
        self._wait_manifest(upd, upd.sha)
        self.sim.call_at(upd.deadline, lambda: self._deadline(upd))

    def _wait_manifest(self, upd: _Update, sha: str) -> None:
        """Subscribe the retained manifest of a blob (model or golden) and wait for it."""
        upd.waiting_manifest = sha
        self.subscribe(self.sim.topics.manifest(sha))

    def _on_manifest(self, manifest: Manifest) -> None:
        """The manifest awaited: check it, then fetch what the store lacks."""
        upd = self.update
        if upd is None or upd.waiting_manifest != manifest.sha256:
            return
        upd.waiting_manifest = None
        self.unsubscribe(self.sim.topics.manifest(manifest.sha256))
        if manifest.expires is not None and manifest.expires < time.time():
            self._fail(upd, "fetching", f"manifest for {manifest.sha256[:12]} expired")
            return
        if manifest.sha256 == upd.sha:
            assert upd.desired.artifact is not None
            if manifest.size != upd.desired.artifact.size:
                size = upd.desired.artifact.size
                self._fail(upd, "fetching", f"manifest size {manifest.size} != desired size {size}")
                return
            upd.model_manifest = manifest
            if manifest.sha256 not in self.models:
                self._fetch_blob(upd, manifest)
                return
        else:
            golden = upd.model_manifest.golden if upd.model_manifest else None
            if golden is not None and manifest.size != golden.size:
                reason = f"golden manifest size {manifest.size} != referenced size {golden.size}"
                self._fail(upd, "fetching", reason)
                return
            self._fetch_blob(upd, manifest)
            return
        self._next_blob(upd)

    def _next_blob(self, upd: _Update) -> None:
        """After the model: its golden blob when the store lacks it, else verify."""
        assert upd.model_manifest is not None
        golden = upd.model_manifest.golden
        stored = self.models.get(upd.sha)
        fetched = {a.manifest.sha256 for a in upd.fetched}
        has_golden = stored is not None and stored[1] == (golden.sha256 if golden else None)
        if golden is not None and not has_golden and golden.sha256 not in fetched:
            self._wait_manifest(upd, golden.sha256)
            return
        self._downloaded(upd)

    def _fetch_blob(self, upd: _Update, manifest: Manifest) -> None:
        """Subscribe a blob's chunks; the broker delivers the retained ones, Need repairs gaps."""
        upd.blob = manifest
        upd.have = bytearray(manifest.chunk_count)
        upd.missing = manifest.chunk_count
        upd.assembly = self.sim.assembly_for(manifest)
        upd.prefix = f"{self.sim.topics.root}/artifacts/{manifest.sha256}/chunks/"
        self.subscribe(upd.prefix + "+")
        upd.quiet_since = time.monotonic()
        self._arm_repair(upd)
        self._maybe_go_offline(upd)

    def _on_chunk(self, upd: _Update, topic: str, payload: bytes) -> None:
        """Verify one chunk's length and sha256 against the manifest, then set its bit."""
        if not payload:
            return  # the controller cleared a retained chunk
        counters = self.sim.counters
        counters.bytes_received += len(payload)
        counters.chunks_received += 1
        blob = upd.blob
        tail = topic[len(upd.prefix) :]
        if blob is None or not tail.isdigit():
            counters.rejected_messages += 1
            return
        index = int(tail)
        if index >= blob.chunk_count or upd.have[index]:
            return  # a duplicate (the daemon hashes it before noticing; not worth simulating)
        if self.rng is not None and self.rng.random() < self.faults.drop:
            counters.chunks_dropped += 1
            return
        # Hashed inline: a hashing thread was measured slower here (GIL hand-offs on 2 cores).
        if len(payload) != blob.chunk_length(index) or (
            hashlib.sha256(payload).hexdigest() != blob.chunk_sha256[index]
        ):
            counters.chunks_rejected += 1
            return
        upd.have[index] = 1
        upd.missing -= 1
        upd.quiet_since = time.monotonic()
        counters.chunks_accepted += 1
        assert upd.assembly is not None
        upd.assembly.put(index, payload)
        if upd.missing:
            self._maybe_go_offline(upd)
            return
        self.unsubscribe(upd.prefix + "+")
        upd.fetched.append(upd.assembly)
        upd.assembly, upd.blob, upd.prefix = None, None, ""
        self._next_blob(upd)

    def _send_need(self, upd: _Update) -> None:
        """Ask for every chunk still missing (the controller coalesces requests)."""
        assert upd.blob is not None
        missing = tuple(i for i, bit in enumerate(upd.have) if not bit)
        need = Need(device_id=self.device_id, chunks=missing)
        self.publish(self.sim.topics.need(upd.blob.sha256), dump(need))
        self.sim.counters.needs_sent += 1
        upd.quiet_since = time.monotonic()

    def _arm_repair(self, upd: _Update) -> None:
        """Check for silence one repair interval after the last chunk or request."""
        blob = upd.blob
        when = upd.quiet_since + self.sim.repair_interval_s
        self.sim.call_at(when, lambda: self._repair(upd, blob))

    def _repair(self, upd: _Update, blob: Manifest | None) -> None:
        """After a repair interval without progress, ask again for the gaps (daemon: fetch)."""
        if self.update is not upd or upd.blob is not blob or not upd.prefix:
            return
        now = time.monotonic()
        if now - upd.quiet_since >= self.sim.repair_interval_s:
            if self.connected:
                self._send_need(upd)
            else:
                upd.quiet_since = now  # offline: the reconnect asks for the gaps
        self._arm_repair(upd)

    def _deadline(self, upd: _Update) -> None:
        """The fetch deadline passed: fail the way the daemon words it."""
        if self.update is not upd:
            return
        if upd.waiting_manifest:
            self._fail(upd, "fetching", f"manifest for {upd.waiting_manifest[:12]} never arrived")
        elif upd.blob is not None:
            sha, total = upd.blob.sha256[:12], upd.blob.chunk_count
            reason = f"download of {sha} timed out: {upd.missing} of {total} chunks missing"
            self._fail(upd, "fetching", reason)

    def _maybe_go_offline(self, upd: _Update) -> None:
        """offline fault: drop the link once half the model is in (at once for one chunk)."""
        blob = upd.blob
        if not self.faults.offline_s or upd.offline_done or blob is None or blob.sha256 != upd.sha:
            return
        if blob.chunk_count - upd.missing >= blob.chunk_count // 2:
            upd.offline_done = True
            self.sim.drop_connection(self, self.faults.offline_s)

    def _downloaded(self, upd: _Update) -> None:
        """Everything fetched: verify whole files (once per process), then self-test."""
        self._step(upd, "verifying")
        for assembly in upd.fetched:
            actual = self.sim.verify(assembly)
            if actual != assembly.manifest.sha256:
                what = "assembled" if assembly.manifest.sha256 == upd.sha else "golden"
                self._fail(
                    upd, "verifying", f"verification failed: {what} file has sha256 {actual}"
                )
                return
        if any(a.manifest.sha256 == upd.sha for a in upd.fetched):
            self.sim.counters.files_verified += 1
        self._release_fetched(upd)
        self._step(upd, "staged")
        self._step(upd, "self-testing")
        if self.faults.crash:
            self.update = None
            self.pending_crash = upd.desired
            self.sim.drop_connection(self, CRASH_RESTART_S)
            return
        self._selftest(upd)

    def _selftest(self, upd: _Update) -> None:
        """Judge synthesized figures like the real self-test, then activate."""
        desired = upd.desired
        manifest = upd.model_manifest
        assert manifest is not None
        key = f"{self.sim.seed}:{self.device_id}:{upd.sha}"
        latency, peak = synth_figures(self.profile, manifest.size, key, self.faults.slow)
        reason = ""
        if self.faults.nan:
            reason = "output 0 is not finite (NaN or Inf)"
        elif desired.latency_budget_ms and latency > desired.latency_budget_ms:
            reason = f"latency {latency:.3f} ms over budget {desired.latency_budget_ms:.3f} ms"
        elif desired.memory_budget_mb and peak > desired.memory_budget_mb:
            reason = f"peak RSS {peak:.1f} MB over budget {desired.memory_budget_mb:.1f} MB"
        if reason:
            self._fail(upd, "self-testing", f"self-test failed: {reason}")
            return
        golden = manifest.golden.sha256 if manifest.golden else None
        self.models[upd.sha] = (manifest.size, golden)
        if self.current != upd.sha:
            self.previous, self.current = self.current, upd.sha
        self.models = {s: v for s, v in self.models.items() if s in (self.current, self.previous)}
        self.update = None
        self.state = "active"
        self.applied_generation = desired.generation
        self.detail = (
            f"self-test {latency:.2f} ms, peak RSS {peak:.1f} MB; "
            f"simulated: figures synthesized from profile {self.profile.id}"
        )
        self.publish_status()
        self.sim.counters.activated += 1
        self._activated(desired)

    def _activated(self, desired: Desired) -> None:
        """The terminal update event and the benchmark, as the daemon's _report_outcome."""
        gen = desired.generation
        message = f"activated ({self.detail})" if self.detail else "activated"
        self.emit("update", message, event_id=f"g{gen}-active", desired=desired)
        self._benchmark(desired.benchmark_runs, desired.benchmark_warmup, desired)

    def _step(self, upd: _Update, state: str) -> None:
        """One transition: status, then an update event g<generation>-<state>."""
        self.state = state
        self.publish_status()
        gen = upd.desired.generation
        self.emit("update", state, event_id=f"g{gen}-{state}", desired=upd.desired)

    def _fail(self, upd: _Update, stage: str, reason: str) -> None:
        """End an update as failed; the previous model keeps serving."""
        self._abandon(upd)
        self._failed(upd.desired, stage, reason)

    def _failed(self, desired: Desired, stage: str, reason: str) -> None:
        """Record and report a failed generation (stage = the update state it failed in)."""
        log.info("%s: generation %d failed: %s", self.device_id, desired.generation, reason)
        self.state = "failed"
        self.applied_generation = desired.generation
        self.detail = reason
        self.publish_status()
        gen = desired.generation
        self.emit("error", reason, event_id=f"g{gen}-failed", desired=desired, stage=stage)
        self.sim.counters.failed += 1

    def _abandon(self, upd: _Update) -> None:
        """Stop an update: unsubscribe its topics and release the shared assemblies."""
        if self.update is upd:
            self.update = None
        if upd.waiting_manifest:
            self.unsubscribe(self.sim.topics.manifest(upd.waiting_manifest))
            upd.waiting_manifest = None
        if upd.prefix:
            self.unsubscribe(upd.prefix + "+")
            upd.prefix = ""
        if upd.assembly is not None:
            upd.fetched.append(upd.assembly)
            upd.assembly = None
        self._release_fetched(upd)

    def _release_fetched(self, upd: _Update) -> None:
        """Hand back this update's references to shared assemblies."""
        for assembly in upd.fetched:
            self.sim.release(assembly)
        upd.fetched = []

    # ----------------------------------------------------------------- commands
    def _on_command(self, command: Command) -> None:
        """Run a one-shot command once per command id (daemon: _run_command)."""
        if self.seen_commands is None:
            self.seen_commands = set()
        if command.command_id in self.seen_commands:
            self.sim.counters.commands_repeated += 1
            return
        self.seen_commands.add(command.command_id)
        if command.action == "benchmark":
            event_id = derived_event_id(command.command_id, "bench")
            self._benchmark(command.runs, command.warmup, None, event_id)
        elif command.action == "resend_status":
            self.announce()
        elif command.action == "rollback":
            if self.previous is None:
                self.emit(
                    "error",
                    "rollback refused: no previous model to roll back to",
                    event_id=derived_event_id(command.command_id, "error"),
                )
            else:
                self.current, self.previous = self.previous, self.current
                self.state = "rolled_back"
                self.detail = f"rolled back by {command.command_id}"
            self.publish_status()
        self.sim.counters.commands_handled += 1
        self.emit("command", f"{command.action} done", event_id=command.command_id)

    def _benchmark(
        self, runs: int, warmup: int, desired: Desired | None, event_id: str | None = None
    ) -> None:
        """A benchmark event for the serving model, synthesized from the profile."""
        if desired is not None:
            event_id = f"g{desired.generation}-benchmark"
        if self.current is None:
            message = "benchmark requested but no model is active"
            self.emit("error", message, desired=desired)
            return
        size = self.models[self.current][0]
        key = f"{self.sim.seed}:{self.device_id}:{self.current}"
        p50, peak = synth_figures(self.profile, size, key, self.faults.slow)
        report = synth_report(self.profile, self.current, size, p50, peak, runs=runs, warmup=warmup)
        self.emit(
            "benchmark", "benchmark finished", event_id=event_id, desired=desired, benchmark=report
        )
        self.sim.counters.benchmarks_sent += 1

    def describe(self) -> dict[str, Any]:
        """This device's state for snapshots and test assertions."""
        return {
            "device_id": self.device_id,
            "profile": self.profile.id,
            "connected": self.connected,
            "state": self.state,
            "model_sha256": self.current,
            "previous_sha256": self.previous,
            "generation": self.applied_generation,
            "detail": self.detail,
            "faults": self.faults.names(),
        }


# =========================================================================== the simulation


class Simulation:
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
    ) -> None:
        """Resolve profiles and faults and build the clients; nothing connects before start()."""
        if not 1 <= devices <= MAX_DEVICES:
            raise SimulationError(f"devices must be in 1..{MAX_DEVICES}, got {devices}")
        if not hasattr(select, "epoll"):
            raise SimulationError("edgefleet simulate needs Linux (select.epoll)")
        self.host, self.port = parse_broker_url(broker_url)
        self.topics = Topics(topic_root)
        self.seed = seed
        self.fetch_timeout_s = fetch_timeout_s
        self.repair_interval_s = repair_interval_s
        self.keepalive_s = keepalive_s
        self.counters = SimCounters()
        self._rss_before = psutil.Process().memory_info().rss
        chosen = _resolve_profiles(profiles)
        width = max(4, len(str(devices - 1)))
        ids = [f"{prefix}-{i:0{width}d}" for i in range(devices)]
        try:
            validate_device_id(ids[-1])
        except ProtocolError as exc:
            raise SimulationError(f"bad --prefix {prefix!r}: {exc}") from None
        self._facts: dict[str, DeviceFacts] = {}
        self._assemblies: dict[str, _Assembly] = {}
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
        fault_map = assign_faults(faults, devices, seed)
        self.agents = [
            SimAgent(self, ids[i], chosen[i % len(chosen)], fault_map.get(i, NO_FAULTS))
            for i in range(devices)
        ]
        for agent in self.agents:
            if agent.faults.drop:
                agent.rng = random.Random(f"{seed}:drop:{agent.device_id}")
        self._by_id = {agent.device_id: agent for agent in self.agents}

    # ----------------------------------------------------------------- public API
    @property
    def device_ids(self) -> list[str]:
        """Every simulated device id, in index order."""
        return [agent.device_id for agent in self.agents]

    def devices_with(self, fault: str) -> list[str]:
        """Ids of devices carrying a fault kind (slow, crash, nan, offline, drop)."""
        if fault not in FAULT_KINDS:
            raise SimulationError(f"unknown fault {fault!r} ({', '.join(FAULT_KINDS)})")
        attr = {"offline": "offline_s"}.get(fault, fault)
        empty = getattr(NO_FAULTS, attr)
        return [a.device_id for a in self.agents if getattr(a.faults, attr) != empty]

    def set_faults(self, device_ids: Sequence[str], faults: Faults) -> None:
        """Give devices other faults from now on (e.g. after a clean first rollout)."""
        for device_id in device_ids:
            agent = self._by_id[device_id]
            agent.faults = faults
            agent.rng = random.Random(f"{self.seed}:drop:{device_id}") if faults.drop else None

    def device(self, device_id: str) -> dict[str, Any]:
        """One device's state (see SimAgent.describe)."""
        return self._by_id[device_id].describe()

    def start(self) -> None:
        """Queue every client for connecting and start the loop thread."""
        self._started = time.monotonic()
        self._connect_queue.extend(self.agents)
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
            "states": dict(sorted(Counter(a.state for a in agents).items())),
            "faults": dict(sorted(faults.items())),
            "rss_mb": round(rss / MIB, 1),
            "rss_per_device_kb": round((rss - self._rss_before) / len(agents) / 1024, 2),
        }

    # ----------------------------------------------------------------- shared helpers
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

    def assembly_for(self, manifest: Manifest) -> _Assembly:
        """The process-wide assembly of an artifact, shared by every agent fetching it."""
        assembly = self._assemblies.get(manifest.sha256)
        if assembly is None or assembly.manifest.chunk_sha256 != manifest.chunk_sha256:
            assembly = self._assemblies[manifest.sha256] = _Assembly(manifest)
        assembly.users += 1
        return assembly

    def release(self, assembly: _Assembly) -> None:
        """One agent is done with an assembly; an unverified one goes with its last user."""
        assembly.users -= 1
        if assembly.users <= 0 and assembly.digest is None:
            if self._assemblies.get(assembly.manifest.sha256) is assembly:
                del self._assemblies[assembly.manifest.sha256]
            assembly.close()

    def verify(self, assembly: _Assembly) -> str:
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
                    sock.shutdown(socket.SHUT_RDWR)  # EOF → loop_read → on_disconnect

        self.call_at(0.0, drop)

    # ----------------------------------------------------------------- paho plumbing
    def new_client(self, agent: SimAgent) -> paho.Client:
        """A paho client for an agent: MQTT 3.1.1, clean session, driven by our epoll loop."""
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=agent.device_id,
            protocol=paho.MQTTv311,
            clean_session=True,
            userdata=agent,
        )
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.max_queued_messages_set(0)  # keep QoS1 messages across a reconnect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.connect_async(self.host, self.port, keepalive=self.keepalive_s)
        return client

    def _on_socket_open(self, client: paho.Client, agent: SimAgent, sock: Any) -> None:
        """Watch a new socket for reads."""
        agent.fd = sock.fileno()
        agent.write_registered = False
        self._by_fd[agent.fd] = agent
        self._ep.register(agent.fd, select.EPOLLIN)

    def _on_socket_close(self, client: paho.Client, agent: SimAgent, sock: Any) -> None:
        """Stop watching a socket paho is about to close."""
        if agent.fd is not None:
            self._by_fd.pop(agent.fd, None)
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(agent.fd)
            agent.fd = None

    def _on_connect(
        self, client: paho.Client, agent: SimAgent, flags: Any, reason: Any, props: Any
    ) -> None:
        """CONNACK: count it and let the agent subscribe and announce itself."""
        self._connect_done(agent)
        if reason.is_failure:
            self.counters.connect_failures += 1
            log.warning("%s: broker refused the connection: %s", agent.device_id, reason)
            return
        agent.connected = True
        agent.backoff = RECONNECT_MIN_S
        self.counters.connected += 1
        self.counters.connects += 1
        self._guard(agent, agent.on_connected)

    def _on_disconnect(
        self, client: paho.Client, agent: SimAgent, flags: Any, reason: Any, props: Any
    ) -> None:
        """Lost or closed: schedule a reconnect with backoff (after a fault's down time)."""
        self._connect_done(agent)
        was_connected = agent.connected
        if was_connected:
            agent.connected = False
            self.counters.connected -= 1
        if self._stopping:
            return
        if was_connected:
            delay = RECONNECT_MIN_S
        else:
            delay = agent.backoff
            agent.backoff = min(agent.backoff * 2, RECONNECT_MAX_S)
        self._schedule_connect(agent, delay)

    def _on_message(self, client: paho.Client, agent: SimAgent, message: paho.MQTTMessage) -> None:
        """Hand a message to its agent."""
        self._guard(agent, agent.on_message, message.topic, message.payload)

    def _guard(self, agent: SimAgent, func: Callable[..., None], *args: Any) -> None:
        """Run agent code; a bug hits one message of one agent, not the loop."""
        try:
            func(*args)
        except Exception:
            self.counters.errors += 1
            log.exception("%s: simulated agent failed", agent.device_id)
        self._dirty.add(agent)

    def _connect_done(self, agent: SimAgent) -> None:
        """The connect attempt of an agent ended (CONNACK or failure)."""
        if agent.connecting is not None:
            agent.connecting = None
            self._connecting -= 1

    def _schedule_connect(self, agent: SimAgent, delay: float) -> None:
        """Queue a (re)connect after `delay` ± jitter, never before a fault's down time ends."""
        if agent.reconnect_pending:
            return
        agent.reconnect_pending = True
        jitter = 1.0 + random.uniform(-RECONNECT_JITTER, RECONNECT_JITTER)
        when = max(time.monotonic() + delay * jitter, agent.down_until)
        self.call_at(when, lambda: self._connect_queue.append(agent))

    def _start_connects(self) -> None:
        """Open connections from the queue while fewer than MAX_CONNECTING await CONNACK."""
        while self._connect_queue and self._connecting < MAX_CONNECTING and not self._stopping:
            agent = self._connect_queue.popleft()
            agent.reconnect_pending = False
            client = agent.client
            # The will carries the state at connect time, like the daemon's.
            client.will_set(
                agent.base + "status", dump(agent.status(online=False)), qos=1, retain=True
            )
            try:
                client.reconnect()
            except OSError as exc:
                self.counters.connect_failures += 1
                log.debug("%s: connect failed: %s", agent.device_id, exc)
                delay = agent.backoff
                agent.backoff = min(agent.backoff * 2, RECONNECT_MAX_S)
                self._schedule_connect(agent, delay)
                continue
            agent.connecting = time.monotonic()
            self._connecting += 1
            self._dirty.add(agent)

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
        """Keepalive for every connected client; drop connects that never got a CONNACK."""
        now = time.monotonic()
        for agent in self.agents:
            if agent.fd is None:
                continue
            if agent.connecting is not None and now - agent.connecting > CONNACK_TIMEOUT_S:
                self.drop_connection(agent, 0.0)
            agent.client.loop_misc()
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


# =========================================================================== CLI


def _progress_line(snap: dict[str, Any]) -> str:
    """One-line summary for the periodic progress output."""
    return (
        f"[{snap['elapsed_s']:7.1f}s] connected {snap['connected']}/{snap['devices']}  "
        f"activated {snap['activated']}  failed {snap['failed']}  "
        f"received {snap['bytes_received'] / MIB:.1f} MiB  "
        f"rejected chunks {snap['chunks_rejected']}  rss {snap['rss_mb']} MB"
    )


def simulate_command(
    devices: Annotated[
        int, typer.Option("--devices", "-n", min=1, max=MAX_DEVICES, help="simulated agents")
    ],
    broker: Annotated[str, typer.Option("--broker", help="mqtt://host[:port]")] = DEFAULT_BROKER,
    profile: Annotated[
        list[str] | None,
        typer.Option("--profile", "-p", help="profile id, repeatable (round-robin)"),
    ] = None,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            "--fault",
            help="KIND[=VALUE]:COUNT|PERCENT%, repeatable: nan:5%, slow=3:10%, offline=30:2%, "
            "crash:1, drop=0.2:10%",
        ),
    ] = None,
    prefix: Annotated[str, typer.Option(help="device id prefix (ids are PREFIX-NNNN)")] = "sim",
    topic_root: Annotated[str, typer.Option("--topic-root", help="MQTT topic root")] = DEFAULT_ROOT,
    duration: Annotated[
        float | None, typer.Option(min=0.0, help="stop after SECONDS (default: until Ctrl-C)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for fault assignment and figures")] = 0,
    json_out: Annotated[
        bool, typer.Option("--json", help="print the final snapshot as JSON")
    ] = False,
) -> None:
    """Run N simulated agents on the real protocol: one process, one MQTT connection each."""
    try:
        specs = [parse_fault(spec) for spec in fault or []]
        sim = Simulation(
            broker,
            devices,
            profiles=profile,
            faults=specs,
            prefix=prefix,
            topic_root=topic_root,
            seed=seed,
        )
    except (SimulationError, ProtocolError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    sim.start()
    end = None if duration is None else time.monotonic() + duration
    next_progress = time.monotonic() + PROGRESS_INTERVAL_S
    try:
        while end is None or time.monotonic() < end:
            time.sleep(0.1 if end is None else max(0.0, min(0.1, end - time.monotonic())))
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS_INTERVAL_S
                typer.echo(_progress_line(sim.snapshot()), err=True)
    except KeyboardInterrupt:
        typer.echo("interrupted; disconnecting", err=True)
    finally:
        snap = sim.snapshot()  # before stop(): the counts of the run, not of the goodbye
        sim.stop()
    typer.echo(json.dumps(snap, indent=2) if json_out else _progress_line(snap))

"""One simulated agent: the daemon's update state machine in memory, on one paho client."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import firmware_profiles
from agent import __version__ as AGENT_VERSION
from agent.protocol import (
    BenchmarkReport,
    Command,
    Desired,
    Event,
    Hello,
    Manifest,
    Need,
    ProtocolError,
    Status,
    dump,
    parse,
)
from controller.simulate.faults import Faults
from controller.simulate.figures import MIB, derived_event_id, synth_figures, synth_report

if TYPE_CHECKING:
    from controller.simulate.loop import Simulation

# One logger for the whole package, named as before the split (log lines show the name).
log = logging.getLogger("controller.simulate")

# First reconnect delay, as the real agent (agent/mqtt.py); doubles up to RECONNECT_MAX_S.
RECONNECT_MIN_S = 1.0
# How long a simulated agent whose model "crashed the self-test" stays down before restarting.
CRASH_RESTART_S = 2.0

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

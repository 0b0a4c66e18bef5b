"""One simulated agent: the daemon's update flow in memory (states: agent.protocol.AgentState)."""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import firmware_profiles
from agent import __version__ as AGENT_VERSION
from agent.protocol import (
    AgentState,
    BenchmarkReport,
    Command,
    Desired,
    Event,
    Hello,
    ProtocolError,
    Status,
    dump,
    parse,
)
from controller.simulate.download import StoredModel, Update
from controller.simulate.fallback import FallbackSwitch
from controller.simulate.faults import Faults
from controller.simulate.figures import BENCH_THREADS, derived_event_id, synth_figures, synth_report
from controller.simulate.telemetry import DeviceTelemetry

if TYPE_CHECKING:
    from controller.simulate.loop import Simulation

# One logger for the whole package, named as before the split (log lines show the name).
log = logging.getLogger("controller.simulate")

# First reconnect delay, as the real agent (protocol/transport.py); doubles to RECONNECT_MAX_S.
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
    repair_rounds: int = 0  # re-subscriptions of missing chunks (served by the broker)
    repairs_deferred: int = 0  # repair checks put off: bytes still unread in the socket
    events_sent: int = 0
    benchmarks_sent: int = 0
    commands_handled: int = 0
    commands_repeated: int = 0  # a command id seen before: ignored
    stale_ignored: int = 0  # desired generations <= the applied one
    rejected_messages: int = 0  # messages that broke the protocol
    artifacts_verified: int = 0  # whole-file sha256 computations (once per artifact)
    files_verified: int = 0  # agents whose downloaded model passed the whole-file check
    errors: int = 0  # bugs caught by the loop's guards (should stay 0)
    telemetry_records: int = 0  # telemetry records taken (one per device per interval)
    telemetry_sent: int = 0  # records published for the first time
    telemetry_acked: int = 0  # records whose publish the broker acknowledged (PUBACK)
    telemetry_resent: int = 0  # records published again to answer resend_telemetry
    telemetry_dropped: int = 0  # records the full spool dropped (drop_oldest)
    telemetry_lost: int = 0  # records "lost" on purpose by the telemetry-loss fault
    telemetry_unavailable: int = 0  # sequence numbers answered as unavailable
    fallbacks_ready: int = 0  # fallbacks installed and self-tested next to the active model
    fallbacks_failed: int = 0  # fallbacks that could not be fetched or failed their self-test
    fallbacks: int = 0  # switches to the fallback (one `fallback` event each)


# =========================================================================== one simulated agent


class SimAgent(FallbackSwitch):
    """One simulated device: its paho client plus the daemon's update state machine, in memory."""

    __slots__ = (
        "activations",
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
        "telemetry",
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
        # The model store: sha -> size, golden, recipe, threads; current + previous only.
        self.models: dict[str, StoredModel] = {}
        self.current: str | None = None
        self.previous: str | None = None
        self.state: AgentState = AgentState.IDLE
        self.detail = ""
        self.applied_generation = 0
        self.latest_generation = 0
        self.activations = 0  # installs that reached `active` (a second one = a double update)
        self.seen_commands: set[str] | None = None
        self.update: Update | None = None
        self.fallback = None
        self.pending_crash: Desired | None = None
        self.rng: random.Random | None = None
        self.telemetry = DeviceTelemetry(self) if sim.telemetry is not None else None
        self.client = sim.new_client(self)

    # ----------------------------------------------------------------- output
    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """QoS1 publish, flushed at the end of this loop turn; returns the packet id (mid)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self.sim.touch(self)
        return info.mid

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
            state=self.state,
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
        stage: AgentState | None = None,
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
            state=self.state,
            stage=stage,
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
            self._failed(desired, AgentState.SELF_TESTING, reason)
        topics = [self.base + "desired", self.base + "cmd"]
        upd = self.update
        if upd is not None and upd.waiting_manifest:
            topics.append(self.sim.topics.manifest(upd.waiting_manifest))
        self.subscribe(*topics)
        self.announce()
        if upd is not None and upd.prefix and upd.missing:
            self._resume(upd)  # from the bitmap: re-subscribe only the gaps, after a spread
        if self.telemetry is not None:
            self.telemetry.flush()  # records spooled while offline

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
        self.fallback = None  # a new desired state decides; a watch of the old one ends
        artifact = desired.artifact
        if artifact is None or (artifact.sha256 == self.current and self._same_threads(desired)):
            self.state = AgentState.ACTIVE if self.current else AgentState.IDLE
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
        upd = self.update = Update(desired)
        upd.deadline = time.monotonic() + self.sim.fetch_timeout_s
        self._step(upd, AgentState.FETCHING)
        self._wait_manifest(upd, upd.sha)
        self.sim.call_at(upd.deadline, lambda: self._deadline(upd))

    def _same_threads(self, desired: Desired) -> bool:
        """Whether the current model already runs with the desired threads (None = default)."""
        if self.current is None or self.current not in self.models:
            return True
        running = self.models[self.current].threads or BENCH_THREADS
        return running == (desired.threads or BENCH_THREADS)

    def _downloaded(self, upd: Update) -> None:
        """Everything fetched: verify whole files (once per process), then self-test."""
        if upd.fallback is None:
            self._step(upd, AgentState.VERIFYING)
        for assembly in upd.fetched:
            actual = self.sim.verify(assembly)
            if actual != assembly.manifest.sha256:
                what = "assembled" if assembly.manifest.sha256 == upd.sha else "golden"
                reason = f"verification failed: {what} file has sha256 {actual}"
                self._fail(upd, AgentState.VERIFYING, reason)
                return
        if upd.fallback is not None:
            self._release_fetched(upd)
            self._fallback_downloaded(upd)
            return
        if any(a.manifest.sha256 == upd.sha for a in upd.fetched):
            self.sim.counters.files_verified += 1
        self._release_fetched(upd)
        self._step(upd, AgentState.STAGED)
        self._step(upd, AgentState.SELF_TESTING)
        if self.faults.crash:
            self.update = None
            self.pending_crash = upd.desired
            self.sim.drop_connection(self, CRASH_RESTART_S)
            return
        self._selftest(upd)

    def _selftest(self, upd: Update) -> None:
        """Judge synthesized figures like the real self-test, then activate."""
        desired = upd.desired
        manifest = upd.model_manifest
        assert manifest is not None
        golden = manifest.golden.sha256 if manifest.golden else None
        entry = StoredModel(manifest.size, golden, manifest.recipe, desired.threads)
        latency, peak = self._figures(upd.sha, entry)
        reason = self._judge(desired, latency, peak)
        if reason:
            self._fail(upd, AgentState.SELF_TESTING, f"self-test failed: {reason}")
            return
        self.update = None
        self.state = AgentState.ACTIVE
        self.applied_generation = desired.generation
        detail = (
            f"self-test {latency:.2f} ms, peak RSS {peak:.1f} MB; "
            f"simulated: figures synthesized from profile {self.profile.id}"
        )
        self._make_current(upd.sha, entry, detail)
        self.sim.counters.activated += 1
        self.activations += 1
        self._took(upd)
        self._activated(desired)

    def _make_current(self, sha: str, entry: StoredModel, detail: str) -> None:
        """Serve `sha` as `entry` says, keep the model before as previous, publish the status."""
        self.models[sha] = entry
        if self.current != sha:
            self.previous, self.current = self.current, sha
        self.models = {s: v for s, v in self.models.items() if s in (self.current, self.previous)}
        self.detail = detail
        self.publish_status()

    def _figures(self, sha: str, entry: StoredModel) -> tuple[float, float]:
        """(p50 ms, peak RSS MB) of a model on this device: profile, recipe, threads, slow."""
        key = f"{self.sim.seed}:{self.device_id}:{sha}"
        speed = self.sim.speed.factor(self.profile, entry.recipe, entry.threads)
        return synth_figures(self.profile, entry.size, key, self.faults.slow * speed)

    def _judge(self, desired: Desired, latency: float, peak: float) -> str:
        """Why a self-test with these figures fails (the daemon's words), or "" when it passes."""
        if self.faults.nan:
            return "output 0 is not finite (NaN or Inf)"
        if desired.latency_budget_ms and latency > desired.latency_budget_ms:
            return f"latency {latency:.3f} ms over budget {desired.latency_budget_ms:.3f} ms"
        if desired.memory_budget_mb and peak > desired.memory_budget_mb:
            return f"peak RSS {peak:.1f} MB over budget {desired.memory_budget_mb:.1f} MB"
        return ""

    def _activated(self, desired: Desired) -> None:
        """The terminal update event and the benchmark, as the daemon's _report_outcome."""
        gen = desired.generation
        message = f"activated ({self.detail})" if self.detail else "activated"
        self.emit("update", message, event_id=f"g{gen}-active", desired=desired)
        self._benchmark(desired.benchmark_runs, desired.benchmark_warmup, desired)
        self._install_fallback(desired)

    def _step(self, upd: Update, state: AgentState) -> None:
        """One transition: status, then an update event g<generation>-<state>."""
        self.state = state
        self.publish_status()
        gen = upd.desired.generation
        self.emit("update", state.value, event_id=f"g{gen}-{state.value}", desired=upd.desired)

    def _fail(self, upd: Update, stage: AgentState, reason: str) -> None:
        """End an update as failed; the previous model keeps serving."""
        self._abandon(upd)
        if upd.fallback is not None:
            self._fallback_failed(upd, reason)  # the primary is active: no failed generation
            return
        self._took(upd)
        self._failed(upd.desired, stage, reason)

    def _failed(self, desired: Desired, stage: AgentState, reason: str) -> None:
        """Record and report a failed generation (stage = the update state it failed in)."""
        log.info("%s: generation %d failed: %s", self.device_id, desired.generation, reason)
        self.state = AgentState.FAILED
        self.applied_generation = desired.generation
        self.detail = reason
        self.publish_status()
        gen = desired.generation
        self.emit("error", reason, event_id=f"g{gen}-failed", desired=desired, stage=stage)
        self.sim.counters.failed += 1

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
        elif command.action == "resend_telemetry":
            if self.telemetry is not None:
                self.telemetry.resend(command.seq_ranges)
        elif command.action == "rollback":
            if self.previous is None:
                self.emit(
                    "error",
                    "rollback refused: no previous model to roll back to",
                    event_id=derived_event_id(command.command_id, "error"),
                )
            else:
                self.current, self.previous = self.previous, self.current
                self.fallback = None  # the watched model no longer serves
                self.state = AgentState.ROLLED_BACK
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
        entry = self.models[self.current]
        p50, peak = self._figures(self.current, entry)
        report = synth_report(
            self.profile,
            self.current,
            entry.size,
            p50,
            peak,
            runs=runs,
            warmup=warmup,
            threads=entry.threads,
        )
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
            "state": self.state.value,
            "model_sha256": self.current,
            "previous_sha256": self.previous,
            "generation": self.applied_generation,
            "activations": self.activations,
            "threads": self.models[self.current].threads if self.current in self.models else None,
            "fallback": self.fallback.sha if self.fallback is not None else None,
            "detail": self.detail,
            "faults": self.faults.names(),
            "telemetry": self.telemetry.describe() if self.telemetry is not None else None,
        }

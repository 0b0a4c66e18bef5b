"""The agent daemon: follows its retained desired state, updates safely, serves and measures."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.facts import device_facts
from agent.fallback import EngageFallback, FallbackSwitch
from agent.fetch import Fetcher
from agent.fsutil import CorruptFileError
from agent.local_services import LocalServices
from agent.memory import release_memory
from agent.power import PowerModel
from agent.protocol import (
    BenchmarkReport,
    Command,
    Desired,
    Event,
    FleetKeys,
    Hello,
    Manifest,
    ProtocolError,
    Status,
    Topics,
    dump,
    parse,
)
from agent.protocol.transport import MqttSession
from agent.runtime import ModelLoadError, load_interpreter, runtime_info
from agent.selftest import run_selftest, tighter_budget
from agent.serving import InferenceError
from agent.staging import ArtifactStager
from agent.state import (
    MAX_SELFTEST_ATTEMPTS,
    RESTORE,
    TERMINAL,
    SeenCommands,
    Superseded,
    UpdateFailed,
    UpdateStateFile,
)
from agent.store import ModelStore
from agent.trust import SecurityRejected, TrustStore

log = logging.getLogger(__name__)

__all__ = ["Agent", "Counters", "Superseded", "UpdateFailed"]

# How long the work thread waits for the broker to acknowledge a terminal event before it
# leaves it marked unsent (re-sent, same event id, on the next connect or start).
REPORT_ACK_WAIT_S = 10.0
# Event ids are 1-64 characters (protocol); longer derived ids are shortened by hashing.
_MAX_EVENT_ID = 64


class ReportOutcome:
    """Work item: send the recorded generation's result if the broker has not acknowledged it."""


WorkItem = Desired | Command | ReportOutcome | EngageFallback


@dataclass
class Counters:
    """What the agent counted since start (rejected input must be visible, not silent)."""

    rejected_messages: int = 0
    reasons: list[str] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        """Count a rejection and keep the last few reasons."""
        self.rejected_messages += 1
        self.reasons = [*self.reasons[-9:], reason]


def derived_event_id(base: str, suffix: str) -> str:
    """`base-suffix`, hashed down to the protocol's 64 characters when longer (stable)."""
    text = f"{base}-{suffix}"
    if len(text) <= _MAX_EVENT_ID:
        return text
    return f"{hashlib.sha256(base.encode()).hexdigest()[:40]}-{suffix}"[:_MAX_EVENT_ID]


class Agent:
    """One device's agent; `run()` blocks until `stop()`."""

    def __init__(self, config: AgentConfig) -> None:
        """Open the model store and saved state; nothing touches the network yet."""
        self.config = config
        self.topics = Topics(config.topic_root)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = ModelStore(config.models_dir)
        self.state = UpdateStateFile(config.data_dir / "update.json")
        self.seen_commands = SeenCommands(config.data_dir / "commands.json")
        self.counters = Counters()
        self.runtime = runtime_info()
        self.power_model = PowerModel(
            idle_w=config.power.idle_w,
            active_w_per_core=config.power.active_w_per_core,
            accelerator_active_w=config.power.accelerator_active_w,
        )
        self._work: queue.Queue[WorkItem] = queue.Queue()
        self._stop = threading.Event()
        self._latest_generation = 0
        self.trust = TrustStore(config.trusted_keys, config.data_dir / "trusted_keys.json")
        # The last desired state refused only because its key was unknown: checked again once a
        # signed key rotation arrives (the retained keys and desired may arrive in either order).
        self._unknown_key_desired: tuple[str, bytes] | None = None
        self.session = MqttSession(
            config.broker,
            config.device_id,
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=(self.topics.status(config.device_id), dump(self._status(online=False))),
            username=config.username,
            password=config.password,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
        )
        self.fetcher = Fetcher(
            self.session,
            self.topics,
            config.device_id,
            config.downloads_dir,
            config.repair_interval_s,
        )
        self.stager = ArtifactStager(self.store, self.fetcher, config.downloads_dir)
        # The inference service, its metrics and telemetry (docs/inference.md, telemetry.md).
        self.local = LocalServices(
            config, self.session, self.topics, self.power_model, self._report_problem
        )
        self.serving = self.local.serving
        self.fallback = FallbackSwitch(
            config=config,
            store=self.store,
            stager=self.stager,
            state=self.state,
            observer=self.local.observer,
            serving_sha=lambda: self.serving.sha256,
            serve=self._serve,
            emit=self._emit,
            publish_status=self._publish_status,
            enqueue=self._work.put,
        )

    # ----------------------------------------------------------------- lifecycle
    def run(self) -> None:
        """Restore, connect, then process desired states and commands until stopped."""
        self.restore()
        self.local.start()
        self.session.start()
        try:
            while not self._stop.is_set():
                try:
                    item = self._work.get(timeout=0.2)
                except queue.Empty:
                    continue
                try:
                    if isinstance(item, Desired):
                        self._apply_desired(item)
                    elif isinstance(item, Command):
                        self._run_command(item)
                    elif isinstance(item, EngageFallback):
                        self.fallback.engage(item)
                    else:
                        self._report_outcome()
                        self.fallback.report()
                except Exception as exc:  # one bad item must not take the agent down
                    log.exception("work item failed")
                    self._internal_error(item, exc)
                release_memory()
        finally:
            self.local.stop()  # the last partial interval is spooled and, if possible, sent
            self.session.publish(
                self.topics.status(self.config.device_id),
                dump(self._status(online=False)),
                retain=True,
                wait_s=2.0,
            )
            self.session.stop()

    def stop(self) -> None:
        """Ask run() to return."""
        self._stop.set()

    def restore(self) -> None:
        """Recover from the saved state (RESTORE table) and load the current model to serve.

        Damaged state files are quarantined and reported, never fatal: a device that cannot
        read its own bookkeeping must still serve and still take the next deployment.
        """
        if not self.trust.enforcing:
            log.warning(
                "signatures not enforced: no trusted_keys configured (development mode); "
                "any desired state or manifest on this device's topics will be followed"
            )
        for problem in (self.state.problem, self.seen_commands.problem, self.trust.problem):
            if problem:
                self._report_problem(problem)
        record = self.state.record
        try:
            self.store.pointers()
        except CorruptFileError:
            hint = record.sha256 if record.state == "active" else None
            self._report_problem(self.store.rebuild_pointers(hint))
        log.info("saved state %s: %s", record.state, RESTORE.get(record.state, "?"))
        if record.state == "self-testing" and record.selftest_attempts >= MAX_SELFTEST_ATTEMPTS:
            reason = f"self-test crashed the agent {record.selftest_attempts} times; giving up"
            self.state.transition(
                "failed",
                applied_generation=record.generation,
                stage="self-testing",
                reported=False,
                detail=reason,
            )
            log.error("%s", reason)  # reported once connected (ReportOutcome)
        elif record.state in ("fetching", "verifying", "staged", "self-testing"):
            # The retained desired state is delivered again on subscribe and drives the resume;
            # the chunk bitmap on disk keeps what was already downloaded.
            self.state.update(detail=f"interrupted in {record.state}; resuming")
        self._load_serving()
        record = self.state.record
        if (
            record.state == "active"
            and record.sha256 is not None
            and record.sha256 != self.serving.sha256
        ):
            # The committed model no longer loads (_load_serving fell back to the previous one).
            reason = f"activated model {record.sha256[:12]} no longer loads; serving the previous"
            if record.reported:
                self.state.transition("rolled_back", detail=reason)
            else:  # its activation never reached the controller: report a failure instead
                self.state.transition("failed", stage="active", reported=False, detail=reason)
        if self.state.problem is not None:
            # A fresh record: follow what the store serves; the retained desired re-drives the rest.
            serving = self.serving.sha256
            self.state.transition(
                "active" if serving else "idle",
                sha256=serving,
                detail="update.json was corrupt and was rebuilt from the model store",
            )
        self.fallback.restore()

    def _report_problem(self, message: str) -> None:
        """Log and report a local problem (queued until connected); the agent keeps running."""
        log.error("%s", message)
        self._emit("error", message)

    def _load_serving(self) -> None:
        """Load the current model into the serving interpreter, falling back to the previous."""
        pointers = self.store.pointers()
        record = self.state.record
        for sha in (pointers.current, pointers.previous):
            if sha is None or not self.store.has(sha):
                continue
            # The threads it was activated with; a model not recorded gets the agent's setting.
            same = sha == record.serving_sha256
            try:
                self._serve(sha, record.serving_threads if same else self.config.threads)
                if sha != pointers.current:
                    self.store.rollback()
                    log.warning("current model failed to load; rolled back to %s", sha[:12])
                return
            except ModelLoadError as exc:
                log.error("stored model %s does not load: %s", sha[:12], exc)
        self.local.clear()

    def _serve(self, sha: str, threads: int | None) -> None:
        """Load a stored model into the serving interpreter, timing the load (init_ms)."""
        started = time.perf_counter()
        interpreter = load_interpreter(self.store.path(sha), threads)
        self.local.swap(interpreter, sha, (time.perf_counter() - started) * 1000.0, threads)

    def _threads(self, desired: Desired) -> int | None:
        """Interpreter threads for the desired artifact: the desired state's, else the config's."""
        return desired.threads if desired.threads is not None else self.config.threads

    def _internal_error(self, item: WorkItem, exc: Exception) -> None:
        """Report an unexpected exception; fail the update unless its generation already ended."""
        text = f"internal error: {type(exc).__name__}: {exc}"
        record = self.state.record
        if isinstance(item, Desired) and item.generation > record.applied_generation:
            self._fail(item, text)
        elif isinstance(item, Command):
            self._emit("error", f"command {item.command_id} failed: {text}")
        else:
            self._emit("error", text)

    # ----------------------------------------------------------------- MQTT input
    def _on_connect(self) -> None:
        """(Re)subscribe, announce facts and status, and re-send an unacknowledged result."""
        device = self.config.device_id
        self.session.subscribe(
            self.topics.desired(device),
            self.topics.cmd(device),
            self.topics.fleet_keys(),
            *self.fetcher.subscriptions(),
        )
        self._announce()
        self._work.put(ReportOutcome())
        self.local.on_connect()

    def _announce(self) -> None:
        """Publish hello (facts) and the retained status."""
        device = self.config.device_id
        hello = Hello(
            device_id=device,
            agent_version=__version__,
            facts=device_facts(),
            profile=self.config.profile,
        )
        self.session.publish(self.topics.hello(device), dump(hello))
        self._publish_status()

    def _on_message(self, topic: str, payload: bytes) -> None:
        """Route one message; bad input is rejected, counted and reported, never fatal."""
        try:
            parsed = self.topics.parse(topic)
            if parsed.kind == "artifact" and parsed.channel == "chunks":
                self.fetcher.on_chunk(parsed.ident, parsed.index or 0, payload)
            elif parsed.kind == "artifact" and parsed.channel == "manifest":
                if not payload:
                    return  # a cleared retained manifest
                manifest = parse(payload, Manifest)
                if manifest.sha256 != parsed.ident:
                    raise ProtocolError("$.sha256: does not match the manifest topic")
                if self.trust.enforcing:
                    try:
                        self.trust.check_manifest(manifest)
                    except SecurityRejected as exc:
                        self.fetcher.on_manifest_refused(manifest.sha256, str(exc))
                        raise
                self.fetcher.on_manifest(manifest)
            elif parsed.kind == "fleet":
                if payload:
                    self._on_fleet_keys(parse(payload, FleetKeys))
            elif parsed.channel == "desired":
                self._on_desired(topic, payload)
            elif parsed.channel == "cmd":
                self._work.put(parse(payload, Command))
        except ProtocolError as exc:
            self.counters.reject(f"{topic}: {exc}")
            log.warning("rejected message on %s: %s", topic, exc)
            self._emit("rejected", f"rejected message on {topic}: {exc}")
        except SecurityRejected as exc:
            self.counters.reject(f"{topic}: {exc}")
            log.warning("security: refused message on %s: %s", topic, exc)
            self._emit("security", f"refused message on {topic}: {exc}")

    def _on_desired(self, topic: str, payload: bytes) -> None:
        """Check a desired state (signature, binding, anti-rollback, expiry) and queue it."""
        desired = parse(payload, Desired)
        if self.trust.enforcing:
            record = self.state.record
            try:
                self.trust.check_desired(
                    desired,
                    device_id=self.config.device_id,
                    profile=self.config.profile,
                    highest_generation=max(
                        record.generation, record.applied_generation, self._latest_generation
                    ),
                    applied_generation=record.applied_generation,
                )
            except SecurityRejected as exc:
                unknown_key = desired.sig is not None and "unknown key" in str(exc)
                self._unknown_key_desired = (topic, payload) if unknown_key else None
                raise
        self._unknown_key_desired = None
        self._latest_generation = max(self._latest_generation, desired.generation)
        self._work.put(desired)

    def _on_fleet_keys(self, keys: FleetKeys) -> None:
        """Adopt a signed key rotation (persisted first); then re-check a desired it unblocks."""
        if not self.trust.enforcing:
            log.debug("ignoring fleet keys version %d: signatures not enforced", keys.version)
            return
        if self.trust.accept_keys(keys) and self._unknown_key_desired is not None:
            topic, payload = self._unknown_key_desired
            self._unknown_key_desired = None
            self._on_message(topic, payload)

    # ----------------------------------------------------------------- desired state
    def _apply_desired(self, desired: Desired) -> None:
        """Drive the update flow for one desired state, unless it is stale or already applied."""
        record = self.state.record
        if desired.generation < self._latest_generation:
            return  # a newer one is queued behind it
        if desired.generation <= record.applied_generation:
            log.info("ignoring stale desired generation %d", desired.generation)
            self._publish_status()
            if desired.generation == record.applied_generation:
                # Redelivered after a restart or reconnect: arm a fallback not armed yet.
                self.fallback.arm(desired, lambda: self._cancelled(desired))
            return
        artifact = desired.artifact
        threads = self._threads(desired)
        keep = {a.sha256 for a in (artifact, desired.fallback and desired.fallback.artifact) if a}
        self.fallback.disarm(frozenset(keep))  # a new generation decides anew
        same_model = artifact is not None and artifact.sha256 == self.serving.sha256
        try:
            if same_model and threads != self.local.threads:
                self._reload(desired, threads)
            elif artifact is None or same_model:
                serving = self.serving.sha256
                self._settle(desired, serving, "already in desired state")
                if not serving:
                    self._emit("update", "already in desired state", desired=desired, suffix="idle")
            else:
                self._update(desired)
        except Superseded:
            log.info("generation %d superseded by %d", desired.generation, self._latest_generation)
            return
        except UpdateFailed as exc:
            self._fail(desired, str(exc), stage=exc.stage)
            return
        self.fallback.arm(desired, lambda: self._cancelled(desired))

    def _settle(self, desired: Desired, sha: str | None, detail: str, **changes: Any) -> None:
        """Record `desired` as applied with `sha` serving (no update ran) and report it."""
        self.state.transition(
            "active" if sha else "idle",
            deployment_id=desired.deployment_id,
            generation=desired.generation,
            applied_generation=desired.generation,
            sha256=sha,
            selftest_attempts=0,
            stage=None,
            reported=False,
            benchmarked=False,
            benchmark_runs=desired.benchmark_runs,
            benchmark_warmup=desired.benchmark_warmup,
            detail=detail,
            **changes,
        )
        self._publish_status()
        if sha:
            self._report_outcome()

    def _reload(self, desired: Desired, threads: int | None) -> None:
        """The serving model with other threads: reload it (no download), report as usual."""
        assert desired.artifact is not None
        sha = desired.artifact.sha256
        # Other threads change latency and memory: the budgets are checked again.
        golden = self.store.golden_path(sha)
        result = run_selftest(
            self.store.path(sha),
            threads=threads,
            timeout_s=self.config.selftest_timeout_s,
            golden=golden if golden.exists() else None,
            latency_budget_ms=tighter_budget(
                self.config.latency_budget_ms, desired.latency_budget_ms
            ),
            memory_budget_mb=tighter_budget(self.config.memory_budget_mb, desired.memory_budget_mb),
        )
        if not result.ok:
            raise UpdateFailed(
                f"self-test with threads {threads} failed: {result.reason}", stage="self-testing"
            )
        try:
            self._serve(sha, threads)
        except ModelLoadError as exc:
            self._load_serving()
            raise UpdateFailed(f"reload with threads {threads} failed: {exc}") from None
        detail = f"reloaded with threads {threads} (already stored, no download)"
        self._settle(desired, sha, detail, serving_sha256=sha, serving_threads=threads)

    def _cancelled(self, desired: Desired) -> bool:
        """True when a newer generation arrived or the agent is stopping."""
        return self._latest_generation > desired.generation or self._stop.is_set()

    def _update(self, desired: Desired) -> None:
        """fetching → verifying → staged → self-testing → active, persisted at every step."""
        assert desired.artifact is not None
        sha = desired.artifact.sha256
        record = self.state.record
        changes: dict[str, Any] = {
            "deployment_id": desired.deployment_id,
            "generation": desired.generation,
            "sha256": sha,
            "stage": None,
            "reported": False,
            "benchmarked": False,
            "benchmark_runs": desired.benchmark_runs,
            "benchmark_warmup": desired.benchmark_warmup,
        }
        if record.sha256 != sha or record.generation != desired.generation:
            changes["selftest_attempts"] = 0
        self._step("fetching", desired, **changes)
        fetched = self.stager.fetch(
            desired.artifact, self.config.fetch_timeout_s, lambda: self._cancelled(desired)
        )
        self._step("verifying", desired)
        self.stager.verify(fetched)
        self._step("staged", desired)
        self._step(
            "self-testing", desired, selftest_attempts=self.state.record.selftest_attempts + 1
        )
        threads = self._threads(desired)
        result = run_selftest(
            self.store.path(sha),
            threads=threads,
            timeout_s=self.config.selftest_timeout_s,
            golden=self.store.golden_path(sha) if fetched.golden else None,
            latency_budget_ms=tighter_budget(
                self.config.latency_budget_ms, desired.latency_budget_ms
            ),
            memory_budget_mb=tighter_budget(self.config.memory_budget_mb, desired.memory_budget_mb),
        )
        if not result.ok:
            raise UpdateFailed(f"self-test failed: {result.reason}")
        try:
            self._serve(sha, threads)
        except ModelLoadError as exc:
            self._load_serving()  # the previous model keeps serving
            raise UpdateFailed(f"load failed: {exc}") from None
        self.store.activate(sha)
        self.state.transition(
            "active",
            applied_generation=desired.generation,
            serving_sha256=sha,
            serving_threads=threads,
            selftest_attempts=0,
            detail=(
                f"self-test {result.latency_ms:.2f} ms, peak RSS {result.peak_rss_mb:.1f} MB; "
                f"{result.detail}"
            ),
        )
        self._publish_status()
        self._report_outcome()

    def _step(self, state: str, desired: Desired, **changes: Any) -> None:
        """Persist a transition, then tell the controller (event id g<generation>-<state>)."""
        if self._cancelled(desired):
            raise Superseded()
        self.state.transition(state, **changes)
        self._publish_status()
        self._emit("update", state, desired=desired, suffix=state)

    def _fail(self, desired: Desired, reason: str, stage: str | None = None) -> None:
        """Record a failed update (stage = the state it failed in); the previous model serves on."""
        log.error("update to generation %d failed: %s", desired.generation, reason)
        record = self.state.record
        mine = record.generation == desired.generation and record.state not in TERMINAL
        stage = stage or (record.state if mine else "idle")
        artifact = desired.artifact
        if artifact is not None and artifact.sha256 != self.serving.sha256:
            self.store.discard(artifact.sha256)
        self.state.transition(
            "failed",
            deployment_id=desired.deployment_id,
            generation=desired.generation,
            sha256=artifact.sha256 if artifact else None,
            applied_generation=desired.generation,
            stage=stage,
            reported=False,
            benchmarked=False,
            detail=reason,
        )
        self._publish_status()
        self._report_outcome()

    # ----------------------------------------------------------------- exactly-once results
    def _report_outcome(self) -> None:
        """Send the recorded generation's result (and benchmark) until the broker acknowledges it.

        Event ids are deterministic (g<generation>-active / -failed / -benchmark) and the
        controller dedupes by (device, event id), so re-sending after a crash or a reconnect
        yields exactly one terminal result per generation.
        """
        r = self.state.record
        if r.deployment_id is None or r.generation < 1 or r.applied_generation != r.generation:
            return
        dep, gen = r.deployment_id, r.generation
        if r.state == "failed" and not r.reported:
            if self._emit(
                "error",
                r.detail,
                deployment_id=dep,
                generation=gen,
                suffix="failed",
                stage=r.stage,
                wait=True,
            ):
                self.state.update(reported=True)
        elif r.state == "active":
            if not r.reported:
                message = f"activated ({r.detail})" if r.detail else "activated"
                if not self._emit(
                    "update", message, deployment_id=dep, generation=gen, suffix="active", wait=True
                ):
                    return  # the next connect re-sends it, same id
                r = self.state.update(reported=True)
            due = not r.benchmarked and r.sha256 is not None and r.sha256 == self.serving.sha256
            if due and self._benchmark_and_report(
                r.benchmark_runs,
                r.benchmark_warmup,
                deployment_id=dep,
                generation=gen,
                suffix="benchmark",
                wait=True,
            ):
                self.state.update(benchmarked=True)

    # ----------------------------------------------------------------- commands
    def _run_command(self, command: Command) -> None:
        """Run a one-shot command once per command id (remembered across restarts)."""
        if not self.seen_commands.add(command.command_id):
            log.info("ignoring repeated command %s", command.command_id)
            return
        if command.action == "benchmark":
            self._benchmark_and_report(
                command.runs, command.warmup, event_id=derived_event_id(command.command_id, "bench")
            )
        elif command.action == "resend_telemetry":
            # The records themselves are the answer; no "done" event for every gap request.
            self.local.resend(command.seq_ranges)
            return
        elif command.action == "resend_status":
            self._announce()  # hello + status: the controller may have missed our hello
        elif command.action == "rollback":
            try:
                self.store.rollback()
                self.fallback.disarm()
                self._load_serving()
                self.state.transition("rolled_back", detail=f"rolled back by {command.command_id}")
            except FileNotFoundError as exc:
                self._emit(
                    "error",
                    f"rollback refused: {exc}",
                    event_id=derived_event_id(command.command_id, "error"),
                )
            self._publish_status()
        self._emit("command", f"{command.action} done", event_id=command.command_id)

    def _benchmark_and_report(
        self,
        runs: int,
        warmup: int,
        *,
        deployment_id: str | None = None,
        generation: int | None = None,
        suffix: str | None = None,
        event_id: str | None = None,
        wait: bool = False,
    ) -> bool:
        """Benchmark the serving model and send a benchmark event; True once acknowledged."""
        try:
            report = self.local.benchmark(runs, warmup, self.runtime)
        except InferenceError:  # nothing is loaded
            return self._emit(
                "error",
                "benchmark requested but no model is active",
                deployment_id=deployment_id,
                generation=generation,
                wait=wait,
            )
        except Exception as exc:  # a runtime error must not fail an already activated update
            log.exception("benchmark failed")
            return self._emit(
                "error",
                f"benchmark failed: {type(exc).__name__}: {exc}",
                deployment_id=deployment_id,
                generation=generation,
                suffix=f"{suffix}-error" if suffix else None,
                event_id=derived_event_id(event_id, "error") if event_id else None,
                stage="active",
                wait=wait,
            )
        return self._emit(
            "benchmark",
            "benchmark finished",
            deployment_id=deployment_id,
            generation=generation,
            benchmark=report,
            suffix=suffix,
            event_id=event_id,
            wait=wait,
        )

    # ----------------------------------------------------------------- output
    def _status(self, *, online: bool) -> Status:
        """Current status message."""
        record = self.state.record
        try:
            pointers = self.store.pointers()
            current, previous = pointers.current, pointers.previous
        except CorruptFileError:
            current = previous = None  # rebuilt by restore(); until then claim nothing
        return Status(
            device_id=self.config.device_id,
            online=online,
            state=record.state,  # type: ignore[arg-type]
            model_sha256=self.serving.sha256 if online else current,
            previous_sha256=previous,
            generation=record.applied_generation,
            detail=record.detail[:500],
        )

    def _publish_status(self) -> None:
        """Publish the retained status."""
        self.session.publish(
            self.topics.status(self.config.device_id), dump(self._status(online=True)), retain=True
        )

    def _emit(
        self,
        kind: str,
        message: str,
        *,
        desired: Desired | None = None,
        deployment_id: str | None = None,
        generation: int | None = None,
        suffix: str | None = None,
        event_id: str | None = None,
        stage: str | None = None,
        benchmark: BenchmarkReport | None = None,
        wait: bool = False,
    ) -> bool:
        """Publish an event; with `suffix` its id is g<generation>-<suffix>, stable across restarts.

        Returns True when `wait` is set and the broker acknowledged the event.
        """
        if desired is not None:
            deployment_id, generation = desired.deployment_id, desired.generation
        if event_id is None and suffix is not None and generation is not None:
            event_id = f"g{generation}-{suffix}"
        event = Event(
            device_id=self.config.device_id,
            event_id=event_id or uuid.uuid4().hex,
            kind=kind,  # type: ignore[arg-type]
            message=message[:4000],
            deployment_id=deployment_id,
            generation=generation,
            state=self.state.record.state,  # type: ignore[arg-type]
            stage=stage,  # type: ignore[arg-type]
            model_sha256=self.serving.sha256,
            benchmark=benchmark,
        )
        return self.session.publish(
            self.topics.events(self.config.device_id),
            dump(event),
            wait_s=REPORT_ACK_WAIT_S if wait else 0.0,
        )

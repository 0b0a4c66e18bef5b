"""The agent daemon: follows its retained desired state, updates safely, serves and measures."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from agent import __version__
from agent.benchmark import benchmark_interpreter
from agent.config import AgentConfig
from agent.download import ChunkRejected, Download
from agent.facts import device_facts
from agent.memory import release_memory
from agent.mqtt import MqttSession
from agent.power import PowerModel, detect_power_source
from agent.protocol import (
    MAX_CHUNK_SIZE,
    BenchmarkReport,
    Command,
    Desired,
    Event,
    Hello,
    Manifest,
    Need,
    ProtocolError,
    Status,
    Topics,
    dump,
    parse,
)
from agent.runtime import ModelLoadError, load_interpreter, runtime_info
from agent.selftest import run_selftest
from agent.state import MAX_SELFTEST_ATTEMPTS, RESTORE, UpdateStateFile
from agent.store import ModelStore, sha256_file

log = logging.getLogger(__name__)


class UpdateFailed(Exception):
    """An update step failed; the message is what the controller and the operator read."""


class Superseded(Exception):
    """A newer desired generation arrived while this update was running."""


@dataclass
class Counters:
    """What the agent counted since start (rejected input must be visible, not silent)."""

    rejected_messages: int = 0
    rejected_chunks: int = 0
    reasons: list[str] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        """Count a rejection and keep the last few reasons."""
        self.rejected_messages += 1
        self.reasons = [*self.reasons[-9:], reason]


class Agent:
    """One device's agent; `run()` blocks until `stop()`."""

    def __init__(self, config: AgentConfig) -> None:
        """Open the model store and saved state; nothing touches the network yet."""
        self.config = config
        self.topics = Topics(config.topic_root)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = ModelStore(config.models_dir)
        self.state = UpdateStateFile(config.data_dir / "update.json")
        self.counters = Counters()
        self.runtime = runtime_info()
        self.power_model = PowerModel(
            idle_w=config.power.idle_w,
            active_w_per_core=config.power.active_w_per_core,
            accelerator_active_w=config.power.accelerator_active_w,
        )
        self._work: queue.Queue[Desired | Command] = queue.Queue()
        self._stop = threading.Event()
        self._latest_generation = 0
        self._manifests: dict[str, Manifest] = {}
        self._manifest_arrived = threading.Condition()
        self._download: Download | None = None
        self._fetching_sha: str | None = None
        self._serving: Any = None
        self._serving_sha: str | None = None
        self._serving_init_ms = 0.0
        self._seen_commands: set[str] = set()
        self.session = MqttSession(
            config.broker,
            config.device_id,
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=(self.topics.status(config.device_id), dump(self._status(online=False))),
            username=config.username,
            password=config.password,
        )

    # ----------------------------------------------------------------- lifecycle
    def run(self) -> None:
        """Restore, connect, then process desired states and commands until stopped."""
        self.restore()
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
                    else:
                        self._run_command(item)
                except Exception as exc:  # one bad item must not take the agent down
                    log.exception("work item failed")
                    if isinstance(item, Desired):
                        self._fail(item, f"internal error: {type(item).__name__}: {exc}")
                    else:
                        self._emit("error", f"command {item.command_id} failed: {exc}")
                release_memory()
        finally:
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
        """Recover from the saved state (RESTORE table) and load the current model to serve."""
        record = self.state.record
        log.info("saved state %s: %s", record.state, RESTORE.get(record.state, "?"))
        if record.state == "self-testing" and record.selftest_attempts >= MAX_SELFTEST_ATTEMPTS:
            reason = f"self-test crashed the agent {record.selftest_attempts} times; giving up"
            self.state.transition("failed", applied_generation=record.generation, detail=reason)
            # Told to the controller once connected (QoS1 waits in paho's queue until then).
            self._emit_record_error(reason)
        elif record.state in ("fetching", "verifying", "staged", "self-testing"):
            # The retained desired state is delivered again on subscribe and drives the resume;
            # the chunk bitmap on disk keeps what was already downloaded.
            self.state.update(detail=f"interrupted in {record.state}; resuming")
        self._load_serving()

    def _emit_record_error(self, reason: str) -> None:
        """Send an error event for the saved update record (deployment and generation)."""
        record = self.state.record
        event = Event(
            device_id=self.config.device_id,
            event_id=uuid.uuid4().hex,
            kind="error",
            message=reason,
            deployment_id=record.deployment_id,
            generation=record.generation,
            state="failed",
            model_sha256=self._serving_sha,
        )
        self.session.publish(self.topics.events(self.config.device_id), dump(event))

    def _load_serving(self) -> None:
        """Load the current model into the serving interpreter, falling back to the previous."""
        pointers = self.store.pointers()
        for sha in (pointers.current, pointers.previous):
            if sha is None or not self.store.has(sha):
                continue
            try:
                self._serve(sha)
                if sha != pointers.current:
                    self.store.rollback()
                    log.warning("current model failed to load; rolled back to %s", sha[:12])
                return
            except ModelLoadError as exc:
                log.error("stored model %s does not load: %s", sha[:12], exc)
        self._serving, self._serving_sha = None, None

    def _serve(self, sha: str) -> None:
        """Load a stored model into the serving interpreter, timing the load (init_ms)."""
        started = time.perf_counter()
        interpreter = load_interpreter(self.store.path(sha), self.config.threads)
        self._serving_init_ms = (time.perf_counter() - started) * 1000.0
        self._serving, self._serving_sha = interpreter, sha

    # ----------------------------------------------------------------- MQTT input
    def _on_connect(self) -> None:
        """(Re)subscribe, announce facts and status."""
        device = self.config.device_id
        self.session.subscribe(self.topics.desired(device), self.topics.cmd(device))
        if self._fetching_sha is not None:
            sha = self._fetching_sha
            self.session.subscribe(self.topics.manifest(sha), self.topics.chunks_filter(sha))
        self._announce()

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
                self._on_chunk(parsed.ident, parsed.index or 0, payload)
            elif parsed.kind == "artifact" and parsed.channel == "manifest":
                manifest = parse(payload, Manifest)
                if manifest.sha256 != parsed.ident:
                    raise ProtocolError("$.sha256: does not match the manifest topic")
                with self._manifest_arrived:
                    self._manifests[manifest.sha256] = manifest
                    self._manifest_arrived.notify_all()
            elif parsed.channel == "desired":
                desired = parse(payload, Desired)
                self._latest_generation = max(self._latest_generation, desired.generation)
                self._work.put(desired)
            elif parsed.channel == "cmd":
                self._work.put(parse(payload, Command))
        except ProtocolError as exc:
            self.counters.reject(f"{topic}: {exc}")
            log.warning("rejected message on %s: %s", topic, exc)
            self._emit("rejected", f"rejected message on {topic}: {exc}")

    def _on_chunk(self, sha256: str, index: int, payload: bytes) -> None:
        """Verify and store one chunk of the artifact being downloaded."""
        download = self._download
        if download is None or download.manifest.sha256 != sha256:
            return
        if len(payload) > MAX_CHUNK_SIZE:
            raise ProtocolError(f"chunk {index} of {len(payload)} bytes exceeds {MAX_CHUNK_SIZE}")
        try:
            download.accept(index, payload)
        except ChunkRejected as exc:
            self.counters.rejected_chunks += 1
            log.warning("rejected chunk: %s (will ask again)", exc)

    # ----------------------------------------------------------------- desired state
    def _apply_desired(self, desired: Desired) -> None:
        """Drive the update flow for one desired state, unless it is stale or already applied."""
        record = self.state.record
        if desired.generation < self._latest_generation:
            return  # a newer one is queued behind it
        if desired.generation <= record.applied_generation:
            log.info("ignoring stale desired generation %d", desired.generation)
            self._publish_status()
            return
        artifact = desired.artifact
        if artifact is None or artifact.sha256 == self._serving_sha:
            self.state.transition(
                "active" if self._serving_sha else "idle",
                deployment_id=desired.deployment_id,
                generation=desired.generation,
                applied_generation=desired.generation,
                detail="already in desired state",
            )
            self._publish_status()
            self._emit("update", "already in desired state", desired=desired)
            if self._serving_sha:
                self._benchmark_and_report(
                    desired.benchmark_runs, desired.benchmark_warmup, desired
                )
            return
        try:
            self._update(desired)
        except Superseded:
            log.info("generation %d superseded by %d", desired.generation, self._latest_generation)
        except UpdateFailed as exc:
            self._fail(desired, str(exc))

    def _update(self, desired: Desired) -> None:
        """fetching → verifying → staged → self-testing → active, persisted at every step."""
        assert desired.artifact is not None
        sha = desired.artifact.sha256
        common = {
            "deployment_id": desired.deployment_id,
            "generation": desired.generation,
            "sha256": sha,
        }
        record = self.state.record
        if record.sha256 != sha or record.generation != desired.generation:
            common["selftest_attempts"] = 0  # type: ignore[assignment]
        if not self.store.has(sha):
            self._step("fetching", desired, **common)
            part = self._fetch(desired)
            self._step("verifying", desired)
            actual = sha256_file(part.part_path)
            if actual != sha:
                part.forget_bitmap()
                part.discard()
                raise UpdateFailed(f"verification failed: assembled file has sha256 {actual}")
            self.store.add_verified(sha, part.part_path)
            part.discard()
        else:
            self._step("fetching", desired, **common)
            self._step("verifying", desired)
        self._step("staged", desired)
        self._step(
            "self-testing", desired, selftest_attempts=self.state.record.selftest_attempts + 1
        )
        result = run_selftest(
            self.store.path(sha),
            threads=self.config.threads,
            timeout_s=self.config.selftest_timeout_s,
            latency_budget_ms=self.config.latency_budget_ms,
            memory_budget_mb=self.config.memory_budget_mb,
        )
        if not result.ok:
            raise UpdateFailed(f"self-test failed: {result.reason}")
        try:
            self._serve(sha)
        except ModelLoadError as exc:
            self._load_serving()  # the previous model keeps serving
            raise UpdateFailed(f"load failed: {exc}") from None
        self.store.activate(sha)
        self.state.transition(
            "active",
            applied_generation=desired.generation,
            selftest_attempts=0,
            detail=f"self-test {result.latency_ms:.2f} ms, peak RSS {result.peak_rss_mb:.1f} MB",
        )
        self._publish_status()
        self._emit("update", "activated", desired=desired)
        self._benchmark_and_report(desired.benchmark_runs, desired.benchmark_warmup, desired)

    def _step(self, state: str, desired: Desired, **changes: Any) -> None:
        """Persist a transition, then tell the controller."""
        if self._latest_generation > desired.generation:
            raise Superseded()
        self.state.transition(state, **changes)
        self._publish_status()
        self._emit("update", state, desired=desired)

    def _fetch(self, desired: Desired) -> Download:
        """Get the manifest, then chunks fanned out on the artifact topic, asking for gaps."""
        assert desired.artifact is not None
        sha = desired.artifact.sha256
        deadline = time.monotonic() + self.config.fetch_timeout_s
        self._fetching_sha = sha  # so a reconnect re-subscribes even before the manifest came
        self.session.subscribe(self.topics.manifest(sha))
        try:
            manifest = self._wait_manifest(sha, deadline, desired.generation)
            if manifest.size != desired.artifact.size:
                raise UpdateFailed(
                    f"manifest size {manifest.size} != desired size {desired.artifact.size}"
                )
            download = Download(manifest, self.config.downloads_dir)
            self._download = download
            self.session.subscribe(self.topics.chunks_filter(sha))
            while True:
                missing = download.missing()
                if not missing:
                    return download
                if time.monotonic() > deadline:
                    raise UpdateFailed(
                        f"download timed out: {len(missing)} of {manifest.chunk_count} chunks "
                        "missing"
                    )
                if self._latest_generation > desired.generation or self._stop.is_set():
                    raise Superseded()
                need = Need(device_id=self.config.device_id, chunks=tuple(missing))
                self.session.publish(self.topics.need(sha), dump(need))
                self._wait_for_progress(download, deadline)
        finally:
            self._download = None
            self._fetching_sha = None
            self.session.unsubscribe(self.topics.manifest(sha), self.topics.chunks_filter(sha))

    def _wait_for_progress(self, download: Download, deadline: float) -> None:
        """Wait while chunks keep arriving; return after repair_interval_s of silence."""
        while time.monotonic() < deadline:
            download.progress.clear()  # before the check, so a chunk in between is not missed
            if download.complete:
                return
            if not download.progress.wait(self.config.repair_interval_s):
                return

    def _wait_manifest(self, sha: str, deadline: float, generation: int) -> Manifest:
        """Block until the retained manifest for `sha` arrived (or the deadline passes)."""
        with self._manifest_arrived:
            while sha not in self._manifests:
                if self._latest_generation > generation or self._stop.is_set():
                    raise Superseded()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UpdateFailed(f"manifest for {sha[:12]} never arrived")
                self._manifest_arrived.wait(min(remaining, 1.0))
            return self._manifests[sha]

    def _fail(self, desired: Desired, reason: str) -> None:
        """Record a failed update; the previous model keeps serving."""
        log.error("update to generation %d failed: %s", desired.generation, reason)
        if desired.artifact is not None:
            self.store.discard(desired.artifact.sha256)
        self.state.transition("failed", applied_generation=desired.generation, detail=reason)
        self._publish_status()
        self._emit("error", reason, desired=desired)

    # ----------------------------------------------------------------- commands
    def _run_command(self, command: Command) -> None:
        """Run a one-shot command once per command id."""
        if command.command_id in self._seen_commands:
            return
        self._seen_commands.add(command.command_id)
        if command.action == "benchmark":
            self._benchmark_and_report(command.runs, command.warmup, None)
        elif command.action == "resend_status":
            self._announce()  # hello + status: the controller may have missed our hello
        elif command.action == "rollback":
            try:
                self.store.rollback()
                self._load_serving()
                self.state.transition("rolled_back", detail=f"rolled back by {command.command_id}")
            except FileNotFoundError as exc:
                self._emit("error", f"rollback refused: {exc}")
            self._publish_status()
        self._emit("command", f"{command.action} done", command_id=command.command_id)

    def _benchmark_and_report(self, runs: int, warmup: int, desired: Desired | None) -> None:
        """Benchmark the serving model and send the result as a benchmark event."""
        if self._serving is None or self._serving_sha is None:
            self._emit("error", "benchmark requested but no model is active", desired=desired)
            return
        source = detect_power_source(power_model=self.power_model, threads=self.config.threads or 1)
        result = benchmark_interpreter(
            self._serving,
            runs=runs,
            warmup=warmup,
            power_source=source,
            init_ms=self._serving_init_ms,
        )
        report = BenchmarkReport(
            model_sha256=self._serving_sha,
            runtime=self.runtime.name,
            runtime_version=self.runtime.version,
            threads=self.config.threads,
            **result,  # type: ignore[arg-type]
        )
        self._emit("benchmark", "benchmark finished", desired=desired, benchmark=report)

    # ----------------------------------------------------------------- output
    def _status(self, *, online: bool) -> Status:
        """Current status message."""
        record = self.state.record
        pointers = self.store.pointers()
        return Status(
            device_id=self.config.device_id,
            online=online,
            state=record.state,  # type: ignore[arg-type]
            model_sha256=self._serving_sha if online else pointers.current,
            previous_sha256=pointers.previous,
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
        benchmark: BenchmarkReport | None = None,
        command_id: str | None = None,
    ) -> None:
        """Publish an event tied to the current deployment."""
        event = Event(
            device_id=self.config.device_id,
            event_id=command_id or uuid.uuid4().hex,
            kind=kind,  # type: ignore[arg-type]
            message=message[:4000],
            deployment_id=desired.deployment_id if desired else None,
            generation=desired.generation if desired else None,
            state=self.state.record.state,  # type: ignore[arg-type]
            model_sha256=self._serving_sha,
            benchmark=benchmark,
        )
        self.session.publish(self.topics.events(self.config.device_id), dump(event))

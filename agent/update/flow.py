"""The update flow, driven by the state table: each in-flight state's step returns the next event.

`UpdateFlow.apply()` decides what a desired state needs (nothing, a reload with other threads,
or an update). An update fires `download`, then runs `STEPS[state]` for every in-flight state it
lands in; the step's event moves the table (table.FLOW) on, until a terminal state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from agent.fallback import FallbackSwitch
from agent.loader import ModelLoader
from agent.local_services import LocalServices
from agent.protocol import AgentState, ArtifactRef, Desired
from agent.protocol.config import AgentConfig
from agent.reporting import Reporter
from agent.runtime import ModelLoadError
from agent.selftest import run_selftest, tighter_budget
from agent.staging import ArtifactStager, Fetched
from agent.store import ModelStore
from agent.update.errors import Superseded, UpdateFailed
from agent.update.record import UpdateStateFile
from agent.update.table import UpdateEvent
from agent.work import Inbox

log = logging.getLogger(__name__)

S, E = AgentState, UpdateEvent


@dataclass
class Run:
    """One update in flight: what it installs and what its steps produced so far."""

    desired: Desired
    artifact: ArtifactRef
    threads: int | None
    fetched: Fetched | None = None


Step = Callable[["UpdateFlow", Run], tuple[UpdateEvent, dict[str, Any]]]


class UpdateFlow:
    """Applies desired states on the work thread; every state change goes through the table."""

    def __init__(
        self,
        config: AgentConfig,
        state: UpdateStateFile,
        store: ModelStore,
        stager: ArtifactStager,
        loader: ModelLoader,
        local: LocalServices,
        fallback: FallbackSwitch,
        reporter: Reporter,
        inbox: Inbox,
    ) -> None:
        """Wire the flow to the store, the stager, the serving model and the output."""
        self.config = config
        self.state = state
        self.store = store
        self.stager = stager
        self.loader = loader
        self.local = local
        self.fallback = fallback
        self.reporter = reporter
        self.inbox = inbox

    def threads(self, desired: Desired) -> int | None:
        """Interpreter threads for the desired artifact: the desired state's, else the config's."""
        return desired.threads if desired.threads is not None else self.config.threads

    def apply(self, desired: Desired) -> None:
        """Drive the update flow for one desired state, unless it is stale or already applied."""
        record = self.state.record
        if desired.generation < self.inbox.latest_generation:
            return  # a newer one is queued behind it
        if desired.generation <= record.applied_generation:
            log.info("ignoring stale desired generation %d", desired.generation)
            self.reporter.publish_status()
            if desired.generation == record.applied_generation:
                # Redelivered after a restart or reconnect: arm a fallback not armed yet.
                self.fallback.arm(desired, partial(self.inbox.cancelled, desired))
            return
        artifact = desired.artifact
        threads = self.threads(desired)
        keep = {a.sha256 for a in (artifact, desired.fallback and desired.fallback.artifact) if a}
        self.fallback.disarm(frozenset(keep))  # a new generation decides anew
        serving = self.local.serving.sha256
        same_model = artifact is not None and artifact.sha256 == serving
        try:
            if artifact is not None and same_model and threads != self.local.threads:
                self._reload(desired, artifact.sha256, threads)
            elif artifact is None or same_model:
                self._settle(desired, serving, "already in desired state")
                if not serving:
                    message = "already in desired state"
                    self.reporter.emit("update", message, desired=desired, suffix="idle")
            else:
                self._update(Run(desired, artifact, threads))
        except Superseded:
            latest = self.inbox.latest_generation
            log.info("generation %d superseded by %d", desired.generation, latest)
            return
        except UpdateFailed as exc:
            self.fail(desired, str(exc), stage=exc.stage)
            return
        self.fallback.arm(desired, partial(self.inbox.cancelled, desired))

    # ----------------------------------------------------------------- the update
    def _update(self, run: Run) -> None:
        """Fire `download`, then each in-flight state's step until the table reaches `active`."""
        desired, record = run.desired, self.state.record
        changes: dict[str, Any] = {
            "deployment_id": desired.deployment_id,
            "generation": desired.generation,
            "sha256": run.artifact.sha256,
            "stage": None,
            "reported": False,
            "benchmarked": False,
            "benchmark_runs": desired.benchmark_runs,
            "benchmark_warmup": desired.benchmark_warmup,
        }
        if record.sha256 != run.artifact.sha256 or record.generation != desired.generation:
            changes["selftest_attempts"] = 0
        event = E.DOWNLOAD
        while True:
            state = self._fire(run, event, changes)
            if state.terminal:
                break
            event, changes = STEPS[state](self, run)
        self.reporter.publish_status()
        self.reporter.report_outcome()

    def _fire(self, run: Run, event: UpdateEvent, changes: dict[str, Any]) -> AgentState:
        """Persist the event's transition; an in-flight state is announced (g<gen>-<state>)."""
        desired = run.desired
        if self.inbox.cancelled(desired) and event is not E.PASSED:
            raise Superseded()
        state = self.state.fire(event, **changes).state
        if not state.terminal:
            self.reporter.publish_status()
            self.reporter.emit("update", state.value, desired=desired, suffix=state.value)
        return state

    def _fetch(self, run: Run) -> tuple[UpdateEvent, dict[str, Any]]:
        """fetching: the manifest, then whatever of the model and its golden the store lacks."""
        cancelled = partial(self.inbox.cancelled, run.desired)
        run.fetched = self.stager.fetch(run.artifact, self.config.fetch_timeout_s, cancelled)
        return E.FETCHED, {}

    def _verify(self, run: Run) -> tuple[UpdateEvent, dict[str, Any]]:
        """verifying: re-hash every assembled file and move it into the store."""
        assert run.fetched is not None
        self.stager.verify(run.fetched)
        return E.VERIFIED, {}

    def _stage(self, run: Run) -> tuple[UpdateEvent, dict[str, Any]]:
        """staged: count the self-test attempt before it runs (the crash-loop guard's counter)."""
        return E.SELFTEST, {"selftest_attempts": self.state.record.selftest_attempts + 1}

    def _selftest(self, run: Run) -> tuple[UpdateEvent, dict[str, Any]]:
        """self-testing: the child-process self-test, then serve the model and make it current."""
        assert run.fetched is not None
        desired, sha = run.desired, run.artifact.sha256
        result = run_selftest(
            self.store.path(sha),
            threads=run.threads,
            timeout_s=self.config.selftest_timeout_s,
            golden=self.store.golden_path(sha) if run.fetched.golden else None,
            latency_budget_ms=self._latency_budget(desired),
            memory_budget_mb=self._memory_budget(desired),
        )
        if not result.ok:
            raise UpdateFailed(f"self-test failed: {result.reason}")
        try:
            self.loader.serve(sha, run.threads)
        except ModelLoadError as exc:
            self.loader.load_current()  # the previous model keeps serving
            raise UpdateFailed(f"load failed: {exc}") from None
        self.store.activate(sha)
        return E.PASSED, {
            "applied_generation": desired.generation,
            "serving_sha256": sha,
            "serving_threads": run.threads,
            "selftest_attempts": 0,
            "detail": (
                f"self-test {result.latency_ms:.2f} ms, peak RSS {result.peak_rss_mb:.1f} MB; "
                f"{result.detail}"
            ),
        }

    # ----------------------------------------------------------------- no download
    def _settle(self, desired: Desired, sha: str | None, detail: str, **changes: Any) -> None:
        """Record `desired` as applied with `sha` serving (no update ran) and report it."""
        self.state.fire(
            E.SERVING if sha else E.NOTHING,
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
        self.reporter.publish_status()
        if sha:
            self.reporter.report_outcome()

    def _reload(self, desired: Desired, sha: str, threads: int | None) -> None:
        """The serving model with other threads: reload it (no download), report as usual."""
        # Other threads change latency and memory: the budgets are checked again.
        golden = self.store.golden_path(sha)
        result = run_selftest(
            self.store.path(sha),
            threads=threads,
            timeout_s=self.config.selftest_timeout_s,
            golden=golden if golden.exists() else None,
            latency_budget_ms=self._latency_budget(desired),
            memory_budget_mb=self._memory_budget(desired),
        )
        if not result.ok:
            raise UpdateFailed(
                f"self-test with threads {threads} failed: {result.reason}", stage=S.SELF_TESTING
            )
        try:
            self.loader.serve(sha, threads)
        except ModelLoadError as exc:
            self.loader.load_current()
            raise UpdateFailed(f"reload with threads {threads} failed: {exc}") from None
        detail = f"reloaded with threads {threads} (already stored, no download)"
        self._settle(desired, sha, detail, serving_sha256=sha, serving_threads=threads)

    def _latency_budget(self, desired: Desired) -> float:
        """The tighter of the agent's and the desired state's latency budget (0 = none)."""
        return tighter_budget(self.config.latency_budget_ms, desired.latency_budget_ms)

    def _memory_budget(self, desired: Desired) -> float:
        """The tighter of the agent's and the desired state's memory budget (0 = none)."""
        return tighter_budget(self.config.memory_budget_mb, desired.memory_budget_mb)

    # ----------------------------------------------------------------- failure
    def fail(self, desired: Desired, reason: str, stage: AgentState | None = None) -> None:
        """Record a failed update (stage = the state it failed in); the previous model serves on."""
        log.error("update to generation %d failed: %s", desired.generation, reason)
        record = self.state.record
        mine = record.generation == desired.generation and not record.state.terminal
        stage = stage or (record.state if mine else S.IDLE)
        artifact = desired.artifact
        if artifact is not None and artifact.sha256 != self.local.serving.sha256:
            self.store.discard(artifact.sha256)
        self.state.fire(
            E.FAIL,
            deployment_id=desired.deployment_id,
            generation=desired.generation,
            sha256=artifact.sha256 if artifact else None,
            applied_generation=desired.generation,
            stage=stage,
            reported=False,
            benchmarked=False,
            detail=reason,
        )
        self.reporter.publish_status()
        self.reporter.report_outcome()


# What runs in each in-flight state; its event moves the table on (terminal states run nothing).
STEPS: dict[AgentState, Step] = {
    S.FETCHING: UpdateFlow._fetch,
    S.VERIFYING: UpdateFlow._verify,
    S.STAGED: UpdateFlow._stage,
    S.SELF_TESTING: UpdateFlow._selftest,
}

"""Crash recovery: one handler per persisted state, run once at start (Mender's LoadStateFromDb).

The retained desired state, delivered again on subscribe, drives any resume; the handlers only
settle what the saved state says about the device before that: a crash loop to give up on, a
committed model that no longer loads, a record rebuilt after corruption.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.fallback import FallbackSwitch
from agent.fsutil import CorruptFileError
from agent.loader import ModelLoader
from agent.local_services import LocalServices
from agent.protocol import AgentState
from agent.reporting import Reporter
from agent.store import ModelStore
from agent.trust import TrustStore
from agent.update.errors import StateLoopDetected
from agent.update.record import UpdateStateFile
from agent.update.table import UpdateEvent, loop_guard

log = logging.getLogger(__name__)

S, E = AgentState, UpdateEvent

# A model whose self-test killed the agent this many times is failed, not retried (crash loop).
MAX_SELFTEST_ATTEMPTS = 3


class Recovery:
    """Restores the agent after a start: report damaged files, serve, run the state's handler."""

    def __init__(
        self,
        state: UpdateStateFile,
        store: ModelStore,
        loader: ModelLoader,
        local: LocalServices,
        fallback: FallbackSwitch,
        reporter: Reporter,
        trust: TrustStore,
        problems: tuple[str | None, ...],
    ) -> None:
        """Wire the recovery; `problems` are the load problems of the other state files."""
        self.state = state
        self.store = store
        self.loader = loader
        self.local = local
        self.fallback = fallback
        self.reporter = reporter
        self.trust = trust
        self.problems = problems

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
        for problem in (self.state.problem, *self.problems, self.trust.problem):
            if problem:
                self.reporter.report_problem(problem)
        record = self.state.record
        try:
            self.store.pointers()
        except CorruptFileError:
            hint = record.sha256 if record.state == S.ACTIVE else None
            self.reporter.report_problem(self.store.rebuild_pointers(hint))
        self.loader.load_current()
        handler = RESTORE[record.state]
        log.info("saved state %s: %s", record.state, (handler.__doc__ or "").strip())
        handler(self)
        self.fallback.restore()

    def _nothing(self) -> None:
        """nothing to recover."""

    def _rebuilt(self) -> None:
        """nothing to recover, unless update.json was corrupt: then follow the model store."""
        if self.state.problem is not None:
            # A fresh record: the retained desired state re-drives the rest.
            serving = self.local.serving.sha256
            self.state.fire(
                E.SERVING if serving else E.NOTHING,
                sha256=serving,
                detail="update.json was corrupt and was rebuilt from the model store",
            )

    def _committed(self) -> None:
        """the committed model must still load; unacknowledged results are re-sent on connect."""
        record = self.state.record
        if record.sha256 is None or record.sha256 == self.local.serving.sha256:
            return
        # The committed model no longer loads (the loader fell back to the previous one).
        reason = f"activated model {record.sha256[:12]} no longer loads; serving the previous"
        if record.reported:
            self.state.fire(E.ROLLBACK, detail=reason)
        else:  # its activation never reached the controller: report a failure instead
            self.state.fire(E.FAIL, stage=S.ACTIVE, reported=False, detail=reason)

    def _resume(self) -> None:
        """resume from the chunk bitmap when the retained desired arrives (state-loop guarded)."""
        record = self.state.record
        try:
            stores = loop_guard(record.state, record.stores, record.state, same_update=True)
        except StateLoopDetected as exc:
            log.error("%s", exc)  # reported once connected (ReportOutcome)
            self._give_up(str(exc))
            return
        self.state.update(detail=f"interrupted in {record.state}; resuming", stores=stores)

    def _selftest_crashed(self) -> None:
        """count a crashed self-test; retry unless the crash-loop guard trips."""
        record = self.state.record
        if record.selftest_attempts < MAX_SELFTEST_ATTEMPTS:
            self._resume()
            return
        reason = f"self-test crashed the agent {record.selftest_attempts} times; giving up"
        log.error("%s", reason)  # reported once connected (ReportOutcome)
        self._give_up(reason)

    def _give_up(self, reason: str) -> None:
        """Fail the interrupted update in the state it was in; the previous model serves on."""
        record = self.state.record
        self.state.fire(
            E.FAIL,
            applied_generation=record.generation,
            stage=record.state,
            reported=False,
            detail=reason,
        )


# What a start does in each saved state (the handler's docstring is logged as the plan).
RESTORE: dict[AgentState, Callable[[Recovery], None]] = {
    S.IDLE: Recovery._rebuilt,
    S.FETCHING: Recovery._resume,
    S.VERIFYING: Recovery._resume,
    S.STAGED: Recovery._resume,
    S.SELF_TESTING: Recovery._selftest_crashed,
    S.ACTIVE: Recovery._committed,
    S.FAILED: Recovery._nothing,
    S.ROLLED_BACK: Recovery._nothing,
}

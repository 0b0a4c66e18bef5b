"""The ways an update step ends early: failed, superseded, an illegal edge, a loop."""

from __future__ import annotations

from agent.protocol import AgentState


class TransitionError(RuntimeError):
    """An event the state table has no row for in the current state (a bug, never input)."""


class UpdateFailed(Exception):
    """An update step failed; the message is what the controller and the operator read."""

    def __init__(self, message: str, *, stage: AgentState | None = None) -> None:
        """`stage`: the step that failed when the saved state does not say it (a reload)."""
        super().__init__(message)
        self.stage = stage


class StateLoopDetected(UpdateFailed):
    """The update in flight was persisted too often without finishing: fail it, do not retry."""


class Superseded(Exception):
    """A newer desired generation arrived while this update was running."""

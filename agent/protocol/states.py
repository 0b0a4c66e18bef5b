"""The agent's persisted update states: one definition for the agent, the wire and the simulator."""

from __future__ import annotations

from enum import Enum


class AgentState(str, Enum):
    """Where a device's update flow stands; persisted in update.json and sent in status/events.

    A `str` subclass, so a member equals, hashes, formats and serializes as its wire value
    ("self-testing"): code that compares with the plain string keeps working.
    """

    IDLE = "idle"
    FETCHING = "fetching"
    VERIFYING = "verifying"
    STAGED = "staged"
    SELF_TESTING = "self-testing"
    ACTIVE = "active"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"

    def __str__(self) -> str:
        """The wire value, not `AgentState.IDLE`."""
        return self.value

    def __format__(self, spec: str) -> str:
        """The wire value in f-strings too, on every Python version."""
        return format(self.value, spec)

    @property
    def terminal(self) -> bool:
        """True for the states an update ends in (no step of the flow runs in them)."""
        return self in TERMINAL_STATES


# The states an update ends in; the others are steps of an update in flight.
TERMINAL_STATES = frozenset(
    {AgentState.IDLE, AgentState.ACTIVE, AgentState.FAILED, AgentState.ROLLED_BACK}
)
# The steps of an update in flight, in the order the flow runs them.
IN_FLIGHT_STATES = (
    AgentState.FETCHING,
    AgentState.VERIFYING,
    AgentState.STAGED,
    AgentState.SELF_TESTING,
)

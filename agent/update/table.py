"""The agent's update flow as a table: (state, event) -> state rows, and the state-loop guard.

Read FLOW top to bottom and it is the flow: a desired artifact starts a download, each step's
success moves one state on, and any state can end in `failed`, `active` (the model is already
served) or `idle` (nothing to serve). Anything else raises TransitionError. The code that runs
in each state is `STEPS` in flow.py; what a restart does in each state is `RESTORE` in restore.py.
"""

from __future__ import annotations

from enum import Enum

from agent.protocol import AgentState
from agent.update.errors import StateLoopDetected, TransitionError


class UpdateEvent(str, Enum):
    """What happened: the input of one transition."""

    DOWNLOAD = "download"  # a desired artifact the store lacks (or an interrupted one, resumed)
    FETCHED = "fetched"  # model and golden downloaded, chunk by chunk
    VERIFIED = "verified"  # every assembled file re-hashed and moved into the store
    SELFTEST = "self-test"  # staged: start the self-test
    PASSED = "passed"  # self-test passed, the model serves and is the store's `current`
    SERVING = "serving"  # the desired model already serves: nothing to download
    NOTHING = "nothing"  # the desired state names no model (or none is stored)
    FAIL = "fail"  # a step failed (or a loop was detected); the previous model serves on
    ROLLBACK = "rollback"  # `previous` serves again (command, or `current` no longer loads)

    def __str__(self) -> str:
        """The value, for messages."""
        return self.value


S, E = AgentState, UpdateEvent
ANY = tuple(AgentState)

# (from states, event, to): the whole update flow, one row per event.
FLOW: tuple[tuple[tuple[AgentState, ...], UpdateEvent, AgentState], ...] = (
    (ANY,                                           E.DOWNLOAD, S.FETCHING),
    ((S.FETCHING,),                                 E.FETCHED,  S.VERIFYING),
    ((S.VERIFYING,),                                E.VERIFIED, S.STAGED),
    ((S.STAGED,),                                   E.SELFTEST, S.SELF_TESTING),
    ((S.SELF_TESTING,),                             E.PASSED,   S.ACTIVE),
    (ANY,                                           E.SERVING,  S.ACTIVE),
    (ANY,                                           E.NOTHING,  S.IDLE),
    (ANY,                                           E.FAIL,     S.FAILED),
    ((S.SELF_TESTING, S.ACTIVE, S.FAILED, S.ROLLED_BACK), E.ROLLBACK, S.ROLLED_BACK),
)  # fmt: skip

# The table expanded: exactly one target per (state, event).
TRANSITIONS: dict[tuple[AgentState, UpdateEvent], AgentState] = {
    (state, event): to for sources, event, to in FLOW for state in sources
}

# Persisted states one update may pass through before "state loop detected" fails it (Mender's
# client aborts at 28): a clean update persists 4 in-flight states and a restart mid-update adds
# 1-5, so 30 allows several restarts in a row and stops only a flow that would never end.
MAX_STATE_STORES = 30


def next_state(state: AgentState, event: UpdateEvent) -> AgentState:
    """The state `event` leads to from `state`; TransitionError when the table has no row."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"illegal event {event} in state {state}") from None


def loop_guard(state: AgentState, stores: int, to: AgentState, *, same_update: bool) -> int:
    """The update's store count after entering `to`; StateLoopDetected past MAX_STATE_STORES.

    Every transition passes here. Entering a terminal state ends the update (count 0: `failed`
    is always reachable, so a detected loop can end); a new generation starts a new count.
    """
    if to.terminal:
        return 0
    count = stores + 1 if same_update and not state.terminal else 1
    if count > MAX_STATE_STORES:
        raise StateLoopDetected(
            f"state loop detected: {count} persisted states without finishing ({state} -> {to})",
            stage=to,
        )
    return count

"""The agent's update state machine as tables: transitions, steps, restore handlers, loop guard."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import (
    IN_FLIGHT_STATES,
    TERMINAL_STATES,
    AgentState,
    ProtocolError,
    Status,
    dump,
    parse,
)
from agent.update.errors import StateLoopDetected, TransitionError
from agent.update.flow import STEPS
from agent.update.record import UpdateStateFile
from agent.update.restore import MAX_SELFTEST_ATTEMPTS, RESTORE
from agent.update.table import FLOW, MAX_STATE_STORES, TRANSITIONS, UpdateEvent, next_state

pytestmark = pytest.mark.agent

S, E = AgentState, UpdateEvent

# The edges the agent allowed before the table drove the flow (39 of 64): behaviour unchanged.
_EDGES_BEFORE = {
    "idle": {"idle", "fetching", "active", "failed"},
    "fetching": {"verifying", "failed", "fetching", "idle", "active"},
    "verifying": {"staged", "failed", "fetching", "idle", "active"},
    "staged": {"self-testing", "failed", "fetching", "idle", "active"},
    "self-testing": {"active", "failed", "rolled_back", "fetching", "idle"},
    "active": {"fetching", "rolled_back", "active", "failed", "idle"},
    "failed": {"fetching", "active", "failed", "rolled_back", "idle"},
    "rolled_back": {"fetching", "active", "failed", "rolled_back", "idle"},
}


def test_the_table_allows_exactly_the_edges_of_before() -> None:
    edges = {(a.value, b.value) for (a, _), b in TRANSITIONS.items()}
    assert edges == {(a, b) for a, targets in _EDGES_BEFORE.items() for b in targets}
    assert len(edges) == 39


def test_each_row_names_one_event_and_no_pair_has_two_targets() -> None:
    assert len({event for _, event, _ in FLOW}) == len(FLOW) == len(UpdateEvent)
    pairs = [(state, event) for sources, event, _ in FLOW for state in sources]
    assert len(pairs) == len(set(pairs)) == len(TRANSITIONS)


def test_every_state_has_a_restore_handler_and_in_flight_states_a_step() -> None:
    assert set(RESTORE) == set(AgentState)
    assert set(STEPS) == set(IN_FLIGHT_STATES) == set(AgentState) - TERMINAL_STATES
    assert all(handler.__doc__ for handler in RESTORE.values()), "the doc is the logged plan"
    assert MAX_SELFTEST_ATTEMPTS >= 2


def test_the_happy_path_reads_as_the_flow() -> None:
    state = S.IDLE
    seen = []
    for event in (E.DOWNLOAD, E.FETCHED, E.VERIFIED, E.SELFTEST, E.PASSED):
        state = next_state(state, event)
        seen.append(state.value)
    assert seen == ["fetching", "verifying", "staged", "self-testing", "active"]


def test_transitions_are_persisted_before_returning(tmp_path: Path) -> None:
    path = tmp_path / "update.json"
    UpdateStateFile(path).fire(E.DOWNLOAD, generation=2, sha256="ab" * 32)
    saved = json.loads(path.read_text())
    assert saved["state"] == "fetching" and saved["generation"] == 2 and saved["stores"] == 1
    reloaded = UpdateStateFile(path).record
    assert reloaded.state is S.FETCHING and reloaded.generation == 2


@pytest.mark.parametrize(
    ("start", "event"),
    [((), E.SELFTEST), ((), E.ROLLBACK), ((E.DOWNLOAD,), E.PASSED), ((E.DOWNLOAD,), E.ROLLBACK)],
)
def test_an_event_without_a_row_raises_and_writes_nothing(
    tmp_path: Path, start: tuple[UpdateEvent, ...], event: UpdateEvent
) -> None:
    state = UpdateStateFile(tmp_path / "update.json")
    for step in start:
        state.fire(step)
    before = state.record
    with pytest.raises(TransitionError, match=f"illegal event {event} in state {before.state}"):
        state.fire(event)
    assert state.record == before == UpdateStateFile(tmp_path / "update.json").record


def test_the_loop_guard_stops_an_update_that_never_finishes(tmp_path: Path) -> None:
    state = UpdateStateFile(tmp_path / "update.json")
    state.fire(E.DOWNLOAD, generation=5)
    for _ in range(MAX_STATE_STORES - 1):  # e.g. a restart in `fetching`, over and over
        state.fire(E.DOWNLOAD, generation=5)
    assert state.record.stores == MAX_STATE_STORES
    with pytest.raises(StateLoopDetected, match="state loop detected: 31 persisted states") as exc:
        state.fire(E.DOWNLOAD, generation=5)
    assert exc.value.stage is S.FETCHING
    assert state.record.stores == MAX_STATE_STORES, "the refused transition was not persisted"
    state.fire(E.FAIL, detail=str(exc.value))  # failing is always possible
    assert state.record.state is S.FAILED and state.record.stores == 0


def test_the_loop_guard_counts_per_update(tmp_path: Path) -> None:
    state = UpdateStateFile(tmp_path / "update.json")
    for generation in range(1, 3 * MAX_STATE_STORES):  # each superseded by the next
        state.fire(E.DOWNLOAD, generation=generation)
        state.fire(E.FETCHED)
    assert state.record.stores == 2, "a new generation starts a new count"
    state.fire(E.FAIL)
    for _ in range(3 * MAX_STATE_STORES):  # rollbacks toggle current/previous: no loop
        state.fire(E.ROLLBACK)
    assert state.record.stores == 0


def test_states_decode_into_the_shared_enum_and_encode_as_their_value() -> None:
    status = Status(device_id="d1", online=True, state=S.SELF_TESTING)
    payload = dump(status)
    assert json.loads(payload)["state"] == "self-testing"
    again = parse(payload, Status)
    assert again.state is S.SELF_TESTING and again == status
    assert f"{again.state}" == str(again.state) == "self-testing"
    with pytest.raises(ProtocolError, match=r"\$\.state: must be one of \['idle', 'fetching'"):
        parse(payload.replace(b"self-testing", b"exploded"), Status)
    with pytest.raises(ProtocolError, match=r"\$\.state: must be one of"):
        parse(payload.replace(b'"self-testing"', b"[1]"), Status)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(UpdateEvent)), st.integers(1, 3)), max_size=60))
def test_any_event_sequence_follows_the_table_or_changes_nothing(
    events: list[tuple[UpdateEvent, int]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "update.json"
        state = UpdateStateFile(path)
        for event, generation in events:
            before = state.record
            expected = TRANSITIONS.get((before.state, event))
            same = generation == before.generation and not before.state.terminal
            stores = (
                0 if expected is None or expected.terminal else before.stores + 1 if same else 1
            )
            try:
                after = state.fire(event, generation=generation)
            except TransitionError:
                assert expected is None
                assert state.record == before == UpdateStateFile(path).record
                continue
            except StateLoopDetected:
                assert stores == MAX_STATE_STORES + 1
                assert state.record == before == UpdateStateFile(path).record
                continue
            assert (after.state, after.stores) == (expected, stores)
            assert UpdateStateFile(path).record == after, "persisted before returning"

"""Candidate trial state table: every legal edge taken on a real database, illegal ones refused
by name, and every edge the selection engine takes in its scenarios is a row of the table."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.fleet.registry import Fleet
from controller.fleet.rollout import selection
from controller.fleet.rollout.policy import Policy, parse_waves
from controller.fleet.rollout.states import IllegalTransition
from controller.fleet.rollout.trial_states import (
    BUSY,
    DONE,
    INITIAL,
    OPEN,
    TRIAL_EDGES,
    TRIAL_TRANSITIONS,
    TrialState,
    cancel_trials,
    check_trial,
    move_trial,
)
from controller.storage.db import Connection
from controller.storage.queries import selection as sq
from tests.closed_loop_helpers import write_candidates_dir
from tests.paths import REPO_ROOT, TEST_DATA
from tests.unit.controller.fleet.rollout.test_selection import OLD, Devices

T = TrialState
NEW = TEST_DATA / "tiny_int8.tflite"

# Illegal edges: out of every ended trial, a trial restarting without going back to waiting,
# and a measured or failed trial coming back as a retry.
ILLEGAL: list[tuple[TrialState, TrialState]] = [
    *((d, s) for d in sorted(DONE) for s in (T.WAITING, T.RUNNING, T.MEASURED)),
    (T.RUNNING, T.RUNNING),
    (T.ACTIVATED, T.RUNNING),
    (T.MEASURED, T.FAILED),
    (T.CANCELLED, T.ACTIVATED),
]


# ----------------------------------------------------------------------------- the table
def test_the_trial_table_is_one_row_per_edge_and_every_state_is_reachable() -> None:
    pairs = [(f, t) for f, t, _ in TRIAL_TRANSITIONS]
    assert len(pairs) == len(set(pairs)) == len(TRIAL_EDGES), "one row per edge"
    assert all(why for _, _, why in TRIAL_TRANSITIONS), "every edge says when it is taken"
    assert {T.MEASURED, T.FAILED, T.CANCELLED} == DONE
    assert {T.WAITING, T.RUNNING, T.ACTIVATED} == OPEN and BUSY < OPEN
    reached, frontier = {INITIAL}, {INITIAL}
    while frontier:
        frontier = {t for f, t in TRIAL_EDGES if f in frontier} - reached
        reached |= frontier
    assert reached == set(TrialState), "every state is reachable from a new trial"
    for state in OPEN:
        assert {t for f, t in TRIAL_EDGES if f == state} >= DONE, f"{state} can end every way"
    # A retry is the same trial queued again, from wherever an attempt can fail.
    assert {f for f, t in TRIAL_EDGES if t is T.WAITING} == set(OPEN)


def test_illegal_trial_edges_are_refused_naming_from_and_to() -> None:
    for frm, to in ILLEGAL:
        assert (frm, to) not in TRIAL_EDGES
        with pytest.raises(IllegalTransition, match=f"{frm} → {to}"):
            check_trial(frm, to)
    for frm, to in itertools.product(TrialState, TrialState):
        if (frm, to) in TRIAL_EDGES:
            check_trial(frm.value, to.value)  # persisted strings are the enum's values
    assert T("activated") is T.ACTIVATED and f"{T.CANCELLED}" == "cancelled"


def test_the_docs_show_the_trial_table() -> None:
    """docs/rollouts.md's candidate trial table is the code's, row for row."""
    doc = (REPO_ROOT / "docs" / "rollouts.md").read_text()
    section = doc.split("### Candidate trial states", 1)[1].split("\n### ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines()]
    table = [
        (f.strip(" `"), t.strip(" `"), w.strip())
        for f, t, w in (r for r in rows if len(r) == 3)
        if f.strip() not in ("from", "---")
    ]
    assert table == [(f.value, t.value, w) for f, t, w in TRIAL_TRANSITIONS]


# ----------------------------------------------------------------------------- on a database
@pytest.fixture
def rollout(db_target: str, tmp_path: Path) -> Iterator[tuple[Fleet, str]]:
    """A fleet (SQLite, then PostgreSQL) with one rollout whose trials the test writes."""
    fleet = Fleet(tmp_path / "home", db=db_target)
    fleet.add_model(NEW, name="m", version="1")
    fleet.register_device("d", "rpi4")
    rid = fleet.start_rollout("m:1", "all", Policy(waves=parse_waves("100")))["id"]
    try:
        yield fleet, rid
    finally:
        fleet.close()


def _trial(fleet: Fleet, rid: str, rank: int, state: TrialState, device: str = "d") -> None:
    """A new trial of the rollout in `state`."""
    with fleet.db.transaction() as tx:
        tx.execute(
            "INSERT INTO candidate_trials (rollout_id, profile, device_id, rank, sha256, state, "
            "updated) VALUES (?, 'rpi4', ?, ?, 'sha', ?, 0)",
            (rid, device, rank, state.value),
        )


def _row(fleet: Fleet, rid: str, rank: int) -> dict[str, Any]:
    """The trial's state, attempts, detail and updated."""
    row = fleet.db.query_one(
        "SELECT state, attempts, detail, updated FROM candidate_trials WHERE rollout_id = ? "
        "AND rank = ?",
        (rid, rank),
    )
    assert row is not None
    return dict(row)


def test_every_legal_trial_edge_is_taken_by_move_trial(rollout: tuple[Fleet, str]) -> None:
    fleet, rid = rollout
    for rank, (frm, to) in enumerate(sorted(TRIAL_EDGES)):
        _trial(fleet, rid, rank, frm)
        with fleet.db.transaction() as tx:
            move_trial(tx, (rid, "d", rank), to, ts=5.0, detail=f"{frm}->{to}", generation=7)
        assert _row(fleet, rid, rank) == {
            "state": to, "attempts": 0, "detail": f"{frm}->{to}", "updated": 5.0
        }  # fmt: skip


def test_a_retry_is_the_same_trial_back_to_waiting_one_attempt_more(
    rollout: tuple[Fleet, str],
) -> None:
    fleet, rid = rollout
    _trial(fleet, rid, 0, T.RUNNING)
    with fleet.db.transaction() as tx:
        move_trial(tx, (rid, "d", 0), T.WAITING, ts=1.0, retry=True, detail="attempt 1")
        move_trial(tx, (rid, "d", 0), T.RUNNING, ts=2.0, detail="again")
        move_trial(tx, (rid, "d", 0), T.WAITING, ts=3.0, retry=True, detail="attempt 2")
    assert _row(fleet, rid, 0) == {
        "state": "waiting", "attempts": 2, "detail": "attempt 2", "updated": 3.0
    }  # fmt: skip
    with pytest.raises(IllegalTransition, match="not failed"), fleet.db.transaction() as tx:
        move_trial(tx, (rid, "d", 0), T.FAILED, ts=4.0, retry=True)
    n = fleet.db.query_one(
        "SELECT COUNT(*) AS n FROM candidate_trials WHERE rollout_id = ?", (rid,)
    )
    assert n == {"n": 1}, "a retry adds no row"


def test_illegal_trial_edges_raise_and_change_nothing(rollout: tuple[Fleet, str]) -> None:
    fleet, rid = rollout
    for rank, (frm, to) in enumerate(ILLEGAL):
        _trial(fleet, rid, rank, frm)
        with (
            pytest.raises(IllegalTransition, match=f"{frm} → {to}"),
            fleet.db.transaction() as tx,
        ):
            move_trial(tx, (rid, "d", rank), to, ts=9.0, detail="nope")
        assert _row(fleet, rid, rank) == {"state": frm, "attempts": 0, "detail": "", "updated": 0}
    with (
        pytest.raises(IllegalTransition, match="no candidate trial"),
        fleet.db.transaction() as tx,
    ):
        move_trial(tx, (rid, "ghost", 0), T.RUNNING, ts=1.0)


def test_cancel_trials_ends_only_open_ones(rollout: tuple[Fleet, str]) -> None:
    fleet, rid = rollout
    for rank, state in enumerate(TrialState):
        _trial(fleet, rid, rank, state)
        _trial(fleet, rid, rank, state, device="gone")
    with fleet.db.transaction() as tx:
        # "d" is the rollout's device in state waiting, not trialing: both canaries left.
        assert cancel_trials(tx, rid, "canary gone", 1.0, gone_from="trialing") == 2 * len(OPEN)
        assert cancel_trials(tx, rid, "aborted", 2.0) == 0
    for rank, state in enumerate(TrialState):
        assert _row(fleet, rid, rank)["state"] == (T.CANCELLED if state in OPEN else state)


# ----------------------------------------------------------------------------- the engine
@pytest.fixture
def edges(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every (from, to) the selection engine's move_trial calls take, in order."""
    taken: list[tuple[str, str]] = []

    def recording(tx: Connection, key: Any, to: TrialState, **kw: Any) -> None:
        taken.append((str(sq.trial_state(tx, key)), to.value))
        move_trial(tx, key, to, **kw)

    monkeypatch.setattr(selection, "move_trial", recording)
    return taken


@pytest.fixture
def ranked(fleet: Fleet, tmp_path: Path) -> Fleet:
    """Three rpi4 devices on an old model, and digits:2 with 2 ranked rpi4 candidates."""
    fleet.add_model(OLD, name="digits", version="1", profile="rpi4")
    for i in range(3):
        fleet.register_device(f"d{i}", "rpi4")
    out = write_candidates_dir(tmp_path / "opt", "rpi4", [("int8", 1), ("fp32", 1)])
    fleet.add_model(out, name="digits", version="2")
    return fleet


def test_the_engine_takes_only_edges_of_the_table(
    ranked: Fleet, edges: list[tuple[str, str]]
) -> None:
    """Retry by error and by timeout, a late event of the attempt before the retry, a measure,
    a final failure and an abort: each edge is a row of the table."""
    devices = Devices(ranked)
    ro = ranked.start_rollout("digits:2", "all", Policy(candidates=2, retries=2))["id"]
    ranked.rollouts.tick()
    canary, first = next(iter(devices.desired().items()))
    devices.event(canary, "update", ro, first.generation, state="active")
    devices.event(canary, "error", ro, first.generation, stage="fetching", message="lost")
    # Late: the same attempt reports active again before the retry starts (next tick).
    devices.event(canary, "update", ro, first.generation, state="active")
    ranked.db.conn.execute("UPDATE candidate_trials SET deadline = 1 WHERE state = 'activated'")
    ranked.rollouts.tick()  # the activated attempt timed out: retried and started again
    again = devices.desired()[canary]
    assert again.generation > first.generation
    devices.event(canary, "error", ro, again.generation, stage="self-testing", message="bad")
    ranked.rollouts.tick()
    ranked.rollouts.abort(ro)
    assert edges == [
        ("waiting", "running"),
        ("running", "activated"),
        ("activated", "waiting"),
        ("waiting", "activated"),
        ("activated", "waiting"),
        ("waiting", "running"),
        ("running", "failed"),
        ("waiting", "running"),
    ]
    assert set(edges) <= {(f.value, t.value) for f, t in TRIAL_EDGES}
    trials = ranked.deployment(ro)["trials"]
    assert [(t["rank"], t["state"]) for t in trials] == [(1, "failed"), (2, "cancelled")]

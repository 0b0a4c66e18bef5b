"""Rollout state tables and evaluators: every legal edge taken on a real database, illegal ones
refused by name, each condition and gate evaluator on synthetic counts and reports."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.fleet.registry import Fleet
from controller.fleet.rollout.evaluators import (
    ABORT_WHEN,
    ADVANCE_WHEN,
    EVALUATORS,
    GATE_EVALUATORS,
    NOT_JUDGED,
    Condition,
    Counts,
    GateKind,
    broken,
    judge,
    may_advance,
    should_abort,
)
from controller.fleet.rollout.policy import Gate, Policy, Threshold, parse_waves
from controller.fleet.rollout.states import (
    DONE,
    EDGES,
    INITIAL,
    ROLLOUT_EDGES,
    ROLLOUT_TRANSITIONS,
    TERMINAL,
    TRANSITIONS,
    DeviceState,
    IllegalTransition,
    RolloutState,
    check,
    check_rollout,
    move,
    move_all,
    move_rollout,
)
from controller.storage.queries import rollout_states as scopes
from tests.paths import REPO_ROOT, TEST_DATA

D, R = DeviceState, RolloutState
NEW = TEST_DATA / "tiny_int8.tflite"

# Illegal edges the engine must never take: out of every terminal state, backwards in the
# update flow, and skipping its steps.
ILLEGAL: list[tuple[DeviceState, DeviceState]] = [
    *((t, s) for t in sorted(TERMINAL, key=str) for s in (D.PENDING, D.WAITING, D.SUCCEEDED)),
    (D.SUCCEEDED, D.FAILED),
    (D.SUCCEEDED, D.PENDING),
    (D.IN_PROGRESS, D.PENDING),
    (D.ACTIVATED, D.IN_PROGRESS),
    (D.WAITING, D.SUCCEEDED),
    (D.WAITING, D.IN_PROGRESS),
    (D.BASELINING, D.ACTIVATED),
    (D.RETRYING, D.FAILED),
    (D.ROLLING_BACK, D.SUCCEEDED),
    (D.ROLLED_BACK, D.ROLLING_BACK),
    (D.OUTLIER, D.GATE_FAILED),
    (D.TRIALING, D.PENDING),
]


# ----------------------------------------------------------------------------- the tables
def test_the_device_table_is_one_row_per_edge_and_every_state_is_reachable() -> None:
    pairs = [(f, t) for f, t, _ in TRANSITIONS]
    assert len(pairs) == len(set(pairs)) == len(EDGES), "one row per edge"
    assert all(why for _, _, why in TRANSITIONS), "every edge says when it is taken"
    assert {
        D.FAILED, D.GATE_FAILED, D.CANCELLED, D.ROLLED_BACK, D.ROLLBACK_FAILED, D.SUPERSEDED,
        D.SKIPPED,
    } == TERMINAL  # fmt: skip
    reached, frontier = set(INITIAL), set(INITIAL)
    while frontier:
        frontier = {t for f, t in EDGES if f in frontier} - reached
        reached |= frontier
    assert reached == set(DeviceState), "every state is reachable from a new row"
    for state in set(DeviceState) - TERMINAL:
        seen, todo = {state}, [state]
        while todo:
            here = todo.pop()
            nxt = {t for f, t in EDGES if f == here} - seen
            seen |= nxt
            todo += nxt
        assert seen & TERMINAL, f"{state} can reach an end"
    assert TERMINAL <= DONE, "a state with no way out never holds a wave back"


def test_illegal_edges_are_refused_naming_from_and_to() -> None:
    for frm, to in ILLEGAL:
        assert (frm, to) not in EDGES
        with pytest.raises(IllegalTransition, match=f"{frm} → {to}"):
            check(frm, to)
    check("pending", "in_progress")  # persisted strings are the enum's values
    assert D("in_progress") is D.IN_PROGRESS and f"{D.ROLLING_BACK}" == "rolling_back"


def test_the_rollout_table() -> None:
    assert len(ROLLOUT_TRANSITIONS) == len(ROLLOUT_EDGES)
    for frm, to in itertools.product(RolloutState, RolloutState):
        if (frm, to) in ROLLOUT_EDGES:
            check_rollout(frm, to)
        else:
            with pytest.raises(IllegalTransition, match=f"{frm} → {to}"):
                check_rollout(frm, to)
    assert not {t for f, t in ROLLOUT_EDGES if f == R.ROLLED_BACK}, "rolled_back is final"


# ----------------------------------------------------------------------------- on a database
@pytest.fixture
def rollout(db_target: str, tmp_path: Path) -> Iterator[tuple[Fleet, str]]:
    """A fleet (SQLite, then PostgreSQL) with one rollout whose device rows the test writes."""
    fleet = Fleet(tmp_path / "home", db=db_target)
    fleet.add_model(NEW, name="m", version="1")
    fleet.register_device("d", "rpi4")
    rid = fleet.start_rollout("m:1", "all", Policy(waves=parse_waves("100")))["id"]
    try:
        yield fleet, rid
    finally:
        fleet.close()


def _row(fleet: Fleet, rid: str, state: DeviceState) -> str:
    """A new device row of the rollout in `state`; returns its device id."""
    device = f"x-{uuid.uuid4().hex[:8]}"
    with fleet.db.transaction() as tx:
        tx.execute(
            "INSERT INTO deployment_devices (deployment_id, device_id, generation, state, "
            "detail, updated) VALUES (?, ?, 0, ?, '', 0)",
            (rid, device, state.value),
        )
    return device


def _state(fleet: Fleet, rid: str, device: str) -> tuple[str, str, float]:
    """The row's state, detail and updated."""
    row = fleet.db.query_one(
        "SELECT state, detail, updated FROM deployment_devices WHERE deployment_id = ? "
        "AND device_id = ?",
        (rid, device),
    )
    assert row is not None
    return row["state"], row["detail"], row["updated"]


def test_every_legal_edge_is_taken_by_move_and_move_all(rollout: tuple[Fleet, str]) -> None:
    fleet, rid = rollout
    for frm, to in sorted(EDGES, key=str):
        one, many = _row(fleet, rid, frm), _row(fleet, rid, frm)
        with fleet.db.transaction() as tx:
            move(tx, (rid, one), to, ts=5.0, detail=f"{frm}->{to}", attempts=2)
            n = move_all(tx, to, (frm,), scopes.one_row(rid, many), ts=6.0)
        assert n == 1
        assert _state(fleet, rid, one) == (to, f"{frm}->{to}", 5.0)
        assert _state(fleet, rid, many)[::2] == (to, 6.0)
        attempts = fleet.db.query_one(
            "SELECT attempts FROM deployment_devices WHERE device_id = ?", (one,)
        )
        assert attempts == {"attempts": 2}, "extra columns travel with the move"


def test_illegal_edges_raise_and_change_nothing(rollout: tuple[Fleet, str]) -> None:
    fleet, rid = rollout
    for frm, to in ILLEGAL:
        device = _row(fleet, rid, frm)
        with (
            pytest.raises(IllegalTransition, match=f"{frm} → {to}"),
            fleet.db.transaction() as tx,
        ):
            move(tx, (rid, device), to, ts=9.0, detail="nope")
        with pytest.raises(IllegalTransition, match=f"{frm} → {to}"), fleet.db.transaction() as tx:
            move_all(tx, to, (frm,), scopes.of_device(device), ts=9.0)
        assert _state(fleet, rid, device) == (frm, "", 0.0)
    with pytest.raises(IllegalTransition, match="no device 'ghost'"), fleet.db.transaction() as tx:
        move(tx, (rid, "ghost"), D.PENDING, ts=1.0)


def test_the_engine_refuses_an_illegal_edge(rollout: tuple[Fleet, str]) -> None:
    """skip_device on a device that already succeeded would be succeeded → skipped."""
    fleet, rid = rollout
    device = _row(fleet, rid, D.SUCCEEDED)
    with (
        pytest.raises(IllegalTransition, match="succeeded → skipped"),
        fleet.db.transaction() as tx,
    ):
        fleet.rollouts.skip_device(tx, rid, device, "no candidate")
    assert _state(fleet, rid, device)[0] == D.SUCCEEDED


def test_rollout_moves_follow_the_table(rollout: tuple[Fleet, str]) -> None:
    fleet, rid = rollout
    with fleet.db.transaction() as tx:
        move_rollout(tx, rid, R.PAUSED, ts=1.0)
        move_rollout(tx, rid, R.ABORTED, ts=2.0, reason="why")
    row = fleet.db.query_one("SELECT state, reason, updated FROM deployments WHERE id = ?", (rid,))
    assert row == {"state": "aborted", "reason": "why", "updated": 2.0}
    for to in (R.RUNNING, R.PAUSED, R.COMPLETED):
        with (
            pytest.raises(IllegalTransition, match=f"aborted → {to}"),
            fleet.db.transaction() as tx,
        ):
            move_rollout(tx, rid, to, ts=3.0)
    with fleet.db.transaction() as tx:
        move_rollout(tx, rid, R.ROLLED_BACK, ts=4.0)
    with pytest.raises(IllegalTransition, match="no rollout 'nope'"), fleet.db.transaction() as tx:
        move_rollout(tx, "nope", R.PAUSED, ts=5.0)


# ----------------------------------------------------------------------------- evaluators
def _policy(**kw: object) -> Policy:
    """A policy with the given threshold and minimum."""
    return Policy(**kw)  # type: ignore[arg-type]


def test_every_condition_and_gate_kind_has_one_evaluator() -> None:
    assert set(EVALUATORS) == set(Condition) and set(GATE_EVALUATORS) == set(GateKind)
    assert ABORT_WHEN == (Condition.MIN_EXECUTED, Condition.MAX_FAILURES)
    assert ADVANCE_WHEN == (Condition.WAVE_DONE,)


def test_min_executed_and_max_failures_on_synthetic_counts() -> None:
    counts = Counts({"succeeded": 7, "failed": 1, "gate_failed": 1, "pending": 5, "outlier": 3})
    assert (counts.executed, counts.failures, counts.open) == (9, 2, 5)
    pct = _policy(max_failures=Threshold(percent=20), min_executed=10)
    assert not EVALUATORS[Condition.MIN_EXECUTED](counts, pct).met  # 9 < 10
    assert EVALUATORS[Condition.MAX_FAILURES](counts, pct).met  # 22 % > 20 %
    assert not should_abort(counts, pct).met, "too few verdicts to judge the rate"
    enough = _policy(max_failures=Threshold(percent=20), min_executed=9)
    assert should_abort(counts, enough).why == (
        "2 of 9 executed devices failed (threshold 20%, minimum executed 9)"
    )
    assert not should_abort(counts, _policy(max_failures=Threshold(percent=25))).met
    assert not should_abort(counts, _policy(max_failures=Threshold(count=2))).met  # 2 is not > 2
    assert should_abort(counts, _policy(max_failures=Threshold(count=1))).met
    assert not EVALUATORS[Condition.MAX_FAILURES](Counts({}), enough).met, "nothing executed"


def test_wave_done_counts_every_outcome_but_in_flight_ones() -> None:
    policy = Policy()
    done = Counts({"succeeded": 2, "gate_failed": 1, "skipped": 4, "superseded": 1})
    assert may_advance(done, policy) and may_advance(Counts({}), policy), "empty waves advance"
    for holding in ("waiting", "baselining", "pending", "in_progress", "activated", "retrying"):
        verdict = EVALUATORS[Condition.WAVE_DONE](Counts({"succeeded": 3, holding: 1}), policy)
        assert not verdict.met and verdict.why == "1 device(s) still open"


def test_gate_evaluators_limit_and_regression() -> None:
    report = {"p95_ms": 12.0, "peak_rss_mb": 80.0}
    base = {"p95_ms": 10.0}
    limit, regression = Gate("p95_ms", 10), Gate("p95_regression", 10)
    assert GATE_EVALUATORS[GateKind.LIMIT](limit, report, base) == (
        "p95_ms 12.000 over 10 (gate p95_ms<=10)"
    )
    assert GATE_EVALUATORS[GateKind.LIMIT](Gate("peak_rss_mb", 100), report, None) is None
    assert "+20.0% vs baseline" in str(
        GATE_EVALUATORS[GateKind.REGRESSION](regression, report, base)
    )
    assert GATE_EVALUATORS[GateKind.REGRESSION](regression, report, None) is None
    verdict = judge((regression, limit), report, base)
    assert len(verdict.violations) == 2 and "vs baseline" in verdict.violations[0], "policy order"
    assert verdict.note == ""
    unjudged = judge((regression, Gate("peak_rss_mb", 100)), report, None)
    assert unjudged.violations == () and unjudged.note == NOT_JUDGED
    assert judge((limit,), report, None).note == "", "absolute gates need no baseline"
    assert broken((limit, Gate("peak_rss_mb", 100), regression), report, base) == [
        limit,
        regression,
    ]


def test_the_docs_show_the_code_tables() -> None:
    """docs/rollouts.md's transition tables are the code's, row for row."""
    doc = (REPO_ROOT / "docs" / "rollouts.md").read_text()

    def table(heading: str) -> list[tuple[str, str, str]]:
        """The `| from | to | when |` rows under `heading`."""
        section = doc.split(heading, 1)[1].split("\n### ", 1)[0]
        rows = [line.strip("|").split(" | ") for line in section.splitlines()]
        return [
            (f.strip(" `"), t.strip(" `"), w.strip())
            for f, t, w in (r for r in rows if len(r) == 3)
            if f.strip() not in ("from", "---")
        ]

    assert table("### Transitions") == [(f.value, t.value, w) for f, t, w in TRANSITIONS]
    assert table("### Rollout states") == [(f.value, t.value, w) for f, t, w in ROLLOUT_TRANSITIONS]

"""The rollout tick reads only the device rows that can change: baselines and retries while the
rollout runs, updates whose deadline passed. Rows updating in time, or done, are not fetched:
at 10,000 devices, reading every row on every tick made the reconcile loop's cost grow with the
fleet (issue 20)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from agent.protocol import Status
from controller.fleet.registry import Fleet
from controller.fleet.rollout.policy import Policy, Threshold, parse_waves
from controller.storage.queries import waves as wq
from tests.fake_clock import FakeClock
from tests.paths import TEST_DATA

OLD, NEW = TEST_DATA / "tiny_fp32.tflite", TEST_DATA / "tiny_int8.tflite"
TIMEOUT_S = 60.0
DEVICES = [f"d{i}" for i in range(8)]


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock for the rollout engine."""
    return FakeClock()


@pytest.fixture
def eight_on_old(fleet: Fleet, clock: FakeClock) -> Fleet:
    """The shared fleet with eight rpi4 devices on OLD, model m:1 NEW; its engine reads
    `clock`."""
    fleet.rollouts.clock = clock
    fleet.add_model(OLD, name="m", version="0")
    fleet.add_model(NEW, name="m", version="1")
    old = fleet.model("m:0")["artifacts"][0]["sha256"]
    for device in DEVICES:
        fleet.register_device(device, "rpi4")
        fleet.record_status(Status(device_id=device, online=True, model_sha256=old))
    return fleet


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The devices of the rows each tick fetched to drive (one list per call)."""
    calls: list[list[str]] = []
    real: Callable[..., list[tuple[Any, ...]]] = wq.rows_to_drive

    def spy(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        rows = real(*args, **kwargs)
        calls.append([row[0] for row in rows])
        return rows

    monkeypatch.setattr(wq, "rows_to_drive", spy)
    return calls


# One wave, a 60 s device timeout, one retry; failures never abort (all 8 may time out).
POLICY = Policy(
    waves=parse_waves("100"), max_failures=Threshold(count=8), device_timeout_s=TIMEOUT_S, retries=1
)


def _rows(fleet: Fleet, rollout: str) -> dict[str, dict[str, Any]]:
    """Device -> its row in the rollout."""
    return {d["device_id"]: d for d in fleet.deployment(rollout)["devices"]}


def _publish(fleet: Fleet, devices: list[str]) -> None:
    """Publish the desired states of `devices` (their timeouts start now)."""
    fleet.mark_published_many(
        [(d, desired.generation) for d, desired, _ in fleet.unpublished_desired() if d in devices]
    )


def test_a_tick_fetches_only_rows_past_their_deadline_then_the_retries(
    eight_on_old: Fleet, clock: FakeClock, fetched: list[list[str]]
) -> None:
    fleet = eight_on_old
    ro = fleet.start_rollout("m:1", "all", POLICY)["id"]
    _publish(fleet, DEVICES[:2])
    clock.advance(30)
    _publish(fleet, DEVICES[2:])

    # Every row is updating within its time: none is fetched.
    assert fleet.rollouts.tick() == []
    assert fetched == [[]]

    # 65 s on, the first two are past their 60 s; the other six have had 35 s.
    clock.advance(35)
    fleet.rollouts.tick()
    assert fetched[-1] == ["d0", "d1"]
    rows = _rows(fleet, ro)
    assert [rows[d]["state"] for d in DEVICES] == ["retrying"] * 2 + ["in_progress"] * 6
    assert "attempt 1: timed out after 60 s" in rows["d0"]["detail"]

    # The retries go out on the next tick, and only they are fetched.
    notes = fleet.rollouts.tick()
    assert fetched[-1] == ["d0", "d1"]
    assert notes == [f"{ro}: retry 1 of d0", f"{ro}: retry 1 of d1"]
    rows = _rows(fleet, ro)
    assert [(rows[d]["state"], rows[d]["attempts"]) for d in DEVICES[:2]] == [("pending", 1)] * 2

    # Retried and not yet published (no deadline): nothing to fetch.
    assert fleet.rollouts.tick() == []
    assert fetched[-1] == []

    # The six run out at 60 s of their own; the retried two, published now, have not started.
    _publish(fleet, DEVICES[:2])
    clock.advance(30)
    fleet.rollouts.tick()
    assert fetched[-1] == DEVICES[2:]
    rows = _rows(fleet, ro)
    assert [rows[d]["state"] for d in DEVICES] == ["in_progress"] * 2 + ["retrying"] * 6


def test_a_paused_rollout_judges_deadlines_but_fetches_no_retry(
    eight_on_old: Fleet, clock: FakeClock, fetched: list[list[str]]
) -> None:
    fleet = eight_on_old
    ro = fleet.start_rollout("m:1", "all", POLICY)["id"]
    _publish(fleet, DEVICES[:3])
    clock.advance(30)
    _publish(fleet, DEVICES[3:])
    clock.advance(35)
    fleet.rollouts.tick()
    assert fetched[-1] == DEVICES[:3]

    # Paused: the three retrying rows wait (not fetched); the others time out on their own.
    fleet.rollouts.pause(ro)
    assert fleet.rollouts.tick() == []
    assert fetched[-1] == []
    clock.advance(30)
    fleet.rollouts.tick()
    assert fetched[-1] == DEVICES[3:]
    rows = _rows(fleet, ro)
    assert [rows[d]["state"] for d in DEVICES] == ["retrying"] * 8

    # Resumed: every retry goes out.
    fleet.rollouts.resume(ro)
    notes = fleet.rollouts.tick()
    assert fetched[-1] == DEVICES
    assert notes == [f"{ro}: retry 1 of {d}" for d in DEVICES]

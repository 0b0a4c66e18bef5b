"""A rollout device's timeout runs from the publication of its desired state (its download
slot), not from its assignment: devices queued behind the fetch window must not time out."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from agent.protocol import BenchmarkReport, Event, Status
from controller.fleet.registry import Fleet
from controller.fleet.rollout.policy import Policy, Threshold, parse_waves
from controller.runtime.pacing import FetchPacer
from tests.fake_clock import FakeClock
from tests.paths import TEST_DATA

OLD, NEW = TEST_DATA / "tiny_fp32.tflite", TEST_DATA / "tiny_int8.tflite"
TIMEOUT_S = 60.0



class Controller:
    """The service's part that matters here: a FetchPacer in front of publication."""

    def __init__(self, fleet: Fleet, clock: FakeClock, window: int) -> None:
        """Publish through a window of `window` devices fetching at once."""
        self.fleet, self.clock = fleet, clock
        self.pacer = FetchPacer(max_fetching=window, per_minute=0)

    def reconcile(self) -> list[str]:
        """Publish what the pacer admits (as runtime/publisher.py does); return who got it."""
        self.pacer.begin(self.clock())
        published = []
        for device_id, desired, _ in self.fleet.unpublished_desired():
            downloads = desired.artifact is not None
            if downloads and not self.pacer.admit(device_id, desired.generation, self.clock()):
                continue
            published.append((device_id, desired.generation))
        self.fleet.mark_published_many(published)
        return [d for d, _ in published]

    def event(self, rollout: str, device: str, kind: str, **kw: Any) -> None:
        """An event for the device's current generation, seen by ingest and by the pacer."""
        row = next(d for d in self.fleet.deployment(rollout)["devices"] if d["device_id"] == device)
        event = Event(
            device_id=device,
            event_id=uuid.uuid4().hex,
            kind=kind,  # type: ignore[arg-type]
            message=kw.pop("message", kind),
            deployment_id=rollout,
            generation=row["generation"],
            **kw,
        )
        self.fleet.record_event(event)
        self.pacer.on_event(event)

    def activate(self, rollout: str, device: str, sha: str) -> None:
        """Activation, benchmark and status, as an agent reports a successful update."""
        self.event(rollout, device, "update", state="active", message="activated")
        self.event(rollout, device, "benchmark", benchmark=_bench(sha))
        self.fleet.record_status(Status(device_id=device, online=True, model_sha256=sha))


def _bench(sha: str) -> BenchmarkReport:
    """A passing benchmark report."""
    return BenchmarkReport(
        model_sha256=sha, runtime="litert", runtime_version="2.3.0", threads=1, runs=50,
        warmup=5, init_ms=1.0, first_inference_ms=1.0, p50_ms=4.0, p90_ms=4.5, p95_ms=5.0,
        p99_ms=5.5, mean_ms=4.2, std_ms=0.1, min_ms=3.0, max_ms=6.0, peak_rss_mb=50.0,
        rss_mb=50.0, power_w=3.0, energy_mj_per_inference=1.0, power_source="estimated:profile",
        power_estimated=True,
    )  # fmt: skip


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock for the rollout engine and the publication."""
    return FakeClock()


@pytest.fixture
def six_on_old(fleet: Fleet, clock: FakeClock) -> Fleet:
    """The shared fleet with six rpi4 devices on OLD, model m:1 NEW; its engine reads `clock`."""
    fleet.rollouts.clock = clock
    fleet.add_model(OLD, name="m", version="0")
    fleet.add_model(NEW, name="m", version="1")
    old = fleet.model("m:0")["artifacts"][0]["sha256"]
    for i in range(6):
        fleet.register_device(f"d{i}", "rpi4")
        fleet.record_status(Status(device_id=f"d{i}", online=True, model_sha256=old))
    return fleet


def _states(fleet: Fleet, rollout: str) -> dict[str, str]:
    """Device -> state."""
    return {d["device_id"]: d["state"] for d in fleet.deployment(rollout)["devices"]}


def test_devices_queued_behind_the_window_do_not_time_out_while_waiting(
    six_on_old: Fleet, clock: FakeClock
) -> None:
    fleet = six_on_old
    policy = Policy(
        waves=parse_waves("100"),
        max_failures=Threshold(count=6),
        min_executed=1,
        device_timeout_s=TIMEOUT_S,
        retries=0,
    )
    ro = fleet.start_rollout("m:1", "all", policy)["id"]
    new = fleet.model("m:1")["artifacts"][0]["sha256"]
    ctl = Controller(fleet, clock, window=2)
    first = ctl.reconcile()
    assert len(first) == 2, "the window admits two devices"
    states = _states(fleet, ro)
    assert sorted(states.values()) == ["in_progress"] * 2 + ["pending"] * 4

    # The first two take 50 s of their 60 s; then two more get their turn.
    clock.advance(50)
    assert fleet.rollouts.tick() == []
    for device in first:
        ctl.activate(ro, device, new)
    second = ctl.reconcile()
    assert len(second) == 2 and not set(second) & set(first)
    queued = sorted(set(states) - set(first) - set(second))

    # 100 s after assignment: beyond the timeout for every device, but the queued ones are
    # still waiting for a slot and the second pair has had its turn for only 50 s.
    clock.advance(50)
    notes = fleet.rollouts.tick()
    assert not [n for n in notes if "timed out" in n], notes
    states = _states(fleet, ro)
    assert {d: states[d] for d in queued} == dict.fromkeys(queued, "pending"), states
    assert {d: states[d] for d in second} == dict.fromkeys(second, "in_progress"), states

    # The second pair's own 60 s run out 60 s after its publication; the queue still waits.
    clock.advance(15)
    fleet.rollouts.tick()
    rows = {d["device_id"]: d for d in fleet.deployment(ro)["devices"]}
    for device in second:
        assert rows[device]["state"] == "failed", rows[device]
        assert f"timed out after {TIMEOUT_S:g} s in state in_progress" in rows[device]["detail"]
    assert {d: rows[d]["state"] for d in queued} == dict.fromkeys(queued, "pending")


def test_a_republication_does_not_restart_the_timeout(six_on_old: Fleet, clock: FakeClock) -> None:
    """After a broker reconnect everything is published again: the deadline stays the first."""
    fleet = six_on_old
    policy = Policy(waves=parse_waves("100"), device_timeout_s=TIMEOUT_S, retries=0)
    ro = fleet.start_rollout("m:1", "device:d0", policy)["id"]
    ctl = Controller(fleet, clock, window=0)
    assert ctl.reconcile() == ["d0"]
    clock.advance(40)
    fleet.republish_all()
    assert ctl.reconcile() == ["d0"]
    clock.advance(30)  # 70 s after the first publication, 30 s after the second
    fleet.rollouts.tick()
    assert _states(fleet, ro) == {"d0": "failed"}

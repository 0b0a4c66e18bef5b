"""Rollout engine on a real SQLite file: waves, gates, retries, timeouts, abort, rollback.

Devices are driven by feeding the same Event/Status messages agents send into Fleet's ingest;
the engine's tick is called directly (the service calls it every reconcile).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.protocol import BenchmarkReport, Event, Status
from controller.fleet.registry import Fleet, FleetError
from controller.fleet.rollout.policy import (
    Gate,
    Policy,
    PolicyError,
    Threshold,
    Wave,
    parse_duration,
    parse_gate,
    parse_threshold,
    parse_waves,
)
from tests.fake_clock import FakeClock
from tests.paths import TEST_DATA

DATA = TEST_DATA
OLD, NEW = DATA / "tiny_fp32.tflite", DATA / "tiny_int8.tflite"


# ----------------------------------------------------------------------------- policy parsing
def test_waves_parse_percentages_counts_and_always_end_at_100() -> None:
    assert parse_waves("10,50,100") == (Wave(percent=10), Wave(percent=50), Wave(percent=100))
    assert parse_waves("1d,10d") == (Wave(count=1), Wave(count=10), Wave(percent=100))
    assert [w.size(1000) for w in parse_waves("10,50,100")] == [100, 500, 1000]
    assert [w.size(3) for w in parse_waves("10,50,100")] == [1, 2, 3]  # at least one device
    for bad in ("0,100", "50,10", "abc", "150", "0d", "10,,20"):
        with pytest.raises(PolicyError, match="--waves"):
            parse_waves(bad)


def test_thresholds_gates_durations() -> None:
    assert parse_threshold("5%").exceeded(1, 10) and not parse_threshold("10%").exceeded(1, 10)
    assert parse_threshold("2").exceeded(3, 100) and not parse_threshold("2").exceeded(2, 3)
    assert parse_gate("p95_ms<=40") == Gate("p95_ms", 40.0)
    assert parse_gate("p95_regression <= 10%") == Gate("p95_regression", 10.0)
    assert parse_duration("10m") == 600 and parse_duration("500ms") == 0.5
    for bad, match in (
        ("p95_ms<=10%", "absolute"),
        ("p95_regression<=10", "percentage"),
        ("speed<=3", "unknown metric"),
        ("p95_ms>=3", "METRIC<=NUMBER"),
    ):
        with pytest.raises(PolicyError, match=match):
            parse_gate(bad)
    with pytest.raises(PolicyError, match="--max-failures"):
        parse_threshold("-1")
    with pytest.raises(PolicyError, match="--device-timeout"):
        parse_duration("soon")


def test_gate_verdicts() -> None:
    report = {"p95_ms": 12.0, "peak_rss_mb": 80.0}
    assert Gate("p95_ms", 10).violation(report, None) == "p95_ms 12.000 over 10 (gate p95_ms<=10)"
    assert Gate("peak_rss_mb", 100).violation(report, None) is None
    assert Gate("p95_regression", 10).violation(report, {"p95_ms": 10.0}) is not None  # +20 %
    assert Gate("p95_regression", 25).violation(report, {"p95_ms": 10.0}) is None
    assert Gate("p95_regression", 10).violation(report, None) is None  # no baseline: not judged


def test_policy_round_trips_through_json() -> None:
    policy = Policy(
        waves=parse_waves("1d,50"),
        max_failures=Threshold(count=2),
        min_executed=3,
        gates=(Gate("p95_ms", 5), Gate("p95_regression", 10)),
        device_timeout_s=30,
        retries=1,
    )
    assert Policy.from_json(policy.to_json()) == policy
    assert policy.needs_baseline


# ----------------------------------------------------------------------------- engine
class FakeDevices:
    """Plays the agent side: sends the events and statuses a real agent sends."""

    def __init__(self, fleet: Fleet) -> None:
        """Drive `fleet`."""
        self.fleet = fleet

    def row(self, rollout: str, device: str) -> dict[str, Any]:
        """The device's row in the rollout."""
        rows = self.fleet.deployment(rollout)["devices"]
        return next(d for d in rows if d["device_id"] == device)

    def event(self, rollout: str, device: str, kind: str, **kw: Any) -> None:
        """An event for the device's current generation in the rollout."""
        row = self.row(rollout, device)
        self.fleet.record_event(
            Event(
                device_id=device,
                event_id=uuid.uuid4().hex,
                kind=kind,  # type: ignore[arg-type]
                message=kw.pop("message", kind),
                deployment_id=rollout,
                generation=row["generation"],
                **kw,
            )
        )

    def activate(self, rollout: str, device: str, p95: float = 5.0, rss: float = 50.0) -> None:
        """Activation then a benchmark, as the agent reports a successful update."""
        sha = self.row(rollout, device)["artifact_sha256"]
        self.event(rollout, device, "update", state="active", message="activated")
        self.event(rollout, device, "benchmark", benchmark=bench(sha, p95, rss))
        self.status(device, sha)

    def status(self, device: str, sha: str | None) -> None:
        """Retained status with the serving model."""
        self.fleet.record_status(Status(device_id=device, online=True, model_sha256=sha))


def bench(sha: str, p95: float, rss: float = 50.0) -> BenchmarkReport:
    """A benchmark report with the given p95 and peak RSS."""
    return BenchmarkReport(
        model_sha256=sha, runtime="litert", runtime_version="2.3.0", threads=1, runs=50,
        warmup=5, init_ms=1.0, first_inference_ms=1.0, p50_ms=p95 * 0.8, p90_ms=p95 * 0.95,
        p95_ms=p95, p99_ms=p95 * 1.1, mean_ms=p95 * 0.85, std_ms=0.1, min_ms=p95 * 0.5,
        max_ms=p95 * 1.2, peak_rss_mb=rss, rss_mb=rss, power_w=3.0,
        energy_mj_per_inference=1.0, power_source="estimated:profile", power_estimated=True,
    )  # fmt: skip



@pytest.fixture
def clock() -> FakeClock:
    """A fake clock for the rollout engine."""
    return FakeClock()


@pytest.fixture
def fleet_on_old(fleet: Fleet, clock: FakeClock) -> Fleet:
    """Ten rpi4 devices running the OLD model, and model digits:1 (NEW) + :0 (OLD); the rollout
    engine reads `clock`."""
    fleet.rollouts.clock = clock
    fleet.add_model(OLD, name="digits", version="0")
    fleet.add_model(NEW, name="digits", version="1")
    old_sha = fleet.model("digits:0")["artifacts"][0]["sha256"]
    for i in range(10):
        fleet.register_device(f"d{i}", "rpi4")
        FakeDevices(fleet).status(f"d{i}", old_sha)
    return fleet


def policy(**kw: Any) -> Policy:
    """A policy with test-friendly defaults."""
    base: dict[str, Any] = {
        "waves": parse_waves("10,50,100"),
        "max_failures": Threshold(percent=20),
        "min_executed": 1,
        "device_timeout_s": 600,
    }
    return Policy(**{**base, **kw})


def publish(fleet: Fleet) -> None:
    """What the service does each reconcile: publish every pending desired state."""
    fleet.mark_published_many([(d, dv.generation) for d, dv, _ in fleet.unpublished_desired()])


def states(fleet: Fleet, rollout: str) -> dict[str, str]:
    """Device -> state."""
    return {d["device_id"]: d["state"] for d in fleet.deployment(rollout)["devices"]}


def in_wave(fleet: Fleet, rollout: str, wave: int) -> list[str]:
    """Devices of one wave."""
    return [d["device_id"] for d in fleet.deployment(rollout)["devices"] if d["wave"] == wave]


def test_waves_advance_only_when_the_wave_is_done(fleet_on_old: Fleet) -> None:
    agents = FakeDevices(fleet_on_old)
    ro = fleet_on_old.start_rollout("digits:1", "all", policy())["id"]
    assert [len(in_wave(fleet_on_old, ro, w)) for w in range(3)] == [1, 4, 5]
    first = in_wave(fleet_on_old, ro, 0)
    assert {s for d, s in states(fleet_on_old, ro).items() if d not in first} == {"waiting"}
    desired = {d: dv for d, dv, _ in fleet_on_old.unpublished_desired()}
    assert set(desired) == set(first), "only wave 0 gets a desired state"
    assert desired[first[0]].latency_budget_ms == 100.0, "rpi4 budget travels with it"
    fleet_on_old.rollouts.tick()
    assert states(fleet_on_old, ro)[in_wave(fleet_on_old, ro, 1)[0]] == "waiting"
    agents.activate(ro, first[0])
    fleet_on_old.rollouts.tick()
    assert {states(fleet_on_old, ro)[d] for d in in_wave(fleet_on_old, ro, 1)} == {"pending"}
    for d in in_wave(fleet_on_old, ro, 1):
        agents.activate(ro, d)
    fleet_on_old.rollouts.tick()
    for d in in_wave(fleet_on_old, ro, 2):
        agents.activate(ro, d)
    fleet_on_old.rollouts.tick()
    status = fleet_on_old.deployment(ro)
    assert status["state"] == "completed" and status["counts"] == {"succeeded": 10}


def test_gate_violation_rolls_the_device_back_and_enough_abort(fleet_on_old: Fleet) -> None:
    agents = FakeDevices(fleet_on_old)
    old_sha = fleet_on_old.model("digits:0")["artifacts"][0]["sha256"]
    ro = fleet_on_old.start_rollout(
        "digits:1",
        "all",
        policy(
            waves=parse_waves("2d,100"),
            max_failures=Threshold(count=1),
            gates=(Gate("p95_ms", 10.0),),
        ),
    )["id"]
    slow, ok = in_wave(fleet_on_old, ro, 0)
    agents.activate(ro, slow, p95=25.0)
    row = agents.row(ro, slow)
    assert row["state"] == "gate_failed" and "p95_ms 25.000 over 10" in row["detail"]
    desired = {d: dv for d, dv, _ in fleet_on_old.unpublished_desired()}
    assert desired[slow].artifact is not None and desired[slow].artifact.sha256 == old_sha
    fleet_on_old.rollouts.tick()
    assert fleet_on_old.deployment(ro)["state"] == "running", "1 failure is within a threshold of 1"
    agents.activate(ro, ok, p95=30.0)
    fleet_on_old.rollouts.tick()
    status = fleet_on_old.deployment(ro)
    assert status["state"] == "aborted" and "2 of 2 executed devices failed" in status["reason"]
    assert {states(fleet_on_old, ro)[d] for d in in_wave(fleet_on_old, ro, 1)} == {"cancelled"}
    # Every device that got the new model is pointed back at the old one.
    desired = {d: dv for d, dv, _ in fleet_on_old.unpublished_desired()}
    assert {d for d in desired} >= {slow, ok}
    assert all(dv.artifact and dv.artifact.sha256 == old_sha for dv in desired.values())


def test_regression_gate_uses_the_devices_own_baseline(fleet_on_old: Fleet) -> None:
    agents = FakeDevices(fleet_on_old)
    old_sha = fleet_on_old.model("digits:0")["artifacts"][0]["sha256"]
    # d0..d1 have a baseline of the old model at 10 ms; the rest have none.
    for device in ("d0", "d1"):
        fleet_on_old.record_event(
            Event(device_id=device, event_id=uuid.uuid4().hex, kind="benchmark",
                  message="baseline", benchmark=bench(old_sha, 10.0))
        )  # fmt: skip
    ro = fleet_on_old.start_rollout(
        "digits:1",
        "device:d0,device:d1,device:d2",
        policy(
            waves=parse_waves("100"),
            gates=(Gate("p95_regression", 10),),
            max_failures=Threshold(count=5),
        ),
    )["id"]
    assert states(fleet_on_old, ro) == {"d0": "pending", "d1": "pending", "d2": "baselining"}
    commands = fleet_on_old.unpublished_commands()
    assert [(d, c.action) for d, c in commands] == [("d2", "benchmark")]
    agents.activate(ro, "d0", p95=10.5)  # +5 %
    agents.activate(ro, "d1", p95=12.0)  # +20 %
    assert states(fleet_on_old, ro)["d0"] == "succeeded"
    assert states(fleet_on_old, ro)["d1"] == "gate_failed"
    assert "+20.0% vs baseline 10.000" in agents.row(ro, "d1")["detail"]
    # d2's baseline arrives (answer to the benchmark command): only then does it get the model.
    fleet_on_old.record_event(
        Event(device_id="d2", event_id=commands[0][1].command_id, kind="benchmark",
              message="baseline", benchmark=bench(old_sha, 4.0))
    )  # fmt: skip
    fleet_on_old.rollouts.tick()
    assert states(fleet_on_old, ro)["d2"] == "pending"
    agents.activate(ro, "d2", p95=4.1)
    assert states(fleet_on_old, ro)["d2"] == "succeeded"


def test_transport_failures_are_retried_self_test_failures_are_not(fleet_on_old: Fleet) -> None:
    agents = FakeDevices(fleet_on_old)
    ro = fleet_on_old.start_rollout(
        "digits:1",
        "device:d0,device:d1",
        policy(waves=parse_waves("100"), retries=1, max_failures=Threshold(count=5)),
    )["id"]
    gen0 = agents.row(ro, "d0")["generation"]
    agents.event(ro, "d0", "error", stage="fetching", message="download timed out: 1 of 1")
    agents.event(ro, "d1", "error", stage="self-testing", message="self-test failed: NaN")
    assert states(fleet_on_old, ro) == {"d0": "retrying", "d1": "failed"}
    fleet_on_old.rollouts.tick()
    row = agents.row(ro, "d0")
    assert row["state"] == "pending" and row["attempts"] == 1 and row["generation"] > gen0
    # A late event for the superseded generation changes nothing.
    fleet_on_old.record_event(
        Event(device_id="d0", event_id=uuid.uuid4().hex, kind="error", message="late",
              deployment_id=ro, generation=gen0, stage="fetching")
    )  # fmt: skip
    assert agents.row(ro, "d0")["state"] == "pending"
    agents.event(ro, "d0", "error", stage="fetching", message="download timed out again")
    assert agents.row(ro, "d0")["state"] == "failed", "retries exhausted"


def test_timeouts_retry_then_fail_and_the_device_is_pointed_back(
    fleet_on_old: Fleet, clock: FakeClock
) -> None:
    ro = fleet_on_old.start_rollout(
        "digits:1",
        "device:d0",
        policy(
            waves=parse_waves("100"),
            retries=1,
            device_timeout_s=0.05,
            max_failures=Threshold(count=5),
        ),
    )["id"]
    publish(fleet_on_old)  # the timeout runs from here (docs/rollouts.md, "Device timeout")
    clock.advance(0.1)
    fleet_on_old.rollouts.tick()  # timeout -> retrying
    fleet_on_old.rollouts.tick()  # retrying -> pending with a new generation
    row = FakeDevices(fleet_on_old).row(ro, "d0")
    assert row["state"] == "pending" and row["attempts"] == 1
    clock.advance(0.1)
    fleet_on_old.rollouts.tick()
    row = FakeDevices(fleet_on_old).row(ro, "d0")
    assert row["state"] == "pending", "not published yet: no timeout runs"
    publish(fleet_on_old)
    clock.advance(0.1)
    fleet_on_old.rollouts.tick()
    row = FakeDevices(fleet_on_old).row(ro, "d0")
    assert row["state"] == "failed"
    assert "timed out after 0.05 s in state in_progress" in row["detail"]
    old_sha = fleet_on_old.model("digits:0")["artifacts"][0]["sha256"]
    desired = {d: dv for d, dv, _ in fleet_on_old.unpublished_desired()}
    assert desired["d0"].artifact and desired["d0"].artifact.sha256 == old_sha, (
        "a device that timed out must not install the artifact when it returns"
    )
    fleet_on_old.rollouts.tick()
    assert fleet_on_old.deployment(ro)["state"] == "completed"


def test_pause_resume_abort_rollback_and_restart(fleet_on_old: Fleet, tmp_path: Path) -> None:
    agents = FakeDevices(fleet_on_old)
    ro = fleet_on_old.start_rollout("digits:1", "all", policy())["id"]
    first = in_wave(fleet_on_old, ro, 0)[0]
    fleet_on_old.rollouts.pause(ro)
    agents.activate(ro, first)
    fleet_on_old.rollouts.tick()
    assert fleet_on_old.deployment(ro)["wave"] == 0, "a paused rollout starts no wave"
    with pytest.raises(PolicyError, match="is paused, not running"):
        fleet_on_old.rollouts.pause(ro)
    # A controller restart (new Fleet on the same files) picks up exactly where it was.
    fleet_on_old.close()
    again = Fleet(tmp_path / "home")
    again.rollouts.resume(ro)
    again.rollouts.tick()
    assert again.deployment(ro)["wave"] == 1
    status = again.rollouts.rollback(ro)
    assert status["state"] == "rolled_back"
    assert states(again, ro)[first] == "rolling_back"
    assert {states(again, ro)[d] for d in in_wave(again, ro, 2)} == {"cancelled"}
    FakeDevices(again).event(ro, first, "update", state="active", message="activated")
    assert states(again, ro)[first] == "rolled_back"
    with pytest.raises(PolicyError, match="already rolled back"):
        again.rollouts.rollback(ro)
    with pytest.raises(PolicyError, match="only a running or paused"):
        again.rollouts.abort(ro)


def test_artifact_per_profile_and_skipped_devices(fleet_on_old: Fleet) -> None:
    fleet_on_old.register_device("phone", "pixel-8")
    fleet_on_old.add_model(NEW, name="cnn", version="2", profile="rpi4")
    ro = fleet_on_old.start_rollout("cnn:2", "all", policy(waves=parse_waves("100")))
    phone = next(d for d in ro["devices"] if d["device_id"] == "phone")
    assert (
        phone["state"] == "skipped"
        and "no artifact of cnn:2 for profile 'pixel-8'" in (phone["detail"])
    )
    with pytest.raises(FleetError, match="none of the 1 selected devices"):
        fleet_on_old.start_rollout("cnn:2", "device:phone", policy())
    with pytest.raises(FleetError, match="unknown model 'nope'"):
        fleet_on_old.start_rollout("nope", "all", policy())
    with pytest.raises(FleetError, match="not all, profile:P"):
        fleet_on_old.start_rollout("cnn:2", "tag:x", policy())


def test_models_add_reads_an_optimize_directory_with_goldens(fleet: Fleet, tmp_path: Path) -> None:
    out = tmp_path / "out" / "rpi4"
    out.mkdir(parents=True)
    artifact = out / "m-int8.tflite"
    artifact.write_bytes(NEW.read_bytes())
    golden = out / "m-int8.golden.npz"
    np.savez(golden, inputs=np.zeros((1, 4)), outputs=np.zeros((1, 2)), atol=np.array(1.0))
    (out / "m-int8.manifest.json").write_text(json.dumps({
        "schema": "edgefleet.artifact-manifest/v1", "file": artifact.name,
        "sha256": hashlib.sha256(artifact.read_bytes()).hexdigest(), "recipe": "int8",
        "profile": "rpi4", "golden": {"file": golden.name},
    }))  # fmt: skip
    model = fleet.add_model(tmp_path / "out", name="m", version="3")
    (art,) = model["artifacts"]
    assert art["profile"] == "rpi4" and art["recipe"] == "int8" and art["golden_sha256"]
    manifest = fleet.manifest(art["sha256"])
    assert manifest.golden is not None and manifest.golden.sha256 == art["golden_sha256"]
    assert fleet.artifacts.path(art["golden_sha256"]).read_bytes() == golden.read_bytes()
    fleet.register_device("r", "rpi4")
    fleet.start_rollout("m:3", "all", policy(waves=parse_waves("100")))
    ((_, _, manifests),) = fleet.unpublished_desired()
    assert [m.recipe for m in manifests] == ["golden", "int8"], "golden manifest goes first"
    (out / "broken.golden.npz").write_bytes(b"not a zip")
    with pytest.raises(FleetError, match=r"must be an \.npz"):
        fleet.add_model(NEW, name="m", version="4", golden=out / "broken.golden.npz")


# ----------------------------------------------------------------------------- review cases
def test_rolling_back_an_older_rollout_leaves_devices_a_newer_one_took(fleet_on_old: Fleet) -> None:
    agents = FakeDevices(fleet_on_old)
    one = policy(waves=parse_waves("100"))
    older = fleet_on_old.start_rollout("digits:1", "device:d0,device:d1", one)["id"]
    for device in ("d0", "d1"):
        agents.activate(older, device)
    newer = fleet_on_old.start_rollout("digits:0", "device:d0", one)["id"]
    fleet_on_old.rollouts.rollback(older)
    assert states(fleet_on_old, older) == {"d0": "superseded", "d1": "rolling_back"}
    assert states(fleet_on_old, newer) == {"d0": "pending"}, "the newer rollout keeps its device"


def test_a_newer_rollout_takes_waiting_devices_from_an_older_one(fleet_on_old: Fleet) -> None:
    agents = FakeDevices(fleet_on_old)
    older = fleet_on_old.start_rollout("digits:1", "all", policy())["id"]
    newer = fleet_on_old.start_rollout("digits:0", "all", policy(waves=parse_waves("100")))["id"]
    assert set(states(fleet_on_old, older).values()) == {"superseded"}
    for device in states(fleet_on_old, newer):
        agents.activate(newer, device)
    fleet_on_old.rollouts.tick()
    assert fleet_on_old.deployment(older)["state"] == "completed"
    assert states(fleet_on_old, older) == dict.fromkeys(states(fleet_on_old, older), "superseded")


def test_abort_of_a_device_without_previous_model_and_an_offline_one(
    fleet: Fleet, clock: FakeClock
) -> None:
    fleet.rollouts.clock = clock
    fleet.add_model(NEW, name="m", version="1")
    for device in ("fresh", "gone"):
        fleet.register_device(device, "rpi4")
    ro = fleet.start_rollout("m:1", "all", policy(waves=parse_waves("100"), device_timeout_s=0.05))[
        "id"
    ]
    fleet.rollouts.abort(ro)
    assert states(fleet, ro) == {"fresh": "rolling_back", "gone": "rolling_back"}
    desired = {d: dv for d, dv, _ in fleet.unpublished_desired()}
    assert desired["fresh"].artifact is None, "no previous model: the update is called off"
    publish(fleet)
    # The agent answers an empty desired state from idle; the offline one never answers.
    FakeDevices(fleet).event(ro, "fresh", "update", state="idle", message="already in desired")
    clock.advance(0.1)
    fleet.rollouts.tick()
    assert states(fleet, ro) == {"fresh": "rolled_back", "gone": "rollback_failed"}


def test_a_failure_after_activation_points_the_device_back(fleet_on_old: Fleet) -> None:
    agents = FakeDevices(fleet_on_old)
    old_sha = fleet_on_old.model("digits:0")["artifacts"][0]["sha256"]
    ro = fleet_on_old.start_rollout(
        "digits:1", "device:d0", policy(waves=parse_waves("100"), retries=2)
    )["id"]
    agents.event(ro, "d0", "update", state="active", message="activated")
    agents.event(ro, "d0", "error", stage="active", message="benchmark failed: invoke error")
    row = agents.row(ro, "d0")
    assert row["state"] == "failed" and row["attempts"] == 0
    desired = {d: dv for d, dv, _ in fleet_on_old.unpublished_desired()}
    assert desired["d0"].artifact and desired["d0"].artifact.sha256 == old_sha


def test_one_file_may_serve_two_profiles_but_a_version_never_changes(fleet: Fleet) -> None:
    fleet.add_model(NEW, name="m", version="1", profile="rpi4")
    fleet.add_model(NEW, name="m", version="1", profile="rpi5")
    assert {a["profile"] for a in fleet.model("m:1")["artifacts"]} == {"rpi4", "rpi5"}
    with pytest.raises(FleetError, match=r"m:1 already has a different artifact for profile rpi4"):
        fleet.add_model(OLD, name="m", version="1", profile="rpi4")
    assert len(fleet.model("m:1")["artifacts"]) == 2


def test_deployments_from_before_rollouts_are_completed_by_the_migration(tmp_path: Path) -> None:
    import sqlite3

    from controller.storage.migrations import MIGRATIONS
    from controller.storage.sqlite import SqliteDatabase

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for script in MIGRATIONS[:2]:
        conn.executescript(script)
    conn.execute("INSERT INTO models (id, name, version, created) VALUES (1, 'm', '1', 0)")
    conn.execute("INSERT INTO deployments (id, model_id, target, created) VALUES ('d', 1, 'x', 0)")
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    conn.close()
    db = SqliteDatabase(path)
    row = db.query_one("SELECT state, reason FROM deployments WHERE id = 'd'")
    assert row == {"state": "completed", "reason": "deployed before rollouts existed"}


def test_models_add_refuses_a_file_that_differs_from_its_manifest(
    fleet: Fleet, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "rpi4"
    out.mkdir(parents=True)
    (out / "m.tflite").write_bytes(NEW.read_bytes())
    (out / "m.manifest.json").write_text(json.dumps({
        "schema": "edgefleet.artifact-manifest/v1", "file": "m.tflite", "sha256": "0" * 64,
        "recipe": "int8", "profile": "rpi4", "golden": None,
    }))  # fmt: skip
    with pytest.raises(FleetError, match=f"is not {'0' * 64}"):
        fleet.add_model(tmp_path / "out", name="m", version="1")
    assert fleet.models() == [] and list(fleet.artifacts.root.iterdir()) == []


def test_rollback_to_a_model_the_controller_never_had(fleet: Fleet) -> None:
    """A switched device is told to swap back (command); one not switched yet is cancelled."""
    fleet.add_model(NEW, name="m", version="1")
    foreign = "ab" * 32  # installed by someone else: no artifact row here
    agents = FakeDevices(fleet)
    for device in ("switched", "waiting"):
        fleet.register_device(device, "rpi4")
        agents.status(device, foreign)
    ro = fleet.start_rollout("m:1", "all", policy(waves=parse_waves("100")))["id"]
    agents.activate(ro, "switched")
    fleet.rollouts.rollback(ro)
    assert [(d, c.action) for d, c in fleet.unpublished_commands()] == [("switched", "rollback")]
    desired = {d: dv for d, dv, _ in fleet.unpublished_desired()}
    assert desired["waiting"].artifact is None, "not switched yet: the update is called off"
    assert agents.row(ro, "waiting")["detail"] == "update cancelled"


def test_overflowing_numbers_are_refused_not_taken_as_infinite() -> None:
    with pytest.raises(PolicyError, match="--device-timeout"):
        parse_duration("9" * 400)
    with pytest.raises(PolicyError, match="--device-timeout"):
        parse_duration("1e308h")
    with pytest.raises(PolicyError, match="too large"):
        parse_gate("p95_ms<=" + "9" * 400)

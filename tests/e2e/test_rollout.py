"""Staged rollouts end to end: real controller service, real agent processes, real models."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import Topics
from controller.brokers.base import BrokerHandle
from controller.fleet.rollout.policy import Gate, Policy, Threshold, parse_waves
from tests.conftest import MqttProbeFactory
from tests.e2e.conftest import DATA, AgentProcess, RunningController, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.agent]

OLD, NEW = DATA / "tiny_fp32.tflite", DATA / "tiny_int8.tflite"
DEVICES = ["ro-a", "ro-b", "ro-c"]
TIMEOUT_S = 90


def _sha(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fleet_on_old_model(
    ctl: RunningController, start_agent: Callable[..., AgentProcess], **agent_config: Any
) -> list[AgentProcess]:
    """Three agents serving OLD, each with a benchmark of it (the regression baseline)."""
    agents = [start_agent(d, profile="rpi4", **agent_config) for d in DEVICES]
    wait_until(
        lambda: (
            {d["id"] for d in ctl.fleet.devices() if d["online"] and d["facts"]} >= set(DEVICES)
        ),
        30,
        "hello from every agent",
    )
    dep = ctl.fleet.deploy(OLD, devices=DEVICES, name="digits", version="1")
    wait_until(
        lambda: ctl.fleet.deployment(dep["id"])["counts"] == {"succeeded": 3},
        TIMEOUT_S,
        "the baseline deployment",
    )
    ctl.fleet.add_model(NEW, name="digits", version="2")
    return agents


def _wait_rollout(ctl: RunningController, rollout_id: str, states: set[str]) -> dict[str, Any]:
    """The rollout once it reached one of `states`."""
    return wait_until(
        lambda: (r := ctl.fleet.deployment(rollout_id))["state"] in states and r,
        TIMEOUT_S,
        f"rollout {rollout_id} to reach {states}",
    )


def _serving(ctl: RunningController) -> dict[str, str | None]:
    """Device -> model sha from the retained statuses."""
    return {d["id"]: d["model_sha256"] for d in ctl.fleet.devices() if d["id"] in DEVICES}


def test_rollout_goes_wave_by_wave_and_completes(
    controller: RunningController, start_agent: Callable[..., AgentProcess]
) -> None:
    _fleet_on_old_model(controller, start_agent)
    policy = Policy(
        waves=parse_waves("1d,100"),
        max_failures=Threshold(count=0),
        gates=(Gate("p95_ms", 1000.0), Gate("peak_rss_mb", 2000.0), Gate("p95_regression", 1e6)),
        device_timeout_s=120,
    )
    ro = controller.fleet.start_rollout("digits:2", "profile:rpi4", policy)
    final = _wait_rollout(controller, ro["id"], {"completed", "aborted"})
    assert final["state"] == "completed", final
    assert final["counts"] == {"succeeded": 3}
    assert all("gates passed" in d["detail"] for d in final["devices"]), final["devices"]
    assert all(d["result"]["p95_ms"] > 0 for d in final["devices"])
    wait_until(lambda: set(_serving(controller).values()) == {_sha(NEW)}, 30, "statuses on NEW")
    # Wave 1 started only after wave 0 had its verdict: compare event times in the database.
    (first,) = [d["device_id"] for d in final["devices"] if d["wave"] == 0]
    rows = controller.fleet.db.query(
        "SELECT device_id, kind, state, ts FROM events WHERE deployment_id = ?", (ro["id"],)
    )
    verdict = max(r["ts"] for r in rows if r["device_id"] == first and r["kind"] == "benchmark")
    later = min(r["ts"] for r in rows if r["device_id"] != first)
    assert later >= verdict, "a wave-1 device started before wave 0 was judged"


def test_gate_violation_aborts_and_rolls_back(
    controller: RunningController, start_agent: Callable[..., AgentProcess]
) -> None:
    _fleet_on_old_model(controller, start_agent)
    policy = Policy(
        waves=parse_waves("1d,100"),
        max_failures=Threshold(count=0),
        gates=(Gate("p95_ms", 0.0001),),  # no real model meets a 0.1 µs p95
        device_timeout_s=120,
    )
    ro = controller.fleet.start_rollout("digits:2", "all", policy)
    final = _wait_rollout(controller, ro["id"], {"aborted"})
    assert "1 of 1 executed devices failed" in final["reason"]
    (first,) = [d for d in final["devices"] if d["wave"] == 0]
    assert first["state"] == "gate_failed" and "over 0.0001" in first["detail"]
    assert {d["state"] for d in final["devices"] if d["wave"] == 1} == {"cancelled"}
    # The device that got NEW is back on OLD; the others never left it.
    wait_until(
        lambda: set(_serving(controller).values()) == {_sha(OLD)}, TIMEOUT_S, "all back on OLD"
    )
    touched = {
        r["device_id"]
        for r in controller.fleet.db.query(
            "SELECT device_id FROM events WHERE deployment_id = ?", (ro["id"],)
        )
    }
    assert touched == {first["device_id"]}, "cancelled devices must never see the new model"


def test_egress_is_one_artifact_per_rollout_and_retained_chunks_are_cleared(
    controller: RunningController,
    start_agent: Callable[..., AgentProcess],
    e2e_broker: BrokerHandle,
    mqtt_probe: MqttProbeFactory,
    topic_root: str,
    tmp_path: Path,
) -> None:
    """Chunks are retained on the artifact topic: later waves get them from the broker."""
    _fleet_on_old_model(controller, start_agent)
    big = tmp_path / "padded.tflite"  # a real model padded to 9 chunks; it still loads
    shutil.copyfile(NEW, big)
    with big.open("ab") as fh:
        fh.write(bytes(range(256)) * 2048)
    controller.fleet.add_model(big, name="digits", version="3")
    sha = _sha(big)
    controller.service.retained_sweep_s = 0.5
    before = controller.service.bytes_published
    policy = Policy(waves=parse_waves("1d,2d,100"), device_timeout_s=120)
    ro = controller.fleet.start_rollout("digits:3", "all", policy)
    final = _wait_rollout(controller, ro["id"], {"completed", "aborted"})
    assert final["counts"] == {"succeeded": 3}, final
    egress = controller.service.bytes_published - before
    assert egress < 1.2 * big.stat().st_size, (
        f"3 waves cost {egress} bytes for a {big.stat().st_size}-byte artifact"
    )
    # Once no device needs it, the broker no longer holds the artifact's chunks.
    time.sleep(1.5)
    probe = mqtt_probe(e2e_broker)
    chunks = Topics(topic_root).chunks_filter(sha)
    probe.subscribe(chunks)
    time.sleep(1.0)
    # Filter by topic: amqtt also hands a new subscriber retained messages of other topics.
    held = [m for m in probe.messages(chunks) if m.payload]
    assert held == [], f"{len(held)} retained chunks left on the broker"


def test_nan_model_fails_its_golden_self_test_and_aborts_the_rollout(
    controller: RunningController, start_agent: Callable[..., AgentProcess]
) -> None:
    _fleet_on_old_model(controller, start_agent)
    controller.fleet.add_model(
        DATA / "tiny_nan.tflite", name="digits", version="nan", golden=DATA / "tiny_nan.golden.npz"
    )
    policy = Policy(
        waves=parse_waves("1d,100"), max_failures=Threshold(count=0), retries=2,
        device_timeout_s=120,
    )  # fmt: skip
    ro = controller.fleet.start_rollout("digits:nan", "all", policy)
    final = _wait_rollout(controller, ro["id"], {"aborted"})
    (first,) = [d for d in final["devices"] if d["wave"] == 0]
    assert first["state"] == "failed" and first["stage"] == "self-testing", first
    assert "not finite" in first["detail"] and first["attempts"] == 0, (
        "a self-test verdict is final: no retry"
    )
    assert {d["state"] for d in final["devices"] if d["wave"] == 1} == {"cancelled"}
    wait_until(
        lambda: set(_serving(controller).values()) == {_sha(OLD)}, TIMEOUT_S, "all still on OLD"
    )


def test_a_chunk_that_never_verifies_times_out_is_retried_then_fails(
    controller: RunningController, start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """The controller's copy of the last chunk is corrupt, so it never arrives intact: the
    device times out, the rollout retries it under a new generation, then fails it cleanly."""
    _fleet_on_old_model(controller, start_agent, fetch_timeout_s=4.0, repair_interval_s=0.5)
    big = tmp_path / "padded.tflite"
    shutil.copyfile(NEW, big)
    with big.open("ab") as fh:
        fh.write(bytes(range(256)) * 1024)  # 5 chunks of 64 KiB
    controller.fleet.add_model(big, name="digits", version="4")
    stored = controller.fleet.artifacts.path(_sha(big))
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    policy = Policy(
        waves=parse_waves("100"), max_failures=Threshold(count=5), retries=1,
        device_timeout_s=120,
    )  # fmt: skip
    ro = controller.fleet.start_rollout("digits:4", "device:ro-a", policy)
    final = _wait_rollout(controller, ro["id"], {"completed"})
    (row,) = final["devices"]
    assert row["state"] == "failed" and row["stage"] == "fetching", row
    assert row["attempts"] == 1 and "timed out: 1 of 5 chunks missing" in row["detail"]
    errors = controller.fleet.db.query(
        "SELECT generation FROM events WHERE deployment_id = ? AND device_id = 'ro-a' "
        "AND kind = 'error'",
        (ro["id"],),
    )
    assert len({e["generation"] for e in errors}) == 2, "one failure per attempt"
    assert _serving(controller)["ro-a"] == _sha(OLD), "the device kept serving its model"


def test_rollout_start_wait_exits_0_once_the_real_fleet_completes(
    controller: RunningController, start_agent: Callable[..., AgentProcess]
) -> None:
    """What a CI script does: `rollout start … --wait`, then branch on the exit code."""
    import subprocess
    import sys

    _fleet_on_old_model(controller, start_agent)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "edgefleet"), "rollout", "start", "digits:2",
         "--to", "profile:rpi4", "--waves", "1d,100", "--max-failures", "0",
         "--gate", "p95_ms<=1000", "--wait", "--timeout", str(TIMEOUT_S),
         "--home", str(controller.home)],
        capture_output=True, text=True, timeout=TIMEOUT_S + 60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("rollout ro-"), done.stdout
    assert ": completed" in done.stdout.strip().splitlines()[-1], done.stdout
    assert "done 3/3" in done.stderr, done.stderr
    assert set(_serving(controller).values()) == {_sha(NEW)}

"""Staged rollouts end to end: real controller service, real agent processes, real models."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.policy import Gate, Policy, Threshold, parse_waves
from tests.e2e.conftest import DATA, AgentProcess, RunningController, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.agent]

OLD, NEW = DATA / "tiny_fp32.tflite", DATA / "tiny_int8.tflite"
DEVICES = ["ro-a", "ro-b", "ro-c"]
TIMEOUT_S = 90


def _sha(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fleet_on_old_model(
    ctl: RunningController, start_agent: Callable[..., AgentProcess]
) -> list[AgentProcess]:
    """Three agents serving OLD, each with a benchmark of it (the regression baseline)."""
    agents = [start_agent(d, profile="rpi4") for d in DEVICES]
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

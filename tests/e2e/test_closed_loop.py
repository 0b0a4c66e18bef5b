"""Closed loop end to end: candidates measured by real agents on real models, winner promoted.

A real controller service and real agent processes on mosquitto. The candidates are real .tflite
files (tests/data) registered as `optimize --candidates` writes them; the agents download,
self-test (golden data), activate and benchmark each one on this machine.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.client import InferenceClient, wait_for_service
from controller.fleet.rollout.decide import TIE
from controller.fleet.rollout.policy import Gate, Policy, Threshold, parse_waves
from tests.closed_loop_helpers import MODELS, sha256, write_candidates_dir
from tests.e2e.conftest import DATA, AgentProcess, RunningController, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.agent]

DEVICES = ["cl-a", "cl-b", "cl-c"]
TIMEOUT_S = 150


def _fleet(
    ctl: RunningController, start_agent: Callable[..., AgentProcess], **env: str
) -> list[AgentProcess]:
    """Three rpi4 agents serving tiny_int16x8 (the model the rollout replaces)."""
    agents = []
    for device in DEVICES:
        agents.append(start_agent(device, env=env, profile="rpi4", telemetry_interval_s=1.0))
    wait_until(
        lambda: (
            {d["id"] for d in ctl.fleet.devices() if d["online"] and d["facts"]} >= set(DEVICES)
        ),
        30,
        "hello from every agent",
    )
    dep = ctl.fleet.deploy(
        DATA / "tiny_int16x8.tflite", devices=DEVICES, name="digits", version="1"
    )
    wait_until(
        lambda: ctl.fleet.deployment(dep["id"])["counts"] == {"succeeded": 3},
        TIMEOUT_S,
        "the first deployment",
    )
    return agents


def _completed(ctl: RunningController, rollout_id: str) -> dict:
    """The rollout once it ended, which must be as completed."""
    final = wait_until(
        lambda: (r := ctl.fleet.deployment(rollout_id))["state"] not in ("running", "paused") and r,
        TIMEOUT_S,
        f"rollout {rollout_id} to end",
    )
    assert final["state"] == "completed", json.dumps(final, indent=1, default=str)[:4000]
    return final


@pytest.mark.parametrize("e2e_broker", ["mosquitto"], indirect=True)
def test_candidates_are_measured_on_canaries_and_the_fastest_is_promoted(
    controller: RunningController, start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    _fleet(controller, start_agent)
    out = write_candidates_dir(tmp_path / "opt", "rpi4", [("int8", 1), ("int8", 2), ("fp32", 1)])
    controller.fleet.add_model(out, name="digits", version="2")
    policy = Policy(
        waves=parse_waves("1d,100"), max_failures=Threshold(count=0), device_timeout_s=120,
        gates=(Gate("p95_ms", 1000.0),), candidates=3, canaries=2,
    )  # fmt: skip
    ro = controller.fleet.start_rollout("digits:2", "profile:rpi4", policy)
    assert ro["phase"] == "selecting"
    final = _completed(controller, ro["id"])
    # Two canaries measured each of the three candidates, with the threads each one names.
    trials = final["trials"]
    assert len(trials) == 6 and {t["state"] for t in trials} == {"measured"}, trials
    for t in trials:
        assert t["result"]["threads"] == t["threads"], t
        assert t["result"]["model_sha256"] == t["sha256"] and t["result"]["p95_ms"] > 0
    (decision,) = final["decisions"]
    explanation = decision["explanation"]
    medians = {
        c["rank"]: statistics.median(
            t["result"]["p95_ms"] for t in trials if t["rank"] == c["rank"] and not t["outlier"]
        )
        for c in explanation["candidates"]
        if c["metrics"]
    }
    # The winner's measured p95 is the lowest within the tie band (objective latency).
    assert medians[decision["winner_rank"]] <= min(medians.values()) * (1 + TIE) + 1e-9
    winner = next(c for c in explanation["candidates"] if c["rank"] == decision["winner_rank"])
    assert winner["verdict"] == "won"
    # Every device, canaries included, now serves the winner with the winner's threads.
    assert final["counts"] == {"succeeded": 3}
    assert {d["artifact_sha256"] for d in final["devices"]} == {winner["sha256"]}
    assert {d["threads"] for d in final["devices"]} == {winner["threads"]}
    wait_until(
        lambda: {d["model_sha256"] for d in controller.fleet.devices()} == {winner["sha256"]},
        30,
        "every status on the winner",
    )
    for d in final["devices"]:
        assert d["result"]["threads"] == winner["threads"]


def _fell_back(ctl: RunningController, rollout_id: str, device_id: str) -> dict | None:
    """The device's rollout row once it reported a fallback."""
    rows = ctl.fleet.deployment(rollout_id)["devices"]
    row = next(d for d in rows if d["device_id"] == device_id)
    return row if row["fell_back"] else None


class _Client(threading.Thread):
    """An application calling the agent's inference service until stopped; keeps the shas."""

    def __init__(self, socket_path: Path) -> None:
        """Call the service at socket_path."""
        super().__init__(daemon=True)
        self.socket_path = socket_path
        self.shas: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        """Infer in a loop, remembering which model answered."""
        with InferenceClient(self.socket_path) as client:
            while not self.halt.is_set():
                info = client.model_info()["inputs"][0]
                shape = [1 if d < 0 else d for d in info["shape"]]
                x = np.zeros(shape, dtype=info["dtype"])
                self.shas.append(client.infer_detailed(x).model_sha256)
                time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("e2e_broker", ["mosquitto"], indirect=True)
def test_a_device_over_its_latency_budget_switches_to_the_shipped_fallback(
    controller: RunningController, start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    # fp32 on 2 threads wins on accuracy; int8 on 1 thread needs less energy per inference and
    # ships as the fallback. On every agent, fp32 is slowed by 30 ms per served request.
    fp32 = sha256(MODELS["fp32"])
    agents = _fleet(controller, start_agent, EDGEFLEET_INJECT_LATENCY_MS=f"{fp32[:16]}:30")
    out = write_candidates_dir(
        tmp_path / "opt", "rpi4", [("fp32", 2), ("int8", 1)],
        accuracy_drop={"fp32": 0.0, "int8": 0.5},
    )  # fmt: skip
    controller.fleet.add_model(out, name="digits", version="2")
    policy = Policy(
        waves=parse_waves("100"), max_failures=Threshold(count=0), device_timeout_s=120,
        gates=(Gate("p95_ms", 20.0),), candidates=2, objective="accuracy", fallback=True,
        fallback_window_s=5.0,
    )  # fmt: skip
    ro = controller.fleet.start_rollout("digits:2", "profile:rpi4", policy)
    final = _completed(controller, ro["id"])
    (decision,) = final["decisions"]
    assert (decision["winner_rank"], decision["fallback_rank"]) == (1, 2), decision
    assert {d["artifact_sha256"] for d in final["devices"]} == {fp32}
    # One device serves traffic; its p95 (> 30 ms) breaches the 20 ms budget for 5 s.
    agent = agents[0]
    assert agent.config.socket_path is not None
    wait_for_service(agent.config.socket_path, 10)
    client = _Client(agent.config.socket_path)
    client.start()
    int8 = sha256(MODELS["int8"])
    try:
        row = wait_until(
            lambda: _fell_back(controller, ro["id"], agent.config.device_id),
            60,
            "the fallback event at the controller",
        )
        wait_until(lambda: client.shas and client.shas[-1] == int8, 10, "replies from int8")
    finally:
        client.halt.set()
        client.join(10)
    assert fp32[:12] in row["fell_back"] and int8[:12] in row["fell_back"], row
    assert controller.fleet.device(agent.config.device_id)["model_sha256"] == int8
    others = [d for d in controller.fleet.devices() if d["id"] != agent.config.device_id]
    assert {d["model_sha256"] for d in others} == {fp32}, "idle devices keep the winner"
    # A restart keeps serving the fallback.
    agent.kill()
    agent.start()
    wait_for_service(agent.config.socket_path, 20)
    with InferenceClient(agent.config.socket_path) as c:
        assert c.model_info()["model_sha256"] == int8


@pytest.mark.slow
@pytest.mark.parametrize("e2e_broker", ["mosquitto"], indirect=True)
def test_optimize_candidates_to_the_fleet_and_serve_the_winner(
    controller: RunningController, start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """The whole loop: trained digits CNN → optimize --candidates → trials → winner serves."""
    pytest.importorskip("tensorflow")
    import dataclasses

    import firmware_profiles
    from converters.datasets import Samples
    from converters.digits import digits_keras, load_digits_dataset
    from converters.pipeline import optimize

    data = load_digits_dataset()
    rpi4 = firmware_profiles.load("rpi4")
    narrowed = dataclasses.replace(
        rpi4, quantization=firmware_profiles.Quantization("int8", ("int8", "fp32"))
    )
    out = tmp_path / "opt"
    report = optimize(
        digits_keras(tmp_path / "cache"), [narrowed], calib=data.x_train,
        val=Samples(data.x_val, data.y_val), out_dir=out, candidates=3,
    )  # fmt: skip
    assert report.ok and len(report.profiles[0].candidates) == 3
    agents = [start_agent(d, profile="rpi4") for d in DEVICES[:2]]
    wait_until(lambda: sum(d["online"] for d in controller.fleet.devices()) == 2, 30, "both agents")
    controller.fleet.add_model(out, name="digits", version="3")
    policy = Policy(
        waves=parse_waves("100"), max_failures=Threshold(count=0), device_timeout_s=120,
        candidates=3, canaries=1,
    )  # fmt: skip
    ro = controller.fleet.start_rollout("digits:3", "all", policy)
    final = _completed(controller, ro["id"])
    (decision,) = final["decisions"]
    assert {t["state"] for t in final["trials"]} == {"measured"} and len(final["trials"]) == 3
    assert {d["artifact_sha256"] for d in final["devices"]} == {decision["sha256"]}
    # The promoted artifact answers the application correctly on both devices.
    for agent in agents:
        assert agent.config.socket_path is not None
        wait_for_service(agent.config.socket_path, 10)
        with InferenceClient(agent.config.socket_path) as client:
            wait_until(
                lambda c=client: c.model_info()["model_sha256"] == decision["sha256"],
                30,
                "the winner",
            )
            correct = 0
            for x, y in zip(data.x_val[:100], data.y_val[:100], strict=True):
                out = client.infer(x[None, ...])  # float in: the client quantizes
                correct += int(np.argmax(out) == y)
            assert correct >= 90, f"{correct}/100 digits right on {agent.config.device_id}"

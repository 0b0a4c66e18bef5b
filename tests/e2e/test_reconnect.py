"""Broker loss: agents and controller reconnect with backoff and carry on where they were."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.brokers.base import BrokerHandle
from controller.brokers.mosquitto import start_mosquitto
from tests.e2e.brokers import mosquitto_only  # noqa: F401  (is e2e_broker)
from tests.e2e.conftest import DATA, AgentProcess, RunningController, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.agent]
# e2e_broker is mosquitto only: the test kills mosquitto by PID and restarts it on its port.


def test_agent_and_controller_survive_a_broker_crash(
    e2e_broker: BrokerHandle,
    controller: RunningController,
    start_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    agent = start_agent("dev-x")
    wait_until(
        lambda: controller.fleet.devices() and controller.fleet.device("dev-x")["online"],
        30,
        "hello",
    )
    first = controller.fleet.deploy(DATA / "tiny_fp32.tflite", devices=["dev-x"])
    wait_until(
        lambda: controller.fleet.deployment(first["id"])["devices"][0]["state"] == "succeeded",
        60,
        "first deployment",
    )

    assert e2e_broker.pid is not None
    os.kill(e2e_broker.pid, signal.SIGKILL)  # the broker dies; retained state is gone with it
    wait_until(lambda: not e2e_broker.is_running(), 10, "broker gone")
    restarted = start_mosquitto(e2e_broker.data_dir, port=e2e_broker.port)
    try:
        # The agent reconnects on its own and re-announces itself.
        wait_until(
            lambda: (
                controller.fleet.device("dev-x")["last_seen"]
                and controller.fleet.device("dev-x")["online"]
            ),
            60,
            "agent back",
        )
        second = controller.fleet.deploy(DATA / "tiny_int8.tflite", devices=["dev-x"])
        dep = wait_until(
            lambda: (
                (d := controller.fleet.deployment(second["id"]))["devices"][0]["state"]
                in ("succeeded", "failed")
                and d
            ),
            90,
            "deployment after the broker restart",
        )
        assert dep["devices"][0]["state"] == "succeeded", agent.log()[-3000:]
        assert agent.alive and agent.starts == 1, "no agent restart was needed"
    finally:
        restarted.stop()

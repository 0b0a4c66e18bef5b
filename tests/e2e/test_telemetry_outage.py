"""A 60 s broker outage while an application keeps calling the model: the controller ends with
every telemetry sequence number exactly once (spool on the device, dedupe and resend at the
controller)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.brokers.base import BrokerHandle
from controller.brokers.mosquitto import start_mosquitto
from tests.e2e.brokers import mosquitto_only  # noqa: F401  (is e2e_broker)
from tests.e2e.conftest import AgentProcess, RunningController, wait_until
from tests.e2e.telemetry_app import (
    INTERVAL_S,
    Application,
    serving_agent,
    stored_telemetry,
    telemetry_complete,
)

pytestmark = [pytest.mark.e2e, pytest.mark.agent]
# e2e_broker is mosquitto only: the test kills mosquitto by PID and restarts it on its port.

# The outage: a minute without a broker while applications keep calling the model.
OUTAGE_S = 60.0


@pytest.mark.slow
def test_a_60_s_broker_outage_loses_no_telemetry(
    e2e_broker: BrokerHandle,
    controller: RunningController,
    start_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    # Gaps left by the crash (records the dead broker acknowledged but never delivered) are
    # asked for after 2 s instead of 30 s, so the test does not wait out production timers.
    controller.service.resend_grace_s = 2.0
    controller.service.resend_retry_s = 5.0
    agent = serving_agent(controller, start_agent, "tel-b")
    assert agent.config.socket_path is not None
    app = Application(agent.config.socket_path)
    app.start()
    wait_until(lambda: len(stored_telemetry(controller, "tel-b")[0]) >= 4, 30, "telemetry flowing")

    assert e2e_broker.pid is not None
    os.kill(e2e_broker.pid, signal.SIGKILL)  # with it go its sessions and in-flight messages
    wait_until(lambda: not e2e_broker.is_running(), 10, "broker gone")
    outage_start = time.time()
    before = len(stored_telemetry(controller, "tel-b")[0])
    time.sleep(OUTAGE_S)
    during = app.requests
    restarted = start_mosquitto(e2e_broker.data_dir, port=e2e_broker.port)
    outage_end = time.time()
    try:
        wait_until(lambda: app.requests > during + 100, 30, "service still answering")
        requests = app.finish()
        assert not app.failures, app.failures[:3]
        wait_until(
            lambda: telemetry_complete(controller, "tel-b", requests), 120, "every record stored"
        )
        seqs, served = stored_telemetry(controller, "tel-b")
        assert served == requests
        assert seqs == list(range(1, len(seqs) + 1))  # PRIMARY KEY: each at most once
        during_outage = controller.fleet.db.query(
            "SELECT COUNT(*) AS n FROM telemetry WHERE device_id = ? AND ts BETWEEN ? AND ?",
            ("tel-b", outage_start, outage_end),
        )[0]["n"]
        # One record per interval while the broker was gone, spooled and forwarded later.
        assert during_outage >= 0.8 * OUTAGE_S / INTERVAL_S
        assert len(seqs) > before + during_outage - 1
        gaps = controller.fleet.db.query(
            "SELECT * FROM telemetry_gaps WHERE device_id = ?", ("tel-b",)
        )
        assert not gaps, gaps  # filled gaps are deleted; nothing is missing or lost
        assert agent.alive and agent.starts == 1
    finally:
        restarted.stop()

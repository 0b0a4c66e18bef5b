"""Telemetry end to end: inferences served on the device arrive at the controller exactly once,
through a broker outage too (store-and-forward on the device, dedupe and resend at the controller).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.e2e.conftest import AgentProcess, RunningController, wait_until
from tests.e2e.telemetry_app import Application, serving_agent, telemetry_complete

pytestmark = [pytest.mark.e2e, pytest.mark.agent]


def test_served_inferences_reach_the_controller_exactly_once(
    controller: RunningController, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = serving_agent(controller, start_agent, "tel-a")
    assert agent.config.socket_path is not None
    app = Application(agent.config.socket_path)
    app.start()
    wait_until(lambda: app.requests >= 300, 30, "300 requests answered")
    requests = app.finish()
    assert not app.failures, app.failures[:3]
    wait_until(
        lambda: telemetry_complete(controller, "tel-a", requests), 30, "all requests counted"
    )

    # The deployment's benchmark carries the conditions it ran under.
    bench = controller.fleet.benchmarks("tel-a")[0]
    assert bench["environment"]["threads"] == 1
    assert set(bench["environment"]) >= {"governor", "cpu_freq_mhz", "temperature_c", "delegate"}

    rows = controller.fleet.db.query(
        "SELECT * FROM telemetry WHERE device_id = ? AND served > 0", ("tel-a",)
    )
    sha = controller.fleet.device("tel-a")["model_sha256"]
    assert {r["model_sha256"] for r in rows} == {sha}
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert sum(r[f"b{i}"] for i in range(31)) == r["served"]
        assert r["power_estimated"] == 1 and r["power_w"] > 0  # this VM has no power sensor
        assert r["peak_rss_mb"] >= r["rss_mb"] > 0

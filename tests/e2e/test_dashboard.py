"""The dashboard in real headless Chromium, on the real API, controller, broker and agents."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent.client import wait_for_service
from controller.fleet.rollout.policy import Gate, Policy, Threshold, parse_waves
from tests.closed_loop_helpers import MODELS, sha256, write_candidates_dir
from tests.e2e.brokers import mosquitto_only  # noqa: F401  (is e2e_broker)
from tests.e2e.browser import chromium, require_chromium
from tests.e2e.conftest import DATA, AgentProcess, RunningController, wait_until
from tests.e2e.telemetry_app import Application

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.e2e]
# e2e_broker is mosquitto only: the dashboard does not depend on the broker kind.

OLD, NEW = DATA / "tiny_fp32.tflite", DATA / "tiny_int8.tflite"
AGENTS = ["dash-a", "dash-b", "dash-c"]
# Registered, never connected: it holds the rollout in wave 0, so the buttons meet a live rollout.
OFFLINE = "dash-off"
# Playwright waits (ms): the page polls every 2 s, agents update in seconds.
UI_WAIT_MS = 60_000
TIMEOUT_S = 90


@dataclass
class Dashboard:
    """The HTTP server of a running controller and a Chromium page pointed at it."""

    url: str
    token: str
    page: Page
    shots: Path
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def open(self, fragment: str) -> None:
        """Load the dashboard at `/#<fragment>` (a full page load)."""
        self.page.goto(f"{self.url}/#{fragment}")

    def testid(self, name: str) -> Any:
        """The locator of `[data-testid=name]`."""
        return self.page.get_by_test_id(name)

    def shot(self, name: str) -> Path:
        """A full-page screenshot into the test's output dir; prints its path."""
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON to the API with the admin token (what an operator's script would do)."""
        request = urllib.request.Request(
            f"{self.url}/api/v1{path}",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result


@pytest.fixture
def dashboard(controller: RunningController, tmp_path: Path) -> Iterator[Dashboard]:
    """The API + dashboard on the controller's home, and a fresh Chromium page."""
    require_chromium()
    # Imported here: the slim device env (no FastAPI) still collects this module.
    from playwright.sync_api import expect

    from controller.http.auth import ensure_local_token
    from controller.http.server import HttpServer

    expect.set_options(timeout=UI_WAIT_MS)
    token = ensure_local_token(controller.home)
    server = HttpServer(controller.home).start()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        with chromium() as context:
            page = context.new_page()
            page.set_default_timeout(UI_WAIT_MS)
            board = Dashboard(server.url, token, page, shots)
            page.on("pageerror", lambda exc: board.errors.append(str(exc)))
            page.on("request", lambda request: board.requests.append(request.url))
            yield board
    finally:
        server.stop()


def test_token_from_fragment_login_form_and_401(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect

    page = dashboard.page
    dashboard.open("/")
    expect(dashboard.testid("login")).to_be_visible()
    dashboard.shot("login")
    dashboard.testid("token-input").fill("not-a-token")
    dashboard.testid("login-submit").click()
    expect(dashboard.testid("status")).to_contain_text("Token refused: unknown token")
    expect(dashboard.testid("login")).to_be_visible()
    assert page.evaluate("localStorage.getItem('edgefleet.token')") is None

    dashboard.testid("token-input").fill(dashboard.token)
    dashboard.testid("login-submit").click()
    expect(dashboard.testid("page-overview")).to_be_visible()
    expect(dashboard.testid("count-devices")).to_have_text("0")

    # A token in the fragment is taken into localStorage and removed from the address bar.
    page.evaluate("localStorage.clear()")
    dashboard.open(f"/rollouts&token={dashboard.token}")
    expect(dashboard.testid("page-rollouts")).to_be_visible()
    assert dashboard.token not in page.url and page.url.endswith("#/rollouts")
    assert page.evaluate("localStorage.getItem('edgefleet.token')") == dashboard.token
    dashboard.open(f"token={dashboard.token}")
    expect(dashboard.testid("page-overview")).to_be_visible()
    assert dashboard.token not in page.url
    assert not dashboard.errors, dashboard.errors


def _device_model(dashboard: Dashboard, device: str) -> Any:
    """The overview's model cell of a device."""
    return dashboard.testid(f"device-model-{device}")


def _states(ctl: RunningController, rollout_id: str) -> dict[str, str]:
    """Device -> state in the rollout, from the database."""
    return {d["device_id"]: d["state"] for d in ctl.fleet.deployment(rollout_id)["devices"]}


def test_dashboard_follows_the_fleet_and_aborts_a_rollout(
    controller: RunningController,
    dashboard: Dashboard,
    start_agent: Callable[..., AgentProcess],
) -> None:
    from playwright.sync_api import expect

    fleet, page = controller.fleet, dashboard.page
    dashboard.open(f"token={dashboard.token}")
    expect(dashboard.testid("page-overview")).to_be_visible()
    # Survives only as long as the document does: a reload would drop it.
    page.evaluate("window.__sameDocument = 'yes'")

    # -- overview: devices appear and go online, then change model, without a reload
    fleet.register_device(OFFLINE, "rpi4")
    agents = [start_agent(d, profile="rpi4", telemetry_interval_s=0.5) for d in AGENTS]
    for d in AGENTS:
        expect(dashboard.testid(f"device-online-{d}")).to_have_text("online")
    expect(dashboard.testid(f"device-online-{OFFLINE}")).to_have_text("offline")
    expect(dashboard.testid("count-devices")).to_have_text("4")
    expect(dashboard.testid("profile-count-rpi4")).to_contain_text("4")

    dep = fleet.deploy(OLD, devices=AGENTS, name="digits", version="1")
    wait_until(
        lambda: fleet.deployment(dep["id"])["counts"] == {"succeeded": 3}, TIMEOUT_S, "deploy"
    )
    for d in AGENTS:
        expect(_device_model(dashboard, d)).to_have_text(f"{sha256(OLD)[:12]} digits:1")
    expect(_device_model(dashboard, OFFLINE)).to_have_text("-")

    # Real inferences on dash-a, so its telemetry has latencies to chart.
    socket_path = agents[0].config.socket_path
    assert socket_path is not None
    wait_for_service(socket_path, 10)
    app = Application(socket_path)
    app.start()
    wait_until(lambda: app.requests >= 200, 30, "200 requests answered")
    app.finish()
    assert not app.failures, app.failures[:3]
    dashboard.shot("overview")

    # -- device page: charts from telemetry, benchmark and update history
    page.get_by_test_id("device-row-dash-a").get_by_role("link", name="dash-a").click()
    expect(dashboard.testid("page-device")).to_be_visible()
    expect(dashboard.testid("device-model")).to_have_text(f"{sha256(OLD)[:12]} digits:1")
    expect(dashboard.testid("chart-latency").locator("path.line")).to_have_count(2)
    expect(dashboard.testid("chart-memory").locator("path.line")).to_have_count(1)
    expect(dashboard.testid("chart-power").locator("path.line")).to_have_count(1)
    expect(dashboard.testid("benchmark-table")).to_contain_text(sha256(OLD)[:12])
    expect(dashboard.testid("update-table")).to_contain_text(dep["id"])
    dashboard.shot("device")

    # -- report page: the fleet charts drawn from the agents' telemetry (GET /report/series)
    dashboard.testid("nav-report").click()
    expect(dashboard.testid("page-report")).to_be_visible()
    line = "rpi4 digits:1"  # one line per profile × model: the three agents on digits:1
    latency = dashboard.testid("fleet-chart-latency")
    expect(latency.locator(f'path.line[data-series="{line}"]')).to_have_count(1)
    expect(latency.locator(f'path.line.dashed[data-series="{line} p95"]')).to_have_count(1)
    for chart in ("fleet-chart-power", "fleet-chart-energy"):
        expect(dashboard.testid(chart).locator(f'path.line[data-series="{line}"]')).to_have_count(1)

    def newest_p50_agrees() -> bool:
        """The chart's text alternative names the newest p50 the API returns (3 digits)."""
        served = page.evaluate(
            "async (t) => (await (await fetch('/api/v1/report/series?since=24h', "
            "{headers: {Authorization: 'Bearer ' + t}})).json())",
            dashboard.token,
        )
        (mine,) = [s for s in served["series"] if s["key"] == line]
        if mine["served"] < 200:  # dash-a's answered requests, at least: the agent's
            return False  # last records may still be on their way (closed every interval)
        newest = [p["p50_ms"] for p in mine["points"] if p["p50_ms"] is not None][-1]
        text = latency.locator("svg").get_attribute("aria-label") or ""
        shown = re.search(rf"{re.escape(line)} ([0-9.e+-]+) ms", text)
        return shown is not None and float(shown.group(1)) == pytest.approx(newest, rel=0.01)

    # The page re-reads the series every 15 s: it agrees with the API within that.
    wait_until(
        newest_p50_agrees, 45, "every request in the series, the chart showing its newest p50", 1.0
    )
    expect(dashboard.testid("report-row-rpi4-digits:1")).to_be_visible()
    dashboard.shot("report")

    # -- a rollout started from the page's form, followed and operated from its page
    fleet.add_model(NEW, name="digits", version="2")
    before = {r["id"] for r in fleet.rollouts.list()}
    dashboard.testid("nav-rollouts").click()
    dashboard.testid("start-rollout").click()
    expect(dashboard.testid("start-model")).to_have_value("digits:2")  # the newest version
    dashboard.testid("start-waves").fill("100")
    dashboard.testid("start-gates").fill("p95_ms<=1000")
    dashboard.shot("rollout-start")
    dashboard.testid("start-submit").click()
    expect(dashboard.testid("page-rollout")).to_be_visible()  # the new rollout's page
    (rid,) = {r["id"] for r in fleet.rollouts.list()} - before
    started = fleet.deployment(rid)
    assert started["model"] == "digits:2" and started["policy"]["gates"] == ["p95_ms<=1000"]
    assert started["policy"]["waves"] == ["100%"]
    dashboard.testid("nav-rollouts").click()
    expect(dashboard.testid(f"rollout-state-{rid}")).to_have_text("running")
    dashboard.shot("rollouts")
    page.get_by_test_id(f"rollout-row-{rid}").get_by_role("link", name=rid).click()
    expect(dashboard.testid("page-rollout")).to_be_visible()
    for d in AGENTS:
        expect(dashboard.testid(f"rollout-device-state-{d}")).to_have_text("succeeded")
    in_flight = re.compile(r"^(pending|in_progress)$")
    expect(dashboard.testid(f"rollout-device-state-{OFFLINE}")).to_have_text(in_flight)
    expect(dashboard.testid("rollout-device-dash-a")).to_contain_text("≤ 1000")
    expect(dashboard.testid("rollout-state")).to_have_text("running")
    dashboard.shot("rollout-running")

    dashboard.testid("action-pause").click()
    expect(dashboard.testid("rollout-state")).to_have_text("paused")
    assert fleet.deployment(rid)["state"] == "paused"
    expect(dashboard.testid("action-pause")).to_be_disabled()
    dashboard.testid("action-resume").click()
    expect(dashboard.testid("rollout-state")).to_have_text("running")
    assert fleet.deployment(rid)["state"] == "running"

    page.once("dialog", lambda dialog: dialog.accept())
    dashboard.testid("action-abort").click()
    expect(dashboard.testid("rollout-state")).to_have_text("aborted")
    aborted = fleet.deployment(rid)
    assert aborted["state"] == "aborted" and aborted["reason"] == "aborted by operator"
    states = _states(controller, rid)
    assert all(states[d] in ("rolling_back", "rolled_back") for d in AGENTS), states
    assert not in_flight.match(states[OFFLINE]), states
    # The agents go back to OLD; the page follows the database to the end.
    wait_until(
        lambda: all(_states(controller, rid)[d] == "rolled_back" for d in AGENTS),
        TIMEOUT_S,
        "the agents rolled back",
    )
    for d in AGENTS:
        expect(dashboard.testid(f"rollout-device-state-{d}")).to_have_text("rolled_back")
    expect(dashboard.testid("action-abort")).to_be_disabled()
    expect(dashboard.testid("status")).to_contain_text(f"Abort {rid}: done")
    dashboard.shot("rollout-aborted")

    dashboard.testid("nav-overview").click()
    for d in AGENTS:
        expect(_device_model(dashboard, d)).to_have_text(f"{sha256(OLD)[:12]} digits:1")

    # -- models
    dashboard.testid("nav-models").click()
    expect(dashboard.testid("model-row-digits:2")).to_be_visible()
    dashboard.shot("models")
    page.get_by_test_id("model-row-digits:2").get_by_role("link", name="digits").click()
    expect(dashboard.testid("page-model")).to_be_visible()
    expect(dashboard.testid("variants-*")).to_contain_text(sha256(NEW)[:12])
    dashboard.shot("model")

    assert page.evaluate("window.__sameDocument") == "yes", "the page reloaded"
    # Besides polling, the page followed the change stream (with the token in a header).
    assert f"{dashboard.url}/api/v1/events/stream" in dashboard.requests
    assert not dashboard.errors, dashboard.errors


def test_model_page_explains_the_selection_as_it_happens(
    controller: RunningController,
    dashboard: Dashboard,
    start_agent: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    from playwright.sync_api import expect

    fleet, page = controller.fleet, dashboard.page
    devices = AGENTS[:2]
    for d in devices:
        start_agent(d, profile="rpi4")
    wait_until(
        lambda: {d["id"] for d in fleet.devices() if d["online"] and d["facts"]} >= set(devices),
        30,
        "hello from every agent",
    )
    out = write_candidates_dir(tmp_path / "opt", "rpi4", [("int8", 1), ("fp32", 1)])
    fleet.add_model(out, name="digits", version="2")

    # No change stream here: polling alone must bring the decision onto the open page.
    page.route("**/api/v1/events/stream", lambda route: route.abort())
    dashboard.open(f"/models/digits:2&token={dashboard.token}")
    variants = dashboard.testid("variants-rpi4")
    expect(variants.locator("tbody tr")).to_have_count(2)
    expect(variants.locator("tbody tr").nth(0)).to_contain_text(sha256(MODELS["int8"])[:12])
    expect(variants.locator("tbody tr").nth(1)).to_contain_text(sha256(MODELS["fp32"])[:12])
    expect(variants).to_contain_text("0.200")  # rank 2's host latency (closed_loop_helpers)
    outputs = dashboard.testid("outputs-rpi4")  # every output of every candidate, host numbers
    expect(outputs.locator("tbody tr")).to_have_count(2)
    expect(dashboard.testid("output-rpi4-1-0")).to_contain_text("39.0")
    expect(dashboard.testid("output-rpi4-2-0")).to_contain_text("0 logits")
    expect(dashboard.testid("explain")).to_contain_text("No rollout has measured candidates")
    page.evaluate("window.__sameDocument = 'yes'")

    policy = Policy(
        waves=parse_waves("100"), max_failures=Threshold(count=0), device_timeout_s=120,
        gates=(Gate("p95_ms", 1000.0),), candidates=2, canaries=1,
    )  # fmt: skip
    rid = fleet.start_rollout("digits:2", "profile:rpi4", policy)["id"]
    final = wait_until(
        lambda: (r := fleet.deployment(rid))["state"] not in ("running", "paused") and r,
        TIMEOUT_S,
        "the selection rollout to end",
    )
    assert final["state"] == "completed", final
    (decision,) = final["decisions"]
    winner = next(
        c for c in decision["explanation"]["candidates"] if c["rank"] == decision["winner_rank"]
    )
    # The open page picked the decision up by polling: rollout link, verdicts and the reason.
    explain = dashboard.testid("explain")
    expect(explain).to_contain_text(f"Measured in rollout {rid}")
    shown = dashboard.testid("decision-rpi4")
    expect(shown).to_contain_text(f"rank {decision['winner_rank']} won")
    winner_row = shown.locator("tbody tr.winner")
    expect(winner_row).to_contain_text(winner["label"])
    expect(winner_row).to_contain_text("won")
    expect(winner_row).to_contain_text("Pareto-best on latency")
    assert page.evaluate("window.__sameDocument") == "yes", "the page reloaded"
    dashboard.shot("model-selection")

    # The Pareto chart: one marker per measured candidate, the server's front and winner marked.
    front = set(decision["explanation"]["front"])
    pareto = dashboard.testid("pareto-rpi4")
    expect(pareto.locator("circle.pareto-point")).to_have_count(2)
    for candidate in decision["explanation"]["candidates"]:
        point = dashboard.testid(f"pareto-point-rpi4-{candidate['rank']}")
        expect(point).to_have_attribute("data-front", str(candidate["rank"] in front).lower())
        expect(point).to_have_attribute("data-verdict", candidate["verdict"])
        chosen = candidate["rank"] == decision["winner_rank"]
        expect(point).to_have_attribute("data-chosen", str(chosen).lower())
    expect(pareto.locator("circle.pareto-point.front")).to_have_count(len(front))
    expect(dashboard.testid("pareto-chosen-rpi4")).to_have_count(1)
    expect(pareto).to_contain_text(f"chosen ({winner['label']})")

    page.get_by_role("link", name=rid).click()
    expect(dashboard.testid("trials").locator("tbody tr")).to_have_count(2)
    expect(dashboard.testid("decision-rpi4")).to_contain_text(f"rank {decision['winner_rank']} won")
    dashboard.shot("rollout-selection")
    assert not dashboard.errors, dashboard.errors

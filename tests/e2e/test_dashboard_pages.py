"""Dashboard pages in headless Chromium over a fleet written through the fleet layer:
partial rollout failures, human generation times, the API reference page."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.protocol import Event, Telemetry
from controller.fleet.registry import Fleet
from tests.e2e.browser import chromium, require_chromium
from tests.fleet_rows import activate
from tests.paths import TEST_DATA
from tests.telemetry_records import record

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route

pytestmark = [pytest.mark.e2e]

# Playwright waits (ms): the page polls every 2 s.
UI_WAIT_MS = 30_000
DEVICES = ["p-0", "p-1", "p-2", "p-3"]


@dataclass
class Board:
    """The HTTP server over a fleet with one finished rollout, and a Chromium page."""

    url: str
    token: str
    page: Page
    rollout: str
    errors: list[str] = field(default_factory=list)


def _finished_rollout_with_one_failure(fleet: Fleet) -> str:
    """Roll tiny:1 to 4 devices: 3 activate and benchmark, 1 fails its self-test; completed."""
    pytest.importorskip("fastapi")
    from controller.http.app import RolloutIn

    fleet.add_model(TEST_DATA / "tiny_int8.tflite", name="tiny", version="1")
    for device in DEVICES:
        fleet.register_device(device, "rpi4")
    policy = RolloutIn(model="tiny:1", waves="100", max_failures="5", retries=0).policy()
    rollout: str = fleet.start_rollout("tiny:1", "all", policy)["id"]
    for device in DEVICES[:3]:
        activate(fleet, rollout, device)
    row = next(d for d in fleet.deployment(rollout)["devices"] if d["device_id"] == DEVICES[3])
    fleet.record_event(
        Event(
            device_id=DEVICES[3], event_id=uuid.uuid4().hex, kind="error",
            message="self-test failed: NaN", stage="self-testing", deployment_id=rollout,
            generation=row["generation"],
        )
    )  # fmt: skip
    fleet.rollouts.tick()
    assert fleet.deployment(rollout)["state"] == "completed"
    # Two minutes of served telemetry from the devices that run the model (for the report).
    sha = next(d for d in fleet.deployment(rollout)["devices"])["artifact_sha256"]
    now = time.time()
    fleet.telemetry.ingest_many(
        [
            Telemetry(
                device_id=device,
                records=tuple(record(seq, ts=now - 120 + 10 * seq, sha=sha) for seq in (1, 2, 3)),
            )
            for device in DEVICES[:3]
        ],
        now,
    )
    return rollout


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Board]:
    """A fleet home with the rollout, the API + dashboard, a fresh Chromium page."""
    require_chromium()
    from playwright.sync_api import expect

    from controller.http.auth import ensure_local_token
    from controller.http.server import HttpServer

    expect.set_options(timeout=UI_WAIT_MS)
    home = tmp_path / "home"
    fleet = Fleet(home)
    try:
        rollout = _finished_rollout_with_one_failure(fleet)
    finally:
        fleet.close()
    token = ensure_local_token(home)
    server = HttpServer(home).start()
    try:
        with chromium() as context:
            page = context.new_page()
            page.set_default_timeout(UI_WAIT_MS)
            b = Board(server.url, token, page, rollout)
            page.on("pageerror", lambda exc: b.errors.append(str(exc)))
            yield b
    finally:
        server.stop()


def test_partial_failure_and_generation_times_are_visible(board: Board) -> None:
    from playwright.sync_api import expect

    page = board.page
    page.goto(f"{board.url}/#/rollouts&token={board.token}")
    expect(page.get_by_test_id(f"rollout-state-{board.rollout}")).to_have_text(
        "completed with 1 failed"
    )
    expect(page.get_by_test_id(f"rollout-state-{board.rollout}")).to_have_class(
        "badge state-partial"
    )
    page.goto(f"{board.url}/#/rollouts/{board.rollout}")
    expect(page.get_by_test_id("rollout-state")).to_have_text("completed with 1 failed")
    assert page.get_by_test_id("rollout-state").get_attribute("data-outcome") == "partial"

    # The badge is the API's `outcome`, not a count in the page: an answer whose outcome says
    # otherwise (here rewritten on its way to the browser) is shown as it says.
    def rewrite(route: Route) -> None:
        """Answer with the real rollout, its outcome replaced."""
        answer = route.fetch()
        body = answer.json()
        body["outcome"] = {**body["outcome"], "result": "failed", "label": "from the API"}
        route.fulfill(response=answer, json=body)

    page.route(f"**/api/v1/rollouts/{board.rollout}", rewrite)
    page.reload()
    expect(page.get_by_test_id("rollout-state")).to_have_text("from the API")
    expect(page.get_by_test_id("rollout-state")).to_have_class("badge state-failed")
    page.unroute(f"**/api/v1/rollouts/{board.rollout}")

    page.goto(f"{board.url}/#/devices/p-0")
    # Generations are epoch milliseconds: shown as a UTC time, the raw number as a tooltip.
    desired = page.get_by_test_id("generation-desired")
    expect(desired).to_have_text(re.compile(r"^20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC$"))
    assert (desired.get_attribute("title") or "").startswith("generation 1")
    assert board.errors == []


def test_api_docs_page_renders_the_openapi_document(board: Board) -> None:
    from playwright.sync_api import expect

    page = board.page
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(f"{board.url}/api/v1/docs")
    expect(page.get_by_test_id("api-docs-index")).to_contain_text("GET /api/v1/devices")
    devices = page.get_by_test_id("op-get-/api/v1/devices")
    expect(devices).to_contain_text("One page of devices")
    expect(devices).to_contain_text("limit")
    expect(page.get_by_test_id("op-post-/api/v1/rollouts")).to_contain_text("max_failures")
    # Self-contained: nothing is loaded from another origin.
    assert all(url.startswith(board.url) or url.startswith("data:") for url in requests), requests
    assert board.errors == []


def test_the_report_page_shows_cost_per_profile_and_device(board: Board) -> None:
    from playwright.sync_api import expect

    page = board.page
    page.goto(f"{board.url}/#/report&token={board.token}")
    row = page.get_by_test_id("report-row-rpi4-tiny:1")
    # 3 devices × 3 records × 3 served inferences (the records' default latencies).
    expect(row.locator("td").nth(3)).to_have_text("27")
    expect(row.locator("td").nth(2)).to_have_text("3")
    api_rows = page.evaluate(
        "async (t) => (await (await fetch('/api/v1/report?by=profile&since=24h', "
        "{headers: {Authorization: 'Bearer ' + t}})).json()).rows",
        board.token,
    )
    expect(row.locator("td").nth(5)).to_have_text(f"{api_rows[0]['p95_ms']:.3f}")
    page.get_by_test_id("report-by").select_option("device")
    expect(page.get_by_test_id("report-row-p-0-tiny:1")).to_be_visible()
    expect(page.get_by_test_id("report-row-p-3-tiny:1")).to_have_count(0)
    assert board.errors == []

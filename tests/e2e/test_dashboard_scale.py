"""The overview with 10,000 devices in headless Chromium: renders in under 2 s, finds a device."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from controller.fleet.registry import Fleet
from tests.e2e.browser import chromium, require_chromium
from tests.fleet_rows import insert_devices

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.e2e]

# The acceptance bound for the overview at fleet size (issue 22, "Done when").
DEVICES = 10_000
RENDER_BOUND_S = 2.0
# Playwright waits (ms) for everything that is not the measured load.
UI_WAIT_MS = 30_000


@dataclass
class Board:
    """A dashboard server over a fleet of DEVICES simulated devices, and a Chromium page."""

    url: str
    token: str
    page: Page
    ids: list[str]


@pytest.fixture
def board(tmp_path: Path) -> Iterator[Board]:
    """10,000 device rows written through the fleet's database, the HTTP server, Chromium."""
    require_chromium()
    from playwright.sync_api import expect

    from controller.http.auth import ensure_local_token
    from controller.http.server import HttpServer

    expect.set_options(timeout=UI_WAIT_MS)
    home = tmp_path / "home"
    fleet = Fleet(home)
    try:
        ids = insert_devices(fleet, DEVICES)
    finally:
        fleet.close()
    token = ensure_local_token(home)
    server = HttpServer(home).start()
    try:
        with chromium() as context:
            page = context.new_page()
            page.set_default_timeout(UI_WAIT_MS)
            yield Board(server.url, token, page, ids)
    finally:
        server.stop()


def test_overview_of_10000_devices_renders_fast_and_finds_a_device(board: Board) -> None:
    from playwright.sync_api import expect

    page, errors = board.page, []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Generous to the load, strict on the render: one unmeasured visit warms Chromium's new
    # profile and the server's worker threads (this machine runs several test suites at once),
    # then a full page load of the overview is measured from navigation to the first row.
    page.goto(f"{board.url}/#token={board.token}")
    page.get_by_test_id(f"device-row-{board.ids[0]}").wait_for(state="visible")
    page.goto("about:blank")
    started = time.monotonic()
    page.goto(f"{board.url}/#/")
    page.get_by_test_id(f"device-row-{board.ids[0]}").wait_for(state="visible")
    expect(page.get_by_test_id("count-devices")).to_have_text(str(DEVICES), timeout=1)
    elapsed = time.monotonic() - started
    print(f"overview of {DEVICES} devices rendered in {elapsed:.3f} s (bound {RENDER_BOUND_S} s)")
    assert elapsed < RENDER_BOUND_S, f"overview took {elapsed:.2f} s with {DEVICES} devices"
    expect(page.get_by_test_id("device-paging")).to_have_text("showing 1–50 of 10,000")
    # Only one page of rows is in the DOM, however large the fleet.
    assert page.locator("[data-testid^=device-row-]").count() == 50

    target = board.ids[7345]
    page.get_by_test_id("device-search").fill(target)
    expect(page.get_by_test_id(f"device-row-{target}")).to_be_visible()
    expect(page.get_by_test_id("device-paging")).to_have_text("showing 1 of 1")
    expect(page.get_by_test_id("device-search")).to_be_focused()

    # Filters and paging: offline rpi4 devices, second page.
    page.get_by_test_id("device-search").fill("")
    page.get_by_test_id("filter-online").select_option("false")
    page.get_by_test_id("filter-profile").select_option("rpi4")
    # rpi4 is every third device from 0; every fourth device is offline: i % 12 == 0.
    expect(page.get_by_test_id("device-paging")).to_have_text("showing 1–50 of 834")
    expect(page.get_by_test_id(f"device-row-{board.ids[12]}")).to_be_visible()
    expect(page.get_by_test_id(f"device-online-{board.ids[12]}")).to_have_text("offline")
    page.get_by_test_id("page-next").click()
    expect(page.get_by_test_id("device-paging")).to_have_text("showing 51–100 of 834")
    expect(page.get_by_test_id(f"device-row-{board.ids[50 * 12]}")).to_be_visible()
    assert errors == []

"""Headless Debian Chromium driven by Playwright for dashboard tests (no downloaded browser)."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import running_in_ci

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext

# Debian's chromium package (`make chromium`); `playwright install` is never run.
CHROMIUM = Path("/usr/bin/chromium")
# As root in a container: no sandbox, no GPU; and no background connections, which this
# machine's closed network refuses (Chromium would keep retrying them, slowing every start).
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def require_chromium() -> Path:
    """The Chromium binary; skip when it or playwright is missing, fail instead under CI."""
    missing = []
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} is missing (`make chromium` installs Debian's chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package is missing (pip install -e '.[dev]')")
    if missing:
        reason = "; ".join(missing)
        if running_in_ci():
            pytest.fail(f"{reason}; CI must run the browser tests", pytrace=False)
        pytest.skip(reason)
    return CHROMIUM


@contextmanager
def chromium() -> Iterator[BrowserContext]:
    """A fresh headless Chromium with its own empty user-data-dir, closed and removed after.

    A persistent context is how Playwright takes a user-data-dir (it refuses the flag itself).
    """
    binary = require_chromium()
    from playwright.sync_api import sync_playwright

    profile = Path(tempfile.mkdtemp(prefix="edgefleet-chromium-"))
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(profile),
                executable_path=str(binary),
                headless=True,
                args=list(CHROMIUM_ARGS),
                viewport={"width": 1280, "height": 900},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)

"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The shared converters test cache (trained model, conversions), reused across runs."""
    default = Path(tempfile.gettempdir()) / "edgefleet-test-cache"
    path = Path(os.environ.get("EDGEFLEET_TEST_CACHE") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Where the tests' files are, so a test module reads the same path wherever it sits."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
TEST_DATA = TESTS / "data"

"""A clock tests move by hand, for code that takes an injectable clock (no sleeping in tests)."""

from __future__ import annotations

import time


class FakeClock:
    """Time that starts at the real time (receive times stay comparable) and moves only when a
    test says so."""

    def __init__(self) -> None:
        """Start now."""
        self.t = time.time()

    def __call__(self) -> float:
        """The current fake time."""
        return self.t

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass (instead of sleeping them)."""
        self.t += seconds

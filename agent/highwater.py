"""Anti-rollback high-water marks kept apart from the update state they protect.

`update.json` is rebuilt from scratch when it is corrupt (the device must keep serving), which
used to reset the desired-generation counter to 0 and reopen the door to replays. The highest
accepted desired generation and command counter also live here, in their own small file
written before the message is acted on, so losing either file alone never lowers the bar.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from agent.fsutil import CorruptFileError, atomic_write_json, quarantine, read_json

log = logging.getLogger(__name__)

__all__ = ["HighWater"]

# The marks kept: highest accepted desired generation, highest accepted command counter.
MARKS = ("generation", "command")


class HighWater:
    """Persistent, only-growing counters; a corrupt file is quarantined and `problem` says so."""

    def __init__(self, path: Path) -> None:
        """Load the saved marks (all 0 for a fresh device)."""
        self.path = path
        self.problem: str | None = None
        self._lock = threading.Lock()
        self._marks = dict.fromkeys(MARKS, 0)
        try:
            data = read_json(path, default={})
            if not isinstance(data, dict) or not all(
                isinstance(data.get(k, 0), int) and not isinstance(data.get(k, 0), bool)
                for k in MARKS
            ):
                raise CorruptFileError(f"{path}: expected {{'generation': N, 'command': N}}")
            self._marks.update({k: int(data.get(k, 0)) for k in MARKS})
        except CorruptFileError as exc:
            moved = quarantine(path)
            self.problem = (
                f"{exc}; moved to {moved.name}, anti-rollback marks fall back to update.json"
            )
            log.error("%s", self.problem)

    def get(self, mark: str) -> int:
        """The highest value accepted for `mark`."""
        with self._lock:
            return self._marks[mark]

    def raise_to(self, mark: str, value: int) -> None:
        """Persist `value` as the new mark when it is higher (before the message is acted on)."""
        with self._lock:
            if value <= self._marks[mark]:
                return
            self._marks[mark] = value
            atomic_write_json(self.path, dict(self._marks))

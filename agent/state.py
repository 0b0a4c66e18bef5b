"""The agent's persisted update state machine: one table of transitions, one restore table."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from agent.fsutil import atomic_write_json, read_json

# Allowed transitions (Mender-style): anything else is a bug and raises.
TRANSITIONS: dict[str, frozenset[str]] = {
    "idle": frozenset({"idle", "fetching", "active", "failed"}),
    # An interrupted update is abandoned (idle/active) when the desired state moved back.
    "fetching": frozenset({"verifying", "failed", "fetching", "idle", "active"}),
    "verifying": frozenset({"staged", "failed", "fetching", "idle", "active"}),
    "staged": frozenset({"self-testing", "failed", "fetching", "idle", "active"}),
    "self-testing": frozenset({"active", "failed", "rolled_back", "fetching", "idle"}),
    "active": frozenset({"fetching", "rolled_back", "active", "failed", "idle"}),
    "failed": frozenset({"fetching", "active", "failed", "rolled_back", "idle"}),
    "rolled_back": frozenset({"fetching", "active", "failed", "rolled_back", "idle"}),
}

# What to do after a restart found the agent in each saved state.
RESTORE: dict[str, str] = {
    "idle": "nothing to recover",
    "active": "nothing to recover",
    "failed": "nothing to recover",
    "rolled_back": "nothing to recover",
    "fetching": "resume the download from the chunk bitmap",
    "verifying": "re-verify the assembled file (fetch again if it fails)",
    "staged": "run the self-test again",
    "self-testing": "count a crashed self-test; retry unless the crash-loop guard trips",
}

# A model whose self-test killed the agent this many times is failed, not retried (crash loop).
MAX_SELFTEST_ATTEMPTS = 3

TERMINAL = frozenset({"active", "failed", "rolled_back", "idle"})


class TransitionError(RuntimeError):
    """A transition the state table does not allow."""


@dataclass(frozen=True)
class UpdateRecord:
    """What the agent is doing, persisted before every transition."""

    state: str = "idle"
    deployment_id: str | None = None
    generation: int = 0
    sha256: str | None = None
    applied_generation: int = 0
    selftest_attempts: int = 0
    detail: str = ""
    updated: float = 0.0


class UpdateStateFile:
    """Reads and writes the UpdateRecord with write-temp/fsync/os.replace."""

    def __init__(self, path: Path) -> None:
        """Load the saved record (or a fresh idle one)."""
        self.path = path
        data = read_json(path, default=None)
        self.record = UpdateRecord(**data) if data else UpdateRecord()

    def transition(self, state: str, **changes: object) -> UpdateRecord:
        """Move to `state` (checked against TRANSITIONS) and persist before returning."""
        if state not in TRANSITIONS.get(self.record.state, frozenset()):
            raise TransitionError(f"illegal transition {self.record.state} -> {state}")
        record = replace(self.record, state=state, updated=time.time(), **changes)  # type: ignore[arg-type]
        atomic_write_json(self.path, asdict(record))
        self.record = record
        return record

    def update(self, **changes: object) -> UpdateRecord:
        """Persist field changes without a state change."""
        record = replace(self.record, updated=time.time(), **changes)  # type: ignore[arg-type]
        atomic_write_json(self.path, asdict(record))
        self.record = record
        return record

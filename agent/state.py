"""The agent's persisted update state machine: one table of transitions, one restore table."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from agent.failpoint import FailpointHook
from agent.fsutil import CorruptFileError, atomic_write_json, quarantine, read_json

log = logging.getLogger(__name__)

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
    "active": "re-send the activation and its benchmark unless the broker acknowledged them",
    "failed": "re-send the failure unless the broker acknowledged it",
    "rolled_back": "nothing to recover",
    "fetching": "resume the download from the chunk bitmap",
    "verifying": "re-verify the assembled file (fetch again if it fails)",
    "staged": "run the self-test again",
    "self-testing": "count a crashed self-test; retry unless the crash-loop guard trips",
}

# A model whose self-test killed the agent this many times is failed, not retried (crash loop).
MAX_SELFTEST_ATTEMPTS = 3

TERMINAL = frozenset({"active", "failed", "rolled_back", "idle"})

# Command ids remembered across restarts: far more than a controller has in flight for one
# device, and the file stays ~40 KB.
MAX_SEEN_COMMANDS = 1000


class TransitionError(RuntimeError):
    """A transition the state table does not allow."""


class UpdateFailed(Exception):
    """An update step failed; the message is what the controller and the operator read."""

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        """`stage`: the step that failed when the saved state does not say it (a reload)."""
        super().__init__(message)
        self.stage = stage


class Superseded(Exception):
    """A newer desired generation arrived while this update was running."""


@dataclass(frozen=True)
class ArmedFallback:
    """The desired state's fallback once downloaded and self-tested: what the latency watch arms."""

    sha256: str
    latency_ms: float
    window_s: float
    threads: int | None = None
    # The model it falls back from (the generation's artifact).
    primary_sha256: str | None = None
    # Switched to (serving); then the `fallback` event is re-sent until the broker acknowledges it.
    engaged: bool = False
    reported: bool = False
    message: str = ""
    p95_ms: float = 0.0


_FALLBACK_TYPES: dict[str, tuple[type, ...]] = {
    "sha256": (str,),
    "latency_ms": (int, float),
    "window_s": (int, float),
    "threads": (int, type(None)),
    "primary_sha256": (str, type(None)),
    "engaged": (bool,),
    "reported": (bool,),
    "message": (str,),
    "p95_ms": (int, float),
}


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
    # For `failed`: the state the failure happened in (Event.stage).
    stage: str | None = None
    # The broker acknowledged the terminal event (activated / failed) of `generation`.
    reported: bool = False
    # The broker acknowledged the post-activation benchmark of `generation`.
    benchmarked: bool = False
    # The desired state's benchmark settings, for a benchmark re-run after a restart.
    benchmark_runs: int = 50
    benchmark_warmup: int = 5
    # The model loaded for serving and its interpreter threads (None = the agent's `threads`),
    # so a restart serves it with the same threads. Absent in files of older agents.
    serving_sha256: str | None = None
    serving_threads: int | None = None
    # The armed (or engaged) fallback of `generation` (docs/closed-loop.md, "Fallback variant").
    fallback: ArmedFallback | None = None


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "state": (str,),
    "deployment_id": (str, type(None)),
    "generation": (int,),
    "sha256": (str, type(None)),
    "applied_generation": (int,),
    "selftest_attempts": (int,),
    "detail": (str,),
    "updated": (int, float),
    "stage": (str, type(None)),
    "reported": (bool,),
    "benchmarked": (bool,),
    "benchmark_runs": (int,),
    "benchmark_warmup": (int,),
    "serving_sha256": (str, type(None)),
    "serving_threads": (int, type(None)),
    "fallback": (dict, type(None)),
}


def _typed(fields: dict[str, tuple[type, ...]], key: str, value: Any, where: str) -> Any:
    """`value` if it has one of the field's types (a bool is no int); else CorruptFileError."""
    types = fields[key]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise CorruptFileError(f"{where}: field {key!r} has a bad value {value!r}")
    return value


def _fallback_from_json(data: dict[str, Any], source: str) -> ArmedFallback:
    """Build the ArmedFallback from its saved JSON object, checking every field."""
    where = f"{source}: fallback"
    unknown = set(data) - set(_FALLBACK_TYPES)
    if unknown or "sha256" not in data:
        raise CorruptFileError(f"{where}: unexpected or missing fields {sorted(unknown)}")
    kwargs = {k: _typed(_FALLBACK_TYPES, k, v, where) for k, v in data.items()}
    fallback = ArmedFallback(**kwargs)
    if len(fallback.sha256) != 64 or not fallback.latency_ms > 0 or not fallback.window_s > 0:
        raise CorruptFileError(f"{where}: sha256, latency_ms or window_s out of range")
    return fallback


def record_from_json(data: Any, source: str) -> UpdateRecord:
    """Build an UpdateRecord from saved JSON; CorruptFileError naming the first bad field."""
    if not isinstance(data, dict):
        raise CorruptFileError(f"{source}: expected a JSON object")
    known = {f.name for f in dataclasses.fields(UpdateRecord)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            log.warning("%s: ignoring unknown field %r (written by a newer agent?)", source, key)
            continue
        kwargs[key] = _typed(_FIELD_TYPES, key, value, source)
    if isinstance(kwargs.get("fallback"), dict):
        kwargs["fallback"] = _fallback_from_json(kwargs["fallback"], source)
    record = UpdateRecord(**kwargs)
    if record.state not in TRANSITIONS:
        raise CorruptFileError(f"{source}: unknown state {record.state!r}")
    counters = (record.generation, record.applied_generation, record.selftest_attempts)
    if min(counters) < 0 or record.benchmark_runs < 1 or record.benchmark_warmup < 0:
        raise CorruptFileError(f"{source}: counter out of range")
    if record.serving_threads is not None and record.serving_threads < 1:
        raise CorruptFileError(f"{source}: serving_threads out of range")
    return record


class UpdateStateFile:
    """Reads and writes the UpdateRecord with write-temp/fsync/os.replace."""

    def __init__(self, path: Path) -> None:
        """Load the saved record; a corrupt file is quarantined and `problem` says so."""
        self.path = path
        self.problem: str | None = None
        self._failpoint = FailpointHook(frozenset(TRANSITIONS))
        try:
            data = read_json(path, default=None)
            self.record = record_from_json(data, str(path)) if data is not None else UpdateRecord()
        except CorruptFileError as exc:
            moved = quarantine(path)
            self.problem = f"{exc}; moved to {moved.name}, update state starts afresh"
            log.error("%s", self.problem)
            self.record = UpdateRecord()

    def transition(self, state: str, **changes: object) -> UpdateRecord:
        """Move to `state` (checked against TRANSITIONS) and persist before returning."""
        if state not in TRANSITIONS.get(self.record.state, frozenset()):
            raise TransitionError(f"illegal transition {self.record.state} -> {state}")
        record = replace(self.record, state=state, updated=time.time(), **changes)  # type: ignore[arg-type]
        atomic_write_json(self.path, asdict(record))
        self.record = record
        self._failpoint.after_persist(state)
        return record

    def update(self, **changes: object) -> UpdateRecord:
        """Persist field changes without a state change."""
        record = replace(self.record, updated=time.time(), **changes)  # type: ignore[arg-type]
        atomic_write_json(self.path, asdict(record))
        self.record = record
        return record


class SeenCommands:
    """Ids of the last MAX_SEEN_COMMANDS commands, persisted: a redelivery has one effect."""

    def __init__(self, path: Path, limit: int = MAX_SEEN_COMMANDS) -> None:
        """Load the saved ids; a corrupt file is quarantined and `problem` says so."""
        self.path = path
        self.limit = limit
        self.problem: str | None = None
        ids: list[str] = []
        try:
            data = read_json(path, default={"seen": []})
            seen = data.get("seen") if isinstance(data, dict) else None
            if not isinstance(seen, list) or not all(isinstance(i, str) for i in seen):
                raise CorruptFileError(f"{path}: expected {{'seen': [command ids]}}")
            ids = seen[-limit:]
        except CorruptFileError as exc:
            moved = quarantine(path)
            self.problem = f"{exc}; moved to {moved.name}, remembered command ids are lost"
            log.error("%s", self.problem)
        self._order: deque[str] = deque(ids, maxlen=limit)
        self._ids = set(ids)

    def __contains__(self, command_id: object) -> bool:
        """True when the command already ran."""
        return command_id in self._ids

    def add(self, command_id: str) -> bool:
        """Remember a command id (persisted before returning); False if it was already seen."""
        if command_id in self._ids:
            return False
        if len(self._order) == self._order.maxlen:
            self._ids.discard(self._order[0])
        self._order.append(command_id)
        self._ids.add(command_id)
        atomic_write_json(self.path, {"seen": list(self._order)})
        return True

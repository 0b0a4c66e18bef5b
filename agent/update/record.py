"""The persisted update record (update.json): written before every transition, read at start."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from agent.failpoint import FailpointHook
from agent.fsutil import CorruptFileError, atomic_write_json, quarantine, read_json
from agent.protocol import AgentState, ProtocolError
from agent.protocol.schema import decode_dataclass
from agent.update.table import UpdateEvent, loop_guard, next_state

log = logging.getLogger(__name__)


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

    def __post_init__(self) -> None:
        """Refuse a fallback no desired state could have named."""
        if len(self.sha256) != 64 or not self.latency_ms > 0 or not self.window_s > 0:
            raise ValueError("sha256, latency_ms or window_s out of range")


@dataclass(frozen=True)
class UpdateRecord:
    """What the agent is doing, persisted before every transition."""

    state: AgentState = AgentState.IDLE
    deployment_id: str | None = None
    generation: int = 0
    sha256: str | None = None
    applied_generation: int = 0
    selftest_attempts: int = 0
    detail: str = ""
    updated: float = 0.0
    # For `failed`: the state the failure happened in (Event.stage).
    stage: AgentState | None = None
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
    # States persisted by the update in flight (the state-loop guard, table.loop_guard).
    stores: int = 0

    def __post_init__(self) -> None:
        """Coerce state names to AgentState; refuse counters no agent writes (a damaged file)."""
        object.__setattr__(self, "state", AgentState(self.state))
        if self.stage is not None:
            object.__setattr__(self, "stage", AgentState(self.stage))
        counters = (self.generation, self.applied_generation, self.selftest_attempts, self.stores)
        if min(counters) < 0 or self.benchmark_runs < 1 or self.benchmark_warmup < 0:
            raise ValueError("counter out of range")
        if self.serving_threads is not None and self.serving_threads < 1:
            raise ValueError("serving_threads out of range")


_KNOWN = frozenset(f.name for f in dataclasses.fields(UpdateRecord))


def record_from_json(data: Any, source: str) -> UpdateRecord:
    """Build an UpdateRecord with the protocol's decoder; CorruptFileError naming the bad field.

    Fields an older agent did not write take their defaults; fields of a newer agent are
    ignored with a warning (a downgrade keeps working).
    """
    if isinstance(data, dict):
        for key in sorted(set(data) - _KNOWN):
            log.warning("%s: ignoring unknown field %r (written by a newer agent?)", source, key)
        data = {k: v for k, v in data.items() if k in _KNOWN}
    try:
        return decode_dataclass(data, UpdateRecord)
    except ProtocolError as exc:
        raise CorruptFileError(f"{source}: {exc}") from None


class UpdateStateFile:
    """The UpdateRecord on disk: each event moves it by the state table, persisted atomically."""

    def __init__(self, path: Path) -> None:
        """Load the saved record; a corrupt file is quarantined and `problem` says so."""
        self.path = path
        self.problem: str | None = None
        self._failpoint = FailpointHook(frozenset(s.value for s in AgentState))
        try:
            data = read_json(path, default=None)
            self.record = record_from_json(data, str(path)) if data is not None else UpdateRecord()
        except CorruptFileError as exc:
            moved = quarantine(path)
            self.problem = f"{exc}; moved to {moved.name}, update state starts afresh"
            log.error("%s", self.problem)
            self.record = UpdateRecord()

    def fire(self, event: UpdateEvent, **changes: Any) -> UpdateRecord:
        """Move by the table's row for (state, event), through the loop guard; persist first."""
        record = self.record
        to = next_state(record.state, event)
        same_update = changes.get("generation", record.generation) == record.generation
        stores = loop_guard(record.state, record.stores, to, same_update=same_update)
        record = self._write(replace(record, state=to, stores=stores, **changes))
        self._failpoint.after_persist(to.value)
        return record

    def update(self, **changes: Any) -> UpdateRecord:
        """Persist field changes without a state change."""
        return self._write(replace(self.record, **changes))

    def _write(self, record: UpdateRecord) -> UpdateRecord:
        """Stamp, write (temp file, fsync, os.replace) and adopt `record`."""
        record = replace(record, updated=time.time())
        atomic_write_json(self.path, asdict(record))
        self.record = record
        return record

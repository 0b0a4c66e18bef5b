"""One-shot commands from the controller, each run once per command id (also across restarts)."""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

from agent.fallback import FallbackSwitch
from agent.fsutil import CorruptFileError, atomic_write_json, quarantine, read_json
from agent.loader import ModelLoader
from agent.local_services import LocalServices
from agent.protocol import Command
from agent.reporting import Reporter, derived_event_id
from agent.store import ModelStore
from agent.update.record import UpdateStateFile
from agent.update.table import UpdateEvent

log = logging.getLogger(__name__)

# Command ids remembered across restarts: far more than a controller has in flight for one
# device, and the file stays ~40 KB.
MAX_SEEN_COMMANDS = 1000


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


class CommandDispatcher:
    """Runs `benchmark`, `rollback`, `resend_status` and `resend_telemetry` commands."""

    def __init__(
        self,
        seen: SeenCommands,
        reporter: Reporter,
        local: LocalServices,
        store: ModelStore,
        loader: ModelLoader,
        fallback: FallbackSwitch,
        state: UpdateStateFile,
    ) -> None:
        """Wire the dispatcher to what the commands act on."""
        self.seen = seen
        self.reporter = reporter
        self.local = local
        self.store = store
        self.loader = loader
        self.fallback = fallback
        self.state = state

    def run(self, command: Command) -> None:
        """Run a one-shot command once per command id (remembered across restarts)."""
        if not self.seen.add(command.command_id):
            log.info("ignoring repeated command %s", command.command_id)
            return
        if command.action == "benchmark":
            event_id = derived_event_id(command.command_id, "bench")
            self.reporter.benchmark_and_report(command.runs, command.warmup, event_id=event_id)
        elif command.action == "resend_telemetry":
            # The records themselves are the answer; no "done" event for every gap request.
            self.local.resend(command.seq_ranges)
            return
        elif command.action == "resend_status":
            self.reporter.announce()  # hello + status: the controller may have missed our hello
        elif command.action == "rollback":
            self._rollback(command)
        self.reporter.emit("command", f"{command.action} done", event_id=command.command_id)

    def _rollback(self, command: Command) -> None:
        """Serve `previous` again and record `rolled_back`; refused when there is none."""
        try:
            self.store.rollback()
            self.fallback.disarm()
            self.loader.load_current()
            self.state.fire(UpdateEvent.ROLLBACK, detail=f"rolled back by {command.command_id}")
        except FileNotFoundError as exc:
            self.reporter.emit(
                "error",
                f"rollback refused: {exc}",
                event_id=derived_event_id(command.command_id, "error"),
            )
        self.reporter.publish_status()

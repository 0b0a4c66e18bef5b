"""The agent's work queue: one thread runs desired states, commands and reports in order."""

from __future__ import annotations

import queue
import threading

from agent.fallback import EngageFallback
from agent.protocol import Command, Desired


class ReportOutcome:
    """Work item: send the recorded generation's result if the broker has not acknowledged it."""


WorkItem = Desired | Command | ReportOutcome | EngageFallback


class Inbox:
    """Queued work, the newest desired generation seen, and the stop flag, shared by the parts."""

    def __init__(self) -> None:
        """Empty, nothing seen, running."""
        self.queue: queue.Queue[WorkItem] = queue.Queue()
        self.latest_generation = 0
        self.stopping = threading.Event()

    def put(self, item: WorkItem) -> None:
        """Queue one item for the work thread."""
        self.queue.put(item)

    def put_desired(self, desired: Desired) -> None:
        """Queue a checked desired state; a running update of an older generation yields to it."""
        self.latest_generation = max(self.latest_generation, desired.generation)
        self.queue.put(desired)

    def cancelled(self, desired: Desired) -> bool:
        """True when a newer generation arrived or the agent is stopping."""
        return self.latest_generation > desired.generation or self.stopping.is_set()

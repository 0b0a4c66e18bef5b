"""Telemetry on its own MQTT session, thread and database connection (docs/telemetry.md).

The controller acknowledges a message only after committing it, and the broker delivers one
session's messages in order: what the controller has not taken yet queues in that session.
With one session, a telemetry backlog (10,000 devices send ~1,000 messages/s) queued
every event, status and hello behind it: rollout events waited minutes during a storm
(bench/RESULTS.md, "Telemetry and events during the storm"). Telemetry therefore arrives on a
second persistent session, `<client id>-telemetry`, whose backlog queues apart, and is stored
by a thread of its own with its own connection: the service loop (events, rollouts, chunks)
never waits for it, and the telemetry thread never waits for a rollout tick.

Over mqtts:// the broker may take the username as the client id, so a second session would
take the first one over: there, telemetry stays on the main session (still stored by its own
thread, so the service loop does not wait for it, but queued in the same broker session).
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from agent.protocol import Telemetry
from controller.fleet.registry import Fleet
from controller.runtime.adopt import Acknowledge
from controller.runtime.core import ServiceCore, profiled
from controller.runtime.tuning import MAX_TELEMETRY_BATCH, RESEND_LAG_CAP_S, TELEMETRY_LINGER_S

log = logging.getLogger(__name__)

Inboxed = tuple[str, bytes, Acknowledge | None]


def pipeline_lag_s(messages: list[Telemetry], received: float) -> float | None:
    """How far behind the devices a batch is: the median over its messages of (received -
    the newest record's close time). The median ignores a few skewed clocks and a few devices
    draining an old spool; None for a batch without records."""
    ages = [received - max(r.ts for r in m.records) for m in messages if m.records]
    if not ages:
        return None
    return max(0.0, statistics.median(ages))


class TelemetryIngest(ServiceCore):
    """Telemetry's session and ingest thread (mixed into ControllerService)."""

    def _on_telemetry_connect(self) -> None:
        """Subscribe the telemetry session to every device's telemetry."""
        assert self.telemetry_session is not None
        self.telemetry_session.subscribe(*self._telemetry_filters())

    def _start_telemetry(self) -> None:
        """Start the telemetry thread and, when there is one, its session."""
        self._telemetry_thread = threading.Thread(
            target=profiled,
            args=(self._telemetry_run, ".telemetry"),
            name="edgefleet-telemetry",
            daemon=True,
        )
        self._telemetry_thread.start()
        if self.telemetry_session is not None:
            self.telemetry_session.start()

    def _stop_telemetry(self) -> None:
        """Stop the telemetry thread, then its session (what it did not commit is redelivered)."""
        if self._telemetry_thread is not None:
            self._telemetry_thread.join(timeout=10)
        if self.telemetry_session is not None:
            self.telemetry_session.stop()

    def _telemetry_run(self) -> None:
        """Store telemetry in batches until the service stops; a lost database stops the
        service (nothing uncommitted is acknowledged, so the broker delivers it again)."""
        fleet = Fleet(self.home)
        empty: dict[str, set[int]] = defaultdict(set)
        try:
            while not self._stop.is_set():
                batch = drain(self._telemetry_inbox, 0.05, MAX_TELEMETRY_BATCH, TELEMETRY_LINGER_S)
                if batch:
                    self._ingest_acked(fleet, batch, empty, {})
        except Exception:
            log.exception("telemetry ingest stopped; stopping the controller")
            self._stop.set()
        finally:
            fleet.close()

    def _note_lag(self, messages: list[Telemetry], received: float) -> None:
        """Remember how far behind the devices the last stored batch was (resend grace)."""
        lag = pipeline_lag_s(messages, received)
        if lag is not None:
            self.telemetry_lag_s = lag

    def resend_grace(self) -> float:
        """Grace before a gap is asked for: the configured one plus the current ingest lag,
        because a gap younger than the lag may be our own backlog, not a loss (capped, so a
        fleet with skewed clocks still gets its resends)."""
        return self.resend_grace_s + min(self.telemetry_lag_s, RESEND_LAG_CAP_S)

    def _ingest_acked(
        self,
        fleet: Fleet,
        batch: list[Inboxed],
        needs: dict[str, set[int]],
        first_need: dict[str, float],
    ) -> None:
        """Ingest one batch, then acknowledge it (defined by ControllerService)."""
        raise NotImplementedError


def drain(
    inbox: queue.Queue[Inboxed],
    timeout: float,
    limit: int,
    linger: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Inboxed]:
    """Up to `limit` queued messages, waiting at most `timeout` for the first; with `linger`,
    then that long for more unless `limit` are already queued (one transaction for many)."""
    try:
        batch = [inbox.get(timeout=timeout)]
    except queue.Empty:
        return []
    if linger > 0 and inbox.qsize() < limit - 1:
        sleep(linger)
    while len(batch) < limit:
        try:
            batch.append(inbox.get_nowait())
        except queue.Empty:
            break
    return batch

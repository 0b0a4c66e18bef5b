"""The controller service: ingests device messages, reconciles desired state, serves chunks."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.protocol.transport import acks_batched
from controller.fleet.registry import Fleet
from controller.runtime.adopt import Acknowledge
from controller.runtime.core import profiled
from controller.runtime.inbound import Inbound
from controller.runtime.leadership import Leadership
from controller.runtime.publisher import Publisher
from controller.runtime.tuning import (
    COMPACT_INTERVAL_S,
    RECONCILE_INTERVAL_S,
    RECONCILE_MIN_GAP_S,
    RESEND_CHECK_S,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


class DatabaseUnavailable(RuntimeError):
    """The service loop's database connection is gone for good: the loop stops unacknowledged."""


@dataclass
class _Timers:
    """When the leader last ran each of its passes (monotonic seconds)."""

    next_reconcile: float
    last_reconcile: float
    last_sweep: float
    last_stats: float
    last_resend: float
    last_compact: float

    @classmethod
    def starting(cls, now: float) -> _Timers:
        """Reconcile and compact at once; sweep, stats and resends after their first interval."""
        return cls(0.0, 0.0, now, now, now, 0.0)


class ControllerService(Publisher, Inbound, Leadership):
    """Runs in its own thread: one MQTT session, one database connection, one reconcile loop."""

    def start(self) -> None:
        """Connect and start the service thread."""
        self._thread = threading.Thread(target=self._run, name="edgefleet-controller", daemon=True)
        self._thread.start()
        self._start_telemetry()
        self.session.start()

    @property
    def alive(self) -> bool:
        """True while the service loop runs (`edgefleet up` exits if it died)."""
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> dict[str, Any]:
        """What /healthz and `edgefleet status` report of this process's controller loop.

        Read from other threads: only flags, numbers and timestamps, no database access.
        """
        connected = self.session.connected.is_set()
        now = time.monotonic()
        last = self.last_reconcile_at
        return {
            "running": self.alive,
            "replica": self.name,
            "leader": self.is_leader,
            "broker": {
                "connected": connected,
                "connected_for_s": round(now - self._connected_at, 1) if connected else None,
            },
            "last_reconcile_age_s": None if last is None else round(now - last, 1),
            "errors": self.errors,
        }

    def stop(self) -> None:
        """Stop the loop and disconnect."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        self._stop_telemetry()
        self.session.stop()

    def _run(self) -> None:
        """The service loop (profiled under EDGEFLEET_PROFILE, see `profiled`)."""
        profiled(self._loop, "")

    def _loop(self) -> None:
        """Service loop: drain the inbox in batches, reconcile, publish requested chunks."""
        fleet = Fleet(self.home)
        fleet.rollouts.driver = self.name
        leadership = threading.Thread(
            target=self._lead_forever, args=(time.time(),), name="edgefleet-leadership",
            daemon=True,
        )  # fmt: skip
        leadership.start()
        needs: dict[str, set[int]] = defaultdict(set)
        first_need: dict[str, float] = {}
        timers = _Timers.starting(time.monotonic())
        try:
            while not self._stop.is_set():
                if not fleet.db.healthy():
                    raise DatabaseUnavailable("lost the database connection")
                batch = self._drain(timeout=0.05)
                # Another process (the CLI) committed: its rollout should not wait for the tick.
                dirty = fleet.db.changed_elsewhere() or bool(batch)
                if batch:
                    self._ingest_acked(fleet, batch, needs, first_need)
                if self._republish_after_reconnect(fleet):
                    timers.next_reconcile = 0.0
                self._serve_chunks(fleet, needs, first_need)
                self._kick_newly_revoked()
                if self.is_leader:  # followers ingest only: the leader drives and publishes
                    self._lead_tick(fleet, timers, dirty)
        except Exception:
            log.exception("controller loop crashed")
            raise
        finally:
            self._stop.set()  # the leadership thread too (it releases the lease)
            leadership.join(timeout=10)
            fleet.close()

    def _ingest_acked(
        self,
        fleet: Fleet,
        batch: list[tuple[str, bytes, Acknowledge | None]],
        needs: dict[str, set[int]],
        first_need: dict[str, float],
    ) -> None:
        """Ingest one batch, then acknowledge it; with the database gone, acknowledge nothing."""
        self._ingest(fleet, [(t, p) for t, p, _ in batch], needs, first_need)
        if not fleet.db.healthy():
            # Nothing of the batch may be acknowledged: stop, and the broker delivers it again
            # (to us after a restart, or to the adopting leader).
            raise DatabaseUnavailable(
                f"lost the database connection; {len(batch)} message(s) left "
                "unacknowledged for redelivery"
            )
        with acks_batched():  # one wake-up of paho's network thread per batch
            for _, _, ack in batch:  # processed, or refused as malformed: acknowledge
                if ack is not None:
                    ack()

    def _republish_after_reconnect(self, fleet: Fleet) -> bool:
        """After a (re)connect the leader marks everything unpublished; True when it did."""
        if not self._reconnected.is_set():
            return False
        if not self.is_leader:
            self._reconnected.clear()  # the leader republishes; followers publish nothing
            return False
        # Retained state may be gone (broker restart without persistence): resend.
        try:
            fleet.republish_all()
            self._republished.clear()  # the broker may have lost retained chunks
        except Exception:  # retried on the next iteration
            self.errors += 1
            log.exception("cannot reset the published state")
            return False
        self._reconnected.clear()
        return True

    def _lead_tick(self, fleet: Fleet, timers: _Timers, dirty: bool) -> None:
        """The leader's share of one loop turn: reconcile when due, then the periodic passes."""
        now = time.monotonic()
        due = now >= timers.next_reconcile or (
            dirty and now - timers.last_reconcile >= RECONCILE_MIN_GAP_S
        )
        periodic = (
            now - timers.last_resend >= RESEND_CHECK_S
            or now - timers.last_compact >= COMPACT_INTERVAL_S
            or now - timers.last_sweep >= self.retained_sweep_s
        )
        if (due or periodic) and not self._still_leading(fleet):
            return  # the lease is about to lapse or is gone: publish nothing
        if due:
            timers.last_reconcile = now
            timers.next_reconcile = now + RECONCILE_INTERVAL_S
            try:
                self._reconcile(fleet)
                self.last_reconcile_at = time.monotonic()
            except Exception:  # retried on the next tick; never kills the loop
                self.errors += 1
                log.exception("reconcile failed")
        if time.monotonic() - timers.last_resend >= RESEND_CHECK_S:
            timers.last_resend = time.monotonic()
            self._housekeep(fleet, self._request_resends)
        if time.monotonic() - timers.last_compact >= COMPACT_INTERVAL_S:
            timers.last_compact = time.monotonic()
            self._compact_telemetry(fleet)
        if time.monotonic() - timers.last_stats >= self.stats_interval_s:
            timers.last_stats = time.monotonic()
            self._log_stats()
        if time.monotonic() - timers.last_sweep >= self.retained_sweep_s:
            timers.last_sweep = time.monotonic()
            try:
                self._sweep_retained(fleet)
            except Exception:
                self.errors += 1
                log.exception("clearing retained chunks failed")

    def _log_stats(self) -> None:
        """One INFO line of counters, for operators reading the log."""
        log.info(
            "stats: %d chunk bytes published (%d chunks), %d need messages, %d repairs coalesced, "
            "%d fetching, %d peak fetching, %d telemetry records stored (%d duplicates), "
            "%d resend requests, %d rejected messages, %d errors, telemetry lag %.1f s",
            self.bytes_published,
            self.chunks_published,
            self.needs_received,
            self.repairs_coalesced,
            self.pacer.fetching,
            self.pacer.counters.peak_fetching,
            self.records_stored,
            self.records_duplicate,
            self.resend_requests,
            self.rejected,
            self.errors,
            self.telemetry_lag_s,
        )

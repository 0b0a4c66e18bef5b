"""The controller service: ingests device messages, reconciles desired state, serves chunks."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from agent.mqtt import Ack, MqttSession
from agent.protocol import (
    DEFAULT_ROOT,
    Topics,
)
from controller.fleet.registry import Fleet
from controller.runtime.adopt import Acknowledge, Adoption
from controller.runtime.inbound import Inbound
from controller.runtime.leadership import Leadership
from controller.runtime.lease import Lease
from controller.runtime.pacing import DEFAULT_MAX_FETCHING, DEFAULT_PER_MINUTE, FetchPacer
from controller.runtime.publisher import Publisher
from controller.runtime.tuning import (
    COMPACT_INTERVAL_S,
    CONTROLLER_INFLIGHT,
    RECONCILE_INTERVAL_S,
    RECONCILE_MIN_GAP_S,
    RESEND_CHECK_S,
    RESEND_GRACE_S,
    RESEND_RETRY_S,
    RETAINED_SWEEP_S,
    SHARE_GROUP,
    TELEMETRY_RAW_DAYS,
)

if TYPE_CHECKING:
    from controller.runtime.prometheus import ControllerMetrics

log = logging.getLogger(__name__)


class DatabaseUnavailable(RuntimeError):
    """The service loop's database connection is gone for good: the loop stops unacknowledged."""


class ControllerService(Publisher, Inbound, Leadership):
    """Runs in its own thread: one MQTT session, one database connection, one reconcile loop."""

    def __init__(
        self,
        home: Path,
        broker_url: str,
        *,
        topic_root: str = DEFAULT_ROOT,
        client_id: str = "edgefleet-controller",
        username: str | None = None,
        password: str | None = None,
        stats_interval_s: float = 60.0,
        resend_grace_s: float = RESEND_GRACE_S,
        telemetry_raw_days: float = TELEMETRY_RAW_DAYS,
        metrics: ControllerMetrics | None = None,
        replica: str | None = None,
        max_fetching: int = DEFAULT_MAX_FETCHING,
        fetches_per_minute: float = DEFAULT_PER_MINUTE,
    ) -> None:
        """Prepare the session; start() connects and begins the loop.

        At most `max_fetching` devices download at once and `fetches_per_minute` start a
        download per minute (0 = no limit; controller/runtime/pacing.py).

        With `replica` (a name unique among the replicas), device messages arrive through
        shared subscriptions and only the replica holding the leader lease drives rollouts and
        publishes (docs/storage.md, "Replicas").
        """
        self.home = home
        self.replica = replica
        self.name = replica or "controller"
        self.is_leader = False
        self.leader_terms = 0
        self._lease: Lease | None = None
        self.topics = Topics(topic_root)
        self._inbox: queue.Queue[tuple[str, bytes, Acknowledge | None]] = queue.Queue()
        self._stop = threading.Event()
        self._reconnected = threading.Event()
        self._connected_at = 0.0
        self.ready = threading.Event()
        # The signed fleet-keys message last published retained (key rotation), None = not yet.
        self._keys_published: bytes | None = None
        self.rejected = 0
        self._announce_asked: dict[str, float] = {}
        self.errors = 0
        self.chunks_published = 0
        self.bytes_published = 0
        self._thread: threading.Thread | None = None
        self.retained_sweep_s = RETAINED_SWEEP_S
        self.stats_interval_s = stats_interval_s
        self.resend_grace_s = resend_grace_s
        self.resend_retry_s = RESEND_RETRY_S
        self.telemetry_raw_days = telemetry_raw_days
        self.metrics = metrics
        self.records_stored = 0
        self.records_duplicate = 0
        self.messages = 0
        self.resend_requests = 0
        self.needs_received = 0
        self.repairs_coalesced = 0  # chunks asked for but published within the round already
        # (sha, chunk index) -> when it was last published (retained), for repair coalescing.
        self._republished: dict[tuple[str, int], float] = {}
        self.pacer = FetchPacer(max_fetching, fetches_per_minute)
        # clean_session=False with a fixed client id: the broker queues device events for us
        # while the controller restarts, so a restart loses nothing.
        if replica is not None:
            client_id = f"{client_id}-{replica}"
        self.broker_url = broker_url
        self.client_id = client_id
        self._credentials = (username, password)
        self._adoptions: list[Adoption] = []
        self.adopted_messages = 0
        self.session = MqttSession(
            broker_url,
            client_id,
            # Acknowledged once processed (committed): a crash loses no message, the broker
            # delivers what was not acknowledged again, and the database dedupes it.
            on_acked_message=self._on_message,
            on_connect=self._on_connect,
            username=username,
            password=password,
            clean_session=False,
            max_inflight=CONTROLLER_INFLIGHT,
        )

    def start(self) -> None:
        """Connect and start the service thread."""
        self._thread = threading.Thread(target=self._run, name="edgefleet-controller", daemon=True)
        self._thread.start()
        self.session.start()

    @property
    def alive(self) -> bool:
        """True while the service loop runs (`edgefleet up` exits if it died)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop the loop and disconnect."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        self.session.stop()

    def _on_connect(self) -> None:
        """Subscribe to every device's inbound channels and artifact repair requests."""
        # Status is retained and idempotent: every replica takes every status (shared, a live
        # change would reach one replica; MQTT 5 gives shared subscriptions no retained ones).
        self.session.subscribe(*self._device_filters(), self.topics.all_devices("status"))
        self._connected_at = time.monotonic()
        self._keys_published = None  # retained state may be gone: publish the keys again
        self._reconnected.set()
        self.ready.set()

    def _device_filters(self) -> tuple[str, ...]:
        """What devices send the controller; for replicas, shared: each message to one."""
        t = self.topics
        filters = (
            t.all_devices("hello"),
            t.all_devices("events"),
            t.all_devices("telemetry"),
            t.all_needs(),
        )
        if self.replica is None:
            return filters
        return tuple(f"$share/{SHARE_GROUP}/{f}" for f in filters)

    def _on_message(self, topic: str, payload: bytes, ack: Ack | None = None) -> None:
        """Hand a message to the service thread (paho's thread must not touch the database)."""
        self._inbox.put((topic, payload, ack))

    def counters(self) -> dict[str, int]:
        """This replica's service counters (heartbeat, stats line, benchmarks)."""
        return {
            "records_stored": self.records_stored,
            "records_duplicate": self.records_duplicate,
            "messages": self.messages,
            "chunks_published": self.chunks_published,
            "rejected": self.rejected,
            "errors": self.errors,
            "leader_terms": self.leader_terms,
            "adopted_messages": self.adopted_messages,
            "resend_requests": self.resend_requests,
            "needs_received": self.needs_received,
            "repairs_coalesced": self.repairs_coalesced,
        }

    def _run(self) -> None:
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
        next_reconcile = last_reconcile = 0.0
        last_sweep = last_stats = last_resend = time.monotonic()
        last_compact = 0.0
        try:
            while not self._stop.is_set():
                if not fleet.db.healthy():
                    raise DatabaseUnavailable("lost the database connection")
                batch = self._drain(timeout=0.05)
                # Another process (the CLI) committed: its rollout should not wait for the tick.
                dirty = fleet.db.changed_elsewhere() or bool(batch)
                if batch:
                    self._ingest(fleet, [(t, p) for t, p, _ in batch], needs, first_need)
                    if not fleet.db.healthy():
                        # Nothing of the batch may be acknowledged: stop, and the broker
                        # delivers it again (to us after a restart, or to the adopting leader).
                        raise DatabaseUnavailable(
                            f"lost the database connection; {len(batch)} message(s) left "
                            "unacknowledged for redelivery"
                        )
                    for _, _, ack in batch:  # processed, or refused as malformed: acknowledge
                        if ack is not None:
                            ack()
                if self._reconnected.is_set() and not self.is_leader:
                    self._reconnected.clear()  # the leader republishes; followers publish nothing
                if self._reconnected.is_set():
                    # Retained state may be gone (broker restart without persistence): resend.
                    try:
                        fleet.republish_all()
                        self._republished.clear()  # the broker may have lost retained chunks
                        self._reconnected.clear()
                        next_reconcile = 0.0
                    except Exception:  # retried on the next iteration
                        self.errors += 1
                        log.exception("cannot reset the published state")
                self._serve_chunks(fleet, needs, first_need)
                if not self.is_leader:
                    continue  # ingest only: the leader drives rollouts and publishes
                now = time.monotonic()
                gap = now - last_reconcile
                due = now >= next_reconcile or (dirty and gap >= RECONCILE_MIN_GAP_S)
                periodic = (
                    now - last_resend >= RESEND_CHECK_S
                    or now - last_compact >= COMPACT_INTERVAL_S
                    or now - last_sweep >= self.retained_sweep_s
                )
                if (due or periodic) and not self._still_leading(fleet):
                    continue  # the lease is about to lapse or is gone: publish nothing
                if due:
                    last_reconcile = now
                    next_reconcile = now + RECONCILE_INTERVAL_S
                    try:
                        self._reconcile(fleet)
                    except Exception:  # retried on the next tick; never kills the loop
                        self.errors += 1
                        log.exception("reconcile failed")
                if time.monotonic() - last_resend >= RESEND_CHECK_S:
                    last_resend = time.monotonic()
                    self._housekeep(fleet, self._request_resends)
                if time.monotonic() - last_compact >= COMPACT_INTERVAL_S:
                    last_compact = time.monotonic()
                    self._compact_telemetry(fleet)
                if time.monotonic() - last_stats >= self.stats_interval_s:
                    last_stats = time.monotonic()
                    self._log_stats()
                if time.monotonic() - last_sweep >= self.retained_sweep_s:
                    last_sweep = last_stats = time.monotonic()
                    try:
                        self._sweep_retained(fleet)
                    except Exception:
                        self.errors += 1
                        log.exception("clearing retained chunks failed")
        except Exception:
            log.exception("controller loop crashed")
            raise
        finally:
            self._stop.set()  # the leadership thread too (it releases the lease)
            leadership.join(timeout=10)
            fleet.close()

    def _log_stats(self) -> None:
        """One INFO line of counters, for operators reading the log."""
        log.info(
            "stats: %d chunk bytes published (%d chunks), %d need messages, %d repairs coalesced, "
            "%d fetching, %d peak fetching, %d telemetry records stored (%d duplicates), "
            "%d resend requests, %d rejected messages, %d errors",
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
        )

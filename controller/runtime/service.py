"""The controller service: ingests device messages, reconciles desired state, serves chunks."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.mqtt import Ack, MqttSession
from agent.protocol import (
    DEFAULT_ROOT,
    Command,
    Event,
    Hello,
    Manifest,
    Need,
    ProtocolError,
    Status,
    Telemetry,
    Topics,
    dump,
    parse,
)
from agent.protocol.limits import REPUBLISH_ROUND_S
from controller.fleet.registry import Fleet
from controller.runtime.adopt import Acknowledge, Adoption, dead_replicas, mark_adopted
from controller.runtime.lease import LEASE_TTL_S, RENEW_INTERVAL_S, Lease, heartbeat
from controller.runtime.pacing import DEFAULT_MAX_FETCHING, DEFAULT_PER_MINUTE, FetchPacer
from controller.security.signing import current_fleet_keys
from controller.storage.db import Connection, Database, database_target, open_database

if TYPE_CHECKING:
    from controller.runtime.prometheus import ControllerMetrics

log = logging.getLogger(__name__)


class DatabaseUnavailable(RuntimeError):
    """The service loop's database connection is gone for good: the loop stops unacknowledged."""


# How often desired state is reconciled into retained MQTT messages when nothing happens...
RECONCILE_INTERVAL_S = 0.5
# ...and the shortest gap between reconciles when something did: a CLI commit (seen through
# the database's changed_elsewhere) or an ingested batch that may finish a wave.
RECONCILE_MIN_GAP_S = 0.05
# The MQTT shared-subscription group of controller replicas: each device message reaches one.
SHARE_GROUP = "edgefleet"
# Requests for chunks are gathered this long before publishing, so devices that start together
# share one publication of each chunk (egress ≈ one artifact size per wave, not per device).
NEED_COALESCE_S = 0.25
# (sha, chunk) republish times remembered before old ones are forgotten: bounds the map on a
# controller that runs for months; entries older than REPUBLISH_ROUND_S are useless anyway.
REPUBLISHED_MEMORY = 10_000
# Desired states read per reconcile beyond the pacer's budget: devices whose new desired state
# needs no download slot (no artifact) are published even while the window is full.
PACING_SLACK = 64
# Most messages handled per database transaction: batching keeps SQLite fast under fan-in.
MAX_BATCH = 500
# Ask an unknown device to announce itself at most this often.
ANNOUNCE_RETRY_S = 10.0
# QoS1 publishes in flight: high enough to stream a wave of chunks without stalling on PUBACKs.
CONTROLLER_INFLIGHT = 200
# After a (re)connect, device events queued by the broker arrive first: rollouts do not judge
# timeouts until this long after connecting, or a long outage would fail healthy devices.
TICK_GRACE_S = 3.0
# How often retained chunks of artifacts nobody needs any more are cleared from the broker.
RETAINED_SWEEP_S = 30.0
# Telemetry gaps are asked for again only once they are this old: after an outage a device's
# drain interleaves with its live records, so a young gap usually fills by itself.
RESEND_GRACE_S = 30.0
# An unanswered resend request is repeated after this long (10 times, then the gap is lost).
RESEND_RETRY_S = 60.0
# How often the gap table is checked for resend requests (cheap: one indexed query).
RESEND_CHECK_S = 5.0
# Ranges per resend command: the protocol's cap on Command.seq_ranges.
MAX_RESEND_RANGES = 200
# Raw telemetry is kept this many days, then folded into per-minute aggregates...
TELEMETRY_RAW_DAYS = 7.0
# ...by a compaction pass this often. Each compact() call folds at most 5,000 rows in its own
# transaction (0.1-0.2 s of write lock) and a pass stops after COMPACT_BUDGET_S, so ingest never
# waits long. At 15-40 µs a row, 1 s a minute keeps up with 25k-65k rows a minute: ~4,000-10,000
# devices reporting every 10 s. Larger fleets belong on PostgreSQL with replicas (issue 9).
COMPACT_INTERVAL_S = 60.0
COMPACT_BUDGET_S = 1.0


class ControllerService:
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
        self.pacer = FetchPacer(max_fetching, fetches_per_minute)
        self.repairs_coalesced = 0  # chunks asked for but published within the round already
        # (sha, chunk index) -> when it was last published (retained), for repair coalescing.
        self._republished: dict[tuple[str, int], float] = {}
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

    def _lead_forever(self, started: float) -> None:
        """Leadership thread: every RENEW_INTERVAL_S, renew or take the leader lease and beat
        the heartbeat, on a connection of its own, so a slow batch, reconcile or compaction
        in the service loop never lets the lease lapse. A lost connection is reopened."""
        db: Database | None = None
        try:
            while not self._stop.is_set():
                try:
                    if db is None or not db.healthy():
                        if db is not None:
                            self.is_leader = False
                            db.close()
                            db = None
                        db = open_database(database_target(self.home), migrate=False)
                        self._lease = Lease(db, self.name)
                    assert self._lease is not None
                    self._lead(self._lease, db, started)
                except Exception:  # the database is away: lead again once it answers
                    self.is_leader = False
                    self.errors += 1
                    log.exception("leadership: cannot reach the database")
                self._stop.wait(RENEW_INTERVAL_S)
        finally:
            for adoption in self._adoptions:
                adoption.stop()
            if db is not None:
                try:
                    if self._lease is not None:
                        self._lease.release()  # a clean stop hands over at once, not after TTL
                except Exception:
                    log.exception("cannot release the leader lease")
                db.close()

    def _lead(self, lease: Lease, db: Database, started: float) -> None:
        """Renew or take the leader lease, beat this replica's heartbeat, tend adoptions."""
        try:
            leader = lease.acquire()
        except Exception:  # the database is away: stop leading until it answers again
            self.errors += 1
            log.exception("cannot renew the leader lease")
            leader = False
        if leader and not self.is_leader:
            self.leader_terms += 1
            # Whatever the last leader published may be missing (a broker restart during the
            # handover): publish the fleet's desired state again, as after a reconnect.
            self._reconnected.set()
            log.info("%s leads (term %d): driving rollouts and publishing", self.name, lease.epoch)
        elif self.is_leader and not leader:
            log.warning("%s lost the leader lease: ingesting only", self.name)
        self.is_leader = leader
        try:
            heartbeat(
                db,
                self.name,
                started=started,
                leader=leader,
                stats=self.counters(),
                client_id=self.client_id,
                shared=self.replica is not None,
            )
            self._adopt(db, leader)
        except Exception:
            self.errors += 1
            log.exception("cannot record the heartbeat or adopt a dead replica's session")

    def _adopt(self, db: Database, leader: bool) -> None:
        """Close drained adoptions; as leader, take over dead replicas' sessions (adopt.py)."""
        for adoption in [a for a in self._adoptions if a.done()]:
            adoption.stop()
            self._adoptions.remove(adoption)
            log.info(
                "released the session of replica %s after %d message(s)",
                adoption.replica,
                adoption.messages,
            )
        if not leader or self.replica is None:
            return
        for row in dead_replicas(db, self.name):
            adoption = Adoption(
                self.broker_url,
                row["name"],
                row["client_id"],
                # Its plain status subscription too: else the broker queues every status for
                # the dead session, and a replica coming back would replay stale ones.
                (*self._device_filters(), self.topics.all_devices("status")),
                self._on_message_adopted,
                username=self._credentials[0],
                password=self._credentials[1],
            )
            mark_adopted(db, row["name"], self.name)
            adoption.start()
            self._adoptions.append(adoption)
            log.warning("replica %s stopped beating: adopting its MQTT session", row["name"])

    def _still_leading(self, fleet: Fleet) -> bool:
        """Right before leader-only work: the lease is ours, this term, for at least half its
        TTL more, read from the database, so a leader that stalled past its expiry publishes
        nothing once another replica may have taken over."""
        lease = self._lease
        if not self.is_leader or lease is None:
            return False
        try:
            with fleet.db.transaction(exclusive=False) as tx:
                return lease.held(tx, fleet.db.clock(), margin_s=LEASE_TTL_S / 2)
        except Exception:  # the database is away: not leading (the loop sees it unhealthy)
            self.errors += 1
            log.exception("cannot check the leader lease")
            return False

    def _on_message_adopted(self, topic: str, payload: bytes, ack: Acknowledge | None) -> None:
        """A message a dead replica held: processed here like our own."""
        self.adopted_messages += 1
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

    def _ingest(
        self,
        fleet: Fleet,
        batch: list[tuple[str, bytes]],
        needs: dict[str, set[int]],
        first_need: dict[str, float],
    ) -> None:
        """Apply a batch: the device messages in one exclusive commit (each message a
        savepoint; if the commit itself fails, one by one rather than lose them), then its
        telemetry in a transaction that locks only those devices, so replicas ingest it in
        parallel (docs/storage.md)."""
        self.messages += len(batch)
        telemetry: list[Telemetry] = []
        others: list[tuple[str, bytes]] = []
        for topic, payload in batch:
            if _channel_of(topic) == "telemetry":
                self._handle(fleet, topic, payload, needs, first_need, telemetry)
            else:
                others.append((topic, payload))
        if others:
            try:
                with fleet.db.transaction():
                    self._handle_each(fleet, others, needs, first_need)
            except Exception:
                self.errors += 1
                log.exception("batch of %d messages failed; applying one by one", len(others))
                self._handle_each(fleet, others, needs, first_need)
        if telemetry:
            self._store_telemetry(fleet, telemetry)

    def _handle_each(
        self,
        fleet: Fleet,
        batch: list[tuple[str, bytes]],
        needs: dict[str, set[int]],
        first_need: dict[str, float],
    ) -> None:
        """Handle messages; one bad message never stops the others."""
        for topic, payload in batch:
            try:
                self._handle(fleet, topic, payload, needs, first_need, [])
            except Exception:
                self.errors += 1
                log.exception("failed to handle a message on %s", topic)

    def _store_telemetry(self, fleet: Fleet, messages: list[Telemetry]) -> None:
        """Store a batch's telemetry in one transaction; if that fails, message by message."""
        try:
            results = [fleet.telemetry.ingest_many(messages, time.time())]
        except Exception:
            self.errors += 1
            log.exception(
                "telemetry batch of %d messages failed; storing one by one", len(messages)
            )
            results = []
            for message in messages:
                try:
                    results.append(fleet.telemetry.ingest(message, time.time()))
                except Exception:
                    self.errors += 1
                    log.exception("cannot store telemetry from %s", message.device_id)
        for result in results:
            self.records_stored += result.stored
            self.records_duplicate += result.duplicates
            if self.metrics is not None:
                self.metrics.observe_ingest(result)

    def _drain(self, timeout: float) -> list[tuple[str, bytes, Acknowledge | None]]:
        """Up to MAX_BATCH queued messages, waiting at most `timeout` for the first."""
        try:
            batch = [self._inbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _handle(
        self,
        fleet: Fleet,
        topic: str,
        payload: bytes,
        needs: dict[str, set[int]],
        first_need: dict[str, float],
        telemetry: list[Telemetry],
    ) -> None:
        """Parse and apply one inbound message (telemetry is only parsed and collected);
        reject bad input with a counted log line."""
        try:
            parsed = self.topics.parse(topic)
            if parsed.channel == "hello":
                hello = parse(payload, Hello)
                _same_device(hello.device_id, parsed.ident)
                fleet.record_hello(hello)
            elif parsed.channel == "status":
                if not payload:
                    return  # a cleared retained message
                status = parse(payload, Status)
                _same_device(status.device_id, parsed.ident)
                if not fleet.has_device(status.device_id):
                    self._ask_to_announce(status.device_id)
                fleet.record_status(status)
            elif parsed.channel == "events":
                event = parse(payload, Event)
                _same_device(event.device_id, parsed.ident)
                fleet.record_event(event)
                self.pacer.on_event(event)
            elif parsed.channel == "telemetry":
                message = parse(payload, Telemetry)
                _same_device(message.device_id, parsed.ident)
                telemetry.append(message)
            elif parsed.channel == "need":
                need = parse(payload, Need)
                self.needs_received += 1
                manifest = fleet.manifest(parsed.ident)
                valid = {i for i in need.chunks if 0 <= i < manifest.chunk_count}
                needs[parsed.ident] |= valid
                first_need.setdefault(parsed.ident, time.monotonic())
        except (ProtocolError, ValueError) as exc:
            self.rejected += 1
            if self.metrics is not None:
                self.metrics.observe_rejected(_channel_of(topic))
            log.warning("rejected message on %s: %s", topic, exc)

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

    def _housekeep(self, fleet: Fleet, task: Callable[[Fleet], None]) -> None:
        """Run a periodic task in its own transaction; a failure is counted, never fatal."""
        try:
            with fleet.db.transaction():
                task(fleet)
        except Exception:
            self.errors += 1
            log.exception("%s failed", task.__name__)

    def _request_resends(self, fleet: Fleet) -> None:
        """Ask devices for telemetry records missing longer than the grace period."""
        if not self.session.connected.is_set():
            return
        now = time.time()
        due = fleet.telemetry.due_resends(
            now, grace_s=self.resend_grace_s, retry_s=self.resend_retry_s
        )
        if fleet.telemetry.last_expired:
            log.warning(
                "%d telemetry records marked lost: resends went unanswered",
                fleet.telemetry.last_expired,
            )
            if self.metrics is not None:
                self.metrics.observe_expired(fleet.telemetry.last_expired)
        for device_id, ranges in due.items():
            for start in range(0, len(ranges), MAX_RESEND_RANGES):
                part = tuple(ranges[start : start + MAX_RESEND_RANGES])
                command = Command(
                    command_id=f"resend-{uuid.uuid4().hex[:12]}",
                    action="resend_telemetry",
                    seq_ranges=part,
                )
                self.session.publish(self.topics.cmd(device_id), dump(command))
                fleet.telemetry.mark_requested(device_id, part, now)
                self.resend_requests += 1
                if self.metrics is not None:
                    self.metrics.observe_resend()
                log.info("asked %s to resend %d telemetry range(s)", device_id, len(part))

    def _compact_telemetry(self, fleet: Fleet) -> None:
        """Fold raw telemetry past its retention into per-minute aggregates, for at most
        COMPACT_BUDGET_S (each call is its own short transaction; the rest waits a minute)."""
        folded = 0
        deadline = time.monotonic() + COMPACT_BUDGET_S
        try:
            while time.monotonic() < deadline:
                done = fleet.telemetry.compact(time.time(), raw_days=self.telemetry_raw_days)
                folded += done
                if not done:
                    break
        except Exception:
            self.errors += 1
            log.exception("telemetry compaction failed")
        if folded:
            log.info("compacted %d raw telemetry records into per-minute aggregates", folded)

    def _ask_to_announce(self, device_id: str) -> None:
        """A device we only know from its retained status lost its hello (it connected before
        our first subscription existed): ask it to announce itself again."""
        now = time.monotonic()
        if now - self._announce_asked.get(device_id, -ANNOUNCE_RETRY_S) < ANNOUNCE_RETRY_S:
            return
        self._announce_asked[device_id] = now
        command = Command(command_id=f"announce-{uuid.uuid4().hex[:12]}", action="resend_status")
        self.session.publish(self.topics.cmd(device_id), dump(command))

    def _reconcile(self, fleet: Fleet) -> None:
        """Advance rollouts, then publish the manifests, desired states and commands pending."""
        connected = self.session.connected.is_set()
        if connected and time.monotonic() - self._connected_at >= TICK_GRACE_S:
            lease = self._lease
            if lease is None:
                return

            def fence(tx: Connection) -> bool:
                return lease.held(tx, fleet.db.clock())

            for note in fleet.rollouts.tick(fence=fence):
                log.info("%s", note)
            if not self._still_leading(fleet):
                return  # a takeover may be under way: the new leader publishes
        keys = current_fleet_keys(self.home / "security")
        if keys is not None and keys != self._keys_published:
            # Before any desired state signed with the new key (`edgefleet keys rotate`).
            self.session.publish(self.topics.fleet_keys(), keys, retain=True)
            self._keys_published = keys
            log.info("published the fleet keys (rotation)")
        published_manifests: set[str] = set()
        retained = fleet.chunks_retained()
        in_use: set[str] | None = None
        published: list[tuple[str, int]] = []
        self.pacer.begin()
        budget = self.pacer.budget()
        limit = None if budget is None else budget + PACING_SLACK
        for device_id, desired, manifests in fleet.unpublished_desired(limit):
            downloads = desired.artifact is not None or desired.fallback is not None
            if downloads and not self.pacer.admit(device_id, desired.generation):
                continue  # stays unpublished until a download slot frees up
            try:
                for manifest in manifests:  # the golden blob's manifest before the model's
                    sha = manifest.sha256
                    if sha not in published_manifests:
                        self._publish_manifest(manifest)
                        published_manifests.add(sha)
                    if sha not in retained:
                        in_use = fleet.artifacts_in_use() if in_use is None else in_use
                        if sha in in_use:  # not for devices already up to date (reconnects)
                            self._publish_chunks(fleet, manifest, range(manifest.chunk_count))
                            fleet.set_chunks_retained(sha, True)
                            retained.add(sha)
            except Exception:  # e.g. an artifact file vanished: the rest of the fleet goes on
                self.errors += 1
                log.exception("cannot publish the artifact desired by %s", device_id)
                continue
            self.session.publish(self.topics.desired(device_id), dump(desired), retain=True)
            published.append((device_id, desired.generation))
            log.debug("desired generation %d -> %s", desired.generation, device_id)
        if published:
            fleet.mark_published_many(published)
            log.info("published the desired state of %d device(s)", len(published))
        for device_id, command in fleet.unpublished_commands():
            self.session.publish(self.topics.cmd(device_id), dump(command))
            fleet.mark_command_published(command.command_id)

    def _publish_manifest(self, manifest: Manifest) -> None:
        """Retained manifest, so a device that connects later still finds it."""
        self.session.publish(self.topics.manifest(manifest.sha256), dump(manifest), retain=True)

    def _publish_chunks(self, fleet: Fleet, manifest: Manifest, indices: Iterable[int]) -> None:
        """Publish chunks retained on the artifact's topic: the broker keeps one copy and hands
        it to every device that subscribes, in any wave, so egress is one artifact per rollout."""
        sha = manifest.sha256
        for index in indices:
            data = fleet.artifacts.read_chunk(sha, index, manifest.chunk_size)
            self.session.publish(self.topics.chunk(sha, index), data, retain=True)
            self._republished[(sha, index)] = time.monotonic()
            self.chunks_published += 1
            self.bytes_published += len(data)

    def _serve_chunks(
        self, fleet: Fleet, needs: dict[str, set[int]], first_need: dict[str, float]
    ) -> None:
        """Republish requested chunks once per coalescing window, and each chunk at most once
        per REPUBLISH_ROUND_S after it was last published: within that, the broker still holds
        the retained copy (a broker restart reconnects us, which clears the memory) and serves
        a device's re-subscription itself. A republish is retained on the chunk's own topic,
        so it reaches the devices subscribed to that chunk, the ones missing it."""
        now = time.monotonic()
        due = [sha for sha, t0 in first_need.items() if now - t0 >= NEED_COALESCE_S]
        for sha in due:
            del first_need[sha]
            asked = needs.pop(sha, set())
            indices = sorted(
                i for i in asked if now - self._republished.get((sha, i), -1e9) >= REPUBLISH_ROUND_S
            )
            self.repairs_coalesced += len(asked) - len(indices)
            if not indices:
                continue
            try:
                self._publish_chunks(fleet, fleet.manifest(sha), indices)
                # Repairs are retained too: flag them so the sweep clears them later.
                fleet.set_chunks_retained(sha, True)
            except Exception:  # e.g. the artifact file vanished: log, keep serving the rest
                self.errors += 1
                log.exception("cannot serve chunks of %s", sha[:12])
        if len(self._republished) > REPUBLISHED_MEMORY:
            self._republished = {
                k: t for k, t in self._republished.items() if now - t < REPUBLISH_ROUND_S
            }

    def _sweep_retained(self, fleet: Fleet) -> None:
        """Clear the retained chunks of artifacts no device still has to download."""
        for sha in fleet.chunks_retained() - fleet.artifacts_in_use():
            manifest = fleet.manifest(sha)
            for index in range(manifest.chunk_count):
                self.session.publish(self.topics.chunk(sha, index), b"", retain=True)
            fleet.set_chunks_retained(sha, False)
            log.info("cleared the retained chunks of %s", sha[:12])


def _channel_of(topic: str) -> str:
    """The channel a topic ends in (hello, events, telemetry, need, ...), for metric labels."""
    last = topic.rsplit("/", 1)[-1]
    return last if last.isalpha() else "unknown"


def _same_device(claimed: str, topic_id: str) -> None:
    """A message must be about the device whose topic carries it."""
    if claimed != topic_id:
        raise ProtocolError(f"$.device_id: {claimed!r} does not match topic device {topic_id!r}")

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

from agent.mqtt import MqttSession
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
from controller.fleet import Fleet
from controller.security.signing import current_fleet_keys

if TYPE_CHECKING:
    from controller.prometheus import ControllerMetrics

log = logging.getLogger(__name__)

# How often desired state is reconciled into retained MQTT messages when nothing happens...
RECONCILE_INTERVAL_S = 0.5
# ...and the shortest gap between reconciles when something did: a CLI commit (seen through
# SQLite's data_version) or an ingested batch that may finish a wave.
RECONCILE_MIN_GAP_S = 0.05
# Requests for chunks are gathered this long before publishing, so devices that start together
# share one publication of each chunk (egress ≈ one artifact size per wave, not per device).
NEED_COALESCE_S = 0.25
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
    ) -> None:
        """Prepare the session; start() connects and begins the loop."""
        self.home = home
        self.topics = Topics(topic_root)
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
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
        self.resend_requests = 0
        # clean_session=False with a fixed client id: the broker queues device events for us
        # while the controller restarts, so a restart loses nothing.
        self.session = MqttSession(
            broker_url,
            client_id,
            on_message=self._on_message,
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
        t = self.topics
        self.session.subscribe(
            t.all_devices("hello"),
            t.all_devices("status"),
            t.all_devices("events"),
            t.all_devices("telemetry"),
            t.all_needs(),
        )
        self._connected_at = time.monotonic()
        self._keys_published = None  # retained state may be gone: publish the keys again
        self._reconnected.set()
        self.ready.set()

    def _on_message(self, topic: str, payload: bytes) -> None:
        """Hand a message to the service thread (paho's thread must not touch the database)."""
        self._inbox.put((topic, payload))

    def _run(self) -> None:
        """Service loop: drain the inbox in batches, reconcile, publish requested chunks."""
        fleet = Fleet(self.home)
        needs: dict[str, set[int]] = defaultdict(set)
        first_need: dict[str, float] = {}
        next_reconcile = last_reconcile = 0.0
        last_sweep = last_stats = last_resend = time.monotonic()
        last_compact = 0.0
        data_version = -1
        try:
            while not self._stop.is_set():
                batch = self._drain(timeout=0.05)
                # Another process (the CLI) committed: its rollout should not wait for the tick.
                version = fleet.db.conn.execute("PRAGMA data_version").fetchone()[0]
                dirty = bool(batch) or version != data_version
                data_version = version
                if batch:
                    self._ingest(fleet, batch, needs, first_need)
                if self._reconnected.is_set():
                    # Retained state may be gone (broker restart without persistence): resend.
                    try:
                        fleet.republish_all()
                        self._reconnected.clear()
                        next_reconcile = 0.0
                    except Exception:  # retried on the next iteration
                        self.errors += 1
                        log.exception("cannot reset the published state")
                now = time.monotonic()
                if now >= next_reconcile or (dirty and now - last_reconcile >= RECONCILE_MIN_GAP_S):
                    last_reconcile = now
                    next_reconcile = now + RECONCILE_INTERVAL_S
                    try:
                        self._reconcile(fleet)
                    except Exception:  # retried on the next tick; never kills the loop
                        self.errors += 1
                        log.exception("reconcile failed")
                self._serve_chunks(fleet, needs, first_need)
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
            fleet.close()

    def _ingest(
        self,
        fleet: Fleet,
        batch: list[tuple[str, bytes]],
        needs: dict[str, set[int]],
        first_need: dict[str, float],
    ) -> None:
        """Apply a batch in one commit (each message a savepoint); if the commit itself fails
        (database locked, disk full), apply the messages one by one rather than lose them."""
        try:
            with fleet.db.transaction():
                self._handle_each(fleet, batch, needs, first_need)
        except Exception:
            self.errors += 1
            log.exception("batch of %d messages failed; applying one by one", len(batch))
            self._handle_each(fleet, batch, needs, first_need)

    def _handle_each(
        self,
        fleet: Fleet,
        batch: list[tuple[str, bytes]],
        needs: dict[str, set[int]],
        first_need: dict[str, float],
    ) -> None:
        """Handle messages; one bad message never stops the others. Telemetry is parsed here
        and stored for the whole batch at once (set-based: a few statements per batch)."""
        telemetry: list[Telemetry] = []
        for topic, payload in batch:
            try:
                self._handle(fleet, topic, payload, needs, first_need, telemetry)
            except Exception:
                self.errors += 1
                log.exception("failed to handle a message on %s", topic)
        if telemetry:
            self._store_telemetry(fleet, telemetry)

    def _store_telemetry(self, fleet: Fleet, messages: list[Telemetry]) -> None:
        """Store a batch's telemetry in one savepoint; if that fails, message by message."""
        try:
            with fleet.db.transaction():
                results = [fleet.telemetry.ingest_many(messages, time.time())]
        except Exception:
            self.errors += 1
            log.exception(
                "telemetry batch of %d messages failed; storing one by one", len(messages)
            )
            results = []
            for message in messages:
                try:
                    with fleet.db.transaction():
                        results.append(fleet.telemetry.ingest(message, time.time()))
                except Exception:
                    self.errors += 1
                    log.exception("cannot store telemetry from %s", message.device_id)
        for result in results:
            self.records_stored += result.stored
            self.records_duplicate += result.duplicates
            if self.metrics is not None:
                self.metrics.observe_ingest(result)

    def _drain(self, timeout: float) -> list[tuple[str, bytes]]:
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
            elif parsed.channel == "telemetry":
                message = parse(payload, Telemetry)
                _same_device(message.device_id, parsed.ident)
                telemetry.append(message)
            elif parsed.channel == "need":
                need = parse(payload, Need)
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
            "stats: %d chunk bytes published (%d chunks), %d telemetry records stored "
            "(%d duplicates), %d resend requests, %d rejected messages, %d errors",
            self.bytes_published,
            self.chunks_published,
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
            for note in fleet.rollouts.tick():
                log.info("%s", note)
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
        for device_id, desired, manifests in fleet.unpublished_desired():
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
            self.chunks_published += 1
            self.bytes_published += len(data)

    def _serve_chunks(
        self, fleet: Fleet, needs: dict[str, set[int]], first_need: dict[str, float]
    ) -> None:
        """Publish each requested chunk once per coalescing window, on the artifact's topic."""
        due = [sha for sha, t0 in first_need.items() if time.monotonic() - t0 >= NEED_COALESCE_S]
        for sha in due:
            indices = sorted(needs.pop(sha, set()))
            del first_need[sha]
            try:
                self._publish_chunks(fleet, fleet.manifest(sha), indices)
                # Repairs are retained too: flag them so the sweep clears them later.
                fleet.set_chunks_retained(sha, True)
            except Exception:  # e.g. the artifact file vanished: log, keep serving the rest
                self.errors += 1
                log.exception("cannot serve chunks of %s", sha[:12])

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

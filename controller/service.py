"""The controller service: ingests device messages, reconciles desired state, serves chunks."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

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
    Topics,
    dump,
    parse,
)
from controller.fleet import Fleet

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
# How often retained chunks of artifacts nobody needs any more are cleared from the broker.
RETAINED_SWEEP_S = 30.0


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
    ) -> None:
        """Prepare the session; start() connects and begins the loop."""
        self.home = home
        self.topics = Topics(topic_root)
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._reconnected = threading.Event()
        self.ready = threading.Event()
        self.rejected = 0
        self._announce_asked: dict[str, float] = {}
        self.errors = 0
        self.chunks_published = 0
        self.bytes_published = 0
        self._thread: threading.Thread | None = None
        self.retained_sweep_s = RETAINED_SWEEP_S
        self.stats_interval_s = stats_interval_s
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
            t.all_needs(),
        )
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
        last_sweep = last_stats = time.monotonic()
        data_version = -1
        try:
            while not self._stop.is_set():
                batch = self._drain(timeout=0.05)
                # Another process (the CLI) committed: its rollout should not wait for the tick.
                version = fleet.db.conn.execute("PRAGMA data_version").fetchone()[0]
                dirty = bool(batch) or version != data_version
                data_version = version
                if batch:
                    # One commit per batch (each message is a savepoint): under fan-in from a
                    # thousand devices, a commit per message would be the bottleneck.
                    with fleet.db.transaction():
                        for topic, payload in batch:
                            try:
                                self._handle(fleet, topic, payload, needs, first_need)
                            except Exception:  # a bad message must not stop ingest
                                self.errors += 1
                                log.exception("failed to handle a message on %s", topic)
                if self._reconnected.is_set():
                    # Retained state may be gone (broker restart without persistence): resend.
                    self._reconnected.clear()
                    fleet.republish_all()
                    next_reconcile = 0.0
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
                if time.monotonic() - last_stats >= self.stats_interval_s:
                    last_stats = time.monotonic()
                    log.info(
                        "stats: %d chunk bytes published (%d chunks), %d rejected messages, "
                        "%d errors",
                        self.bytes_published,
                        self.chunks_published,
                        self.rejected,
                        self.errors,
                    )
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
    ) -> None:
        """Parse and apply one inbound message; reject bad input with a counted log line."""
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
            elif parsed.channel == "need":
                need = parse(payload, Need)
                manifest = fleet.manifest(parsed.ident)
                valid = {i for i in need.chunks if 0 <= i < manifest.chunk_count}
                needs[parsed.ident] |= valid
                first_need.setdefault(parsed.ident, time.monotonic())
        except (ProtocolError, ValueError) as exc:
            self.rejected += 1
            log.warning("rejected message on %s: %s", topic, exc)

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
        for note in fleet.rollouts.tick():
            log.info("%s", note)
        published_manifests: set[str] = set()
        retained = fleet.chunks_retained()
        published: list[tuple[str, int]] = []
        for device_id, desired, manifests in fleet.unpublished_desired():
            for manifest in manifests:  # the golden blob's manifest before the model's
                if manifest.sha256 not in published_manifests:
                    self._publish_manifest(manifest)
                    published_manifests.add(manifest.sha256)
                if manifest.sha256 not in retained:
                    self._publish_chunks(fleet, manifest, range(manifest.chunk_count))
                    fleet.set_chunks_retained(manifest.sha256, True)
                    retained.add(manifest.sha256)
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


def _same_device(claimed: str, topic_id: str) -> None:
    """A message must be about the device whose topic carries it."""
    if claimed != topic_id:
        raise ProtocolError(f"$.device_id: {claimed!r} does not match topic device {topic_id!r}")

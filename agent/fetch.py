"""Fetching content-addressed blobs (models, goldens): retained manifest and chunks, repair.

The controller publishes every chunk once, retained (docs/rollouts.md, "Distribution"). A fetch
subscribes `chunks/+` and the broker hands it the retained copies; chunks still missing after
that are re-subscribed one topic each, so the broker re-sends its retained copy to this device
alone. Only a repair round that brings nothing sends a `need` (the broker lost its retained
copies), and rounds back off with jitter, after a reconnect too: no device's repair costs the
other downloading devices anything.

paho's network thread only queues what arrives (`on_manifest`, `on_chunk`); the work thread
verifies and writes chunks (`fetch`), so a slow disk or an fsync never stalls keepalives,
PUBACKs or the delivery of other messages.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.download import ChunkRejected, Download
from agent.protocol import MAX_CHUNK_SIZE, Manifest, Need, ProtocolError, Topics, dump
from agent.protocol.limits import (
    MAX_REPAIR_TOPICS,
    RECONNECT_SPREAD_S,
    REPAIR_BACKOFF_MAX_S,
    REPAIR_JITTER,
)
from agent.protocol.transport import MqttSession
from agent.update.errors import Superseded, UpdateFailed

log = logging.getLogger(__name__)

# Chunks waiting for the work thread: 16 × 128 KiB bounds the buffer at 2 MiB on a small device,
# and is deep enough that the writer (hash + pwrite, ~0.2 ms per 64 KiB) never starves.
CHUNK_QUEUE_DEPTH = 16
# How long paho's thread may wait for room in the queue before it drops a chunk (re-requested
# later): a full queue means the disk is slow, and paho must keep answering pings meanwhile.
CHUNK_QUEUE_PUT_S = 1.0
# The controller publishes chunks retained, so subscribing delivers them without asking: wait
# this long of silence after the last chunk before a repair round (loopback delivers within
# milliseconds, a 300 ms RTT link within one RTT), so devices that join later cost nothing.
RETAINED_SETTLE_S = 0.5


@dataclass
class FetchCounters:
    """What the fetcher saw since start (for logs and tests)."""

    chunks_received: int = 0
    chunks_written: int = 0
    chunks_duplicate: int = 0
    chunks_rejected: int = 0
    chunks_dropped: int = 0
    need_requests: int = 0
    repair_rounds: int = 0  # re-subscriptions of missing chunks (served by the broker)


class Fetcher:
    """Downloads one blob at a time into `directory`, asking for gaps on the `need` topic."""

    def __init__(
        self,
        session: MqttSession,
        topics: Topics,
        device_id: str,
        directory: Path,
        repair_interval_s: float,
    ) -> None:
        """Nothing is subscribed until a fetch starts."""
        self.session = session
        self.topics = topics
        self.device_id = device_id
        self.directory = directory
        self.repair_interval_s = repair_interval_s
        self.counters = FetchCounters()
        self._manifests: dict[str, Manifest] = {}
        # Manifests refused by a security check, by digest: a waiting fetch fails with the reason.
        self._refused: dict[str, str] = {}
        self._manifest_arrived = threading.Condition()
        self._chunks: queue.Queue[tuple[str, int, bytes]] = queue.Queue(CHUNK_QUEUE_DEPTH)
        # Topics a fetch is subscribed to (again after a reconnect), and whose chunks are queued.
        self._subscribed: list[str] = []
        self._accepting: str | None = None
        self._current: Download | None = None
        self._reconnected = threading.Event()  # wakes a fetch waiting through an outage

    # ------------------------------------------------------------------ paho's thread
    def on_manifest(self, manifest: Manifest) -> None:
        """Remember a (retained) manifest and wake a waiting fetch."""
        with self._manifest_arrived:
            self._manifests[manifest.sha256] = manifest
            self._manifest_arrived.notify_all()

    def on_manifest_refused(self, sha256: str, reason: str) -> None:
        """A manifest failed its signature check: fail a fetch waiting for it with `reason`."""
        with self._manifest_arrived:
            self._manifests.pop(sha256, None)
            if self.topics.manifest(sha256) in self._subscribed:  # only the one being awaited
                self._refused[sha256] = reason
            self._manifest_arrived.notify_all()

    def on_chunk(self, sha256: str, index: int, payload: bytes) -> None:
        """Queue one chunk of the blob being downloaded; anything else is ignored."""
        if sha256 != self._accepting or not payload:
            return  # another blob, or the controller clearing a retained chunk
        if len(payload) > MAX_CHUNK_SIZE:
            raise ProtocolError(f"chunk {index} of {len(payload)} bytes exceeds {MAX_CHUNK_SIZE}")
        self.counters.chunks_received += 1
        try:
            self._chunks.put((sha256, index, payload), timeout=CHUNK_QUEUE_PUT_S)
        except queue.Full:
            self.counters.chunks_dropped += 1
            log.warning("chunk %d of %s dropped: writer behind (asked again)", index, sha256[:12])

    def subscriptions(self) -> list[str]:
        """Topics to subscribe again after a reconnect (clean session); logs download progress.

        Not the chunk topics of a download: its work thread re-subscribes the missing ones after
        a random spread (RECONNECT_SPREAD_S), so a fleet reconnecting at once does not ask the
        broker for every retained chunk in the same second.
        """
        download = self._current
        if download is not None:
            self._reconnected.set()
            have = download.manifest.chunk_count - len(download.missing())
            log.info(
                "download %s: reconnected with %d of %d chunks verified",
                download.manifest.sha256[:12],
                have,
                download.manifest.chunk_count,
            )
        return [t for t in self._subscribed if "/chunks/" not in t]

    # ------------------------------------------------------------------ work thread
    def manifest(self, sha256: str, deadline: float, cancelled: Callable[[], bool]) -> Manifest:
        """The retained manifest of `sha256`, read afresh (the controller may have replaced it)."""
        with self._manifest_arrived:
            self._manifests.pop(sha256, None)
            self._refused.pop(sha256, None)
        self._subscribed = [self.topics.manifest(sha256)]
        self.session.subscribe(*self._subscribed)
        try:
            with self._manifest_arrived:
                while sha256 not in self._manifests:
                    if sha256 in self._refused:
                        raise UpdateFailed(f"manifest refused: {self._refused.pop(sha256)}")
                    if cancelled():
                        raise Superseded()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise UpdateFailed(f"manifest for {sha256[:12]} never arrived")
                    self._manifest_arrived.wait(min(remaining, 1.0))
                manifest = self._manifests.pop(sha256)  # read afresh next time: no cache growth
        finally:
            self.session.unsubscribe(*self._subscribed)
            self._subscribed = []
        if manifest.expires is not None and manifest.expires < time.time():
            raise UpdateFailed(f"manifest for {sha256[:12]} expired")
        return manifest

    def fetch(self, manifest: Manifest, deadline: float, cancelled: Callable[[], bool]) -> Download:
        """Assemble the blob from chunks (resuming from the bitmap); raise on timeout or cancel."""
        sha = manifest.sha256
        download = Download(manifest, self.directory)
        total = manifest.chunk_count
        received_before = self.counters.chunks_written
        if download.resumed:
            log.info(
                "download %s: resuming with %d of %d chunks", sha[:12], download.resumed, total
            )
        self._drain_queue()
        self._reconnected.clear()
        self._current = download
        self._accepting = sha
        self._subscribed = [self.topics.chunks_filter(sha)]
        self.session.subscribe(*self._subscribed)
        try:
            self._write_until_quiet(download, deadline, cancelled, RETAINED_SETTLE_S)
            quiet_s = self.repair_interval_s
            barren = 0  # repair rounds in a row that brought nothing
            while True:
                missing = download.missing()
                if not missing:
                    written = self.counters.chunks_written - received_before
                    log.info(
                        "download %s complete: %d of %d chunks fetched now, %d resumed from disk",
                        sha[:12],
                        written,
                        total,
                        download.resumed,
                    )
                    return download
                if time.monotonic() > deadline:
                    raise UpdateFailed(
                        f"download of {sha[:12]} timed out: "
                        f"{len(missing)} of {total} chunks missing"
                    )
                if cancelled():
                    raise Superseded()
                if self.session.connected.is_set():  # offline: the reconnect resumes repair
                    self._repair_round(sha, missing, ask_controller=barren > 0)
                before = len(missing)
                self._write_until_quiet(download, deadline, cancelled, _jittered(quiet_s))
                if self._reconnected.is_set():
                    # Spread the fleet's re-subscribes (the next round re-subscribes the gaps).
                    self._reconnected.clear()
                    self._sleep_unless(cancelled, random.uniform(0.0, RECONNECT_SPREAD_S))
                    quiet_s, barren = self.repair_interval_s, 0
                    continue
                progressed = len(download.missing()) < before
                barren = 0 if progressed else barren + 1
                quiet_s = (
                    self.repair_interval_s
                    if progressed
                    else min(quiet_s * 2, max(REPAIR_BACKOFF_MAX_S, self.repair_interval_s))
                )
        finally:
            self._accepting = None
            self._current = None
            download.flush()  # a retry (same sha, new generation) resumes from every chunk
            self.session.unsubscribe(*self._subscribed)
            self._subscribed = []
            self._drain_queue()

    def _repair_round(self, sha: str, missing: list[int], *, ask_controller: bool) -> None:
        """Re-subscribe the missing chunks' own topics: the broker re-sends its retained copies
        to this device alone. After a round that brought nothing, also ask the controller
        (`need`): the broker has lost them, and a republish reaches only devices missing them."""
        wanted = [self.topics.chunk(sha, i) for i in missing[:MAX_REPAIR_TOPICS]]
        stale = [t for t in self._subscribed if t not in wanted]
        if stale:
            self.session.unsubscribe(*stale)
        self._subscribed = wanted
        self.session.subscribe(*wanted)
        self.counters.repair_rounds += 1
        log.debug(
            "re-subscribing %d of %d missing chunks of %s", len(wanted), len(missing), sha[:12]
        )
        if ask_controller:
            need = Need(device_id=self.device_id, chunks=tuple(missing))
            self.counters.need_requests += 1
            total = self._current.manifest.chunk_count if self._current else len(missing)
            log.debug("asking for %d of %d chunks of %s", len(missing), total, sha[:12])
            self.session.publish(self.topics.need(sha), dump(need))

    def _sleep_unless(self, cancelled: Callable[[], bool], seconds: float) -> None:
        """Wait `seconds` (checking cancellation every 0.2 s)."""
        until = time.monotonic() + seconds
        while not cancelled() and time.monotonic() < until:
            time.sleep(min(0.2, max(0.0, until - time.monotonic())))

    def _write_until_quiet(
        self,
        download: Download,
        deadline: float,
        cancelled: Callable[[], bool],
        quiet_s: float,
    ) -> None:
        """Verify and write queued chunks until done, cancelled, or `quiet_s` of silence."""
        quiet_at = time.monotonic() + quiet_s
        while not download.complete and not cancelled() and not self._reconnected.is_set():
            now = time.monotonic()
            wait = min(quiet_at, deadline) - now
            if wait <= 0:
                return
            try:
                sha, index, data = self._chunks.get(timeout=min(wait, 1.0))
            except queue.Empty:
                continue
            if sha != download.manifest.sha256:
                continue
            try:
                if download.accept(index, data):
                    self.counters.chunks_written += 1
                    quiet_at = time.monotonic() + quiet_s
                else:
                    self.counters.chunks_duplicate += 1
            except ChunkRejected as exc:
                self.counters.chunks_rejected += 1
                log.warning("rejected chunk: %s (will ask again)", exc)

    def _drain_queue(self) -> None:
        """Forget queued chunks (of a download that ended)."""
        while True:
            try:
                self._chunks.get_nowait()
            except queue.Empty:
                return


def _jittered(seconds: float) -> float:
    """`seconds` ± REPAIR_JITTER, so devices that lost the same chunks do not ask in lockstep."""
    return seconds * random.uniform(1.0 - REPAIR_JITTER, 1.0 + REPAIR_JITTER)

"""Artifact download for simulated agents: shared per-process assembly and the chunk fetch.

A simulated agent keeps one bitmap per blob; the bytes of every artifact are written once per
process into a shared temp file (Assembly), hashed once, then dropped. ArtifactFetch is the
fetch half of SimAgent's update state machine (manifest, chunks, repair, offline fault), as
agent/fetch.py is for the daemon, with the same distribution rules (docs/rollouts.md): chunks
come retained through `chunks/+`; after a silence the missing ones are re-subscribed one topic
each (the broker re-sends them to this agent alone); a round that brought nothing also sends a
`need`; rounds back off with jitter, and a reconnect waits a random spread before repairing.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
from typing import TYPE_CHECKING, NamedTuple, cast

from agent.protocol import AgentState, ArtifactRef, Desired, Fallback, Manifest, Need, dump
from agent.protocol.limits import (
    MAX_REPAIR_TOPICS,
    RECONNECT_SPREAD_S,
    REPAIR_BACKOFF_MAX_S,
    REPAIR_JITTER,
)
from controller.simulate.figures import MIB
from controller.simulate.netutil import unread_bytes

if TYPE_CHECKING:
    import random

    from controller.simulate.agent import SimAgent
    from controller.simulate.faults import Faults
    from controller.simulate.loop import Simulation


class Assembly:
    """One artifact assembled once per process from the chunks any simulated agent verified.

    Once its whole-file digest is known the bytes are dropped and only the digest is kept: any
    later assembly of the same manifest would consist of the same verified chunks.
    """

    def __init__(self, manifest: Manifest) -> None:
        """A sparse temp file of the artifact's size (page cache, not RSS, holds the bytes)."""
        self.manifest = manifest
        # Closed by close() once the digest is known or the last user gave up.
        self.file = tempfile.TemporaryFile(prefix="edgefleet-sim-")  # noqa: SIM115
        self.file.truncate(manifest.size)
        self.have = bytearray(manifest.chunk_count)
        self.users = 0
        self.digest: str | None = None

    def put(self, index: int, data: bytes) -> None:
        """Write a verified chunk the first time any agent has it (not once the digest is known)."""
        if self.digest is None and not self.have[index]:
            os.pwrite(self.file.fileno(), data, index * self.manifest.chunk_size)
            self.have[index] = 1

    def verify(self) -> str:
        """The whole file's sha256, computed once; the temp file is closed afterwards."""
        if self.digest is None:
            digest = hashlib.sha256()
            self.file.seek(0)
            while block := self.file.read(MIB):
                digest.update(block)
            self.digest = digest.hexdigest()
            self.close()
        return self.digest

    def close(self) -> None:
        """Release the temp file."""
        self.file.close()


class StoredModel(NamedTuple):
    """A model in a simulated agent's store: what its figures are synthesized from."""

    size: int
    golden: str | None  # sha256 of its golden blob
    recipe: str  # from the manifest: the speed model's recipe key
    threads: int | None  # from the desired state that installed it (None: the default)


class Update:
    """One desired generation being applied by one agent: chunk bitmaps, never the bytes.

    With `fallback`, the artifact fetched is the desired state's fallback, installed next to
    the active model without serving it (controller/simulate/fallback.py).
    """

    __slots__ = (
        "assembly",
        "backoff",
        "blob",
        "deadline",
        "desired",
        "fallback",
        "fetched",
        "have",
        "hold_until",
        "missing",
        "model_manifest",
        "offline_done",
        "prefix",
        "quiet_since",
        "ref",
        "repairing",
        "round_missing",
        "sha",
        "waiting_manifest",
    )

    def __init__(self, desired: Desired, fallback: Fallback | None = None) -> None:
        """Nothing known yet: the model's manifest is the first thing to wait for."""
        ref = fallback.artifact if fallback is not None else desired.artifact
        assert ref is not None
        self.desired = desired
        self.fallback = fallback
        self.ref: ArtifactRef = ref
        self.sha = ref.sha256
        self.deadline = 0.0
        self.waiting_manifest: str | None = None
        self.model_manifest: Manifest | None = None
        # The blob whose chunks are arriving (the model, then its golden), and its bitmap.
        self.blob: Manifest | None = None
        self.prefix = ""
        self.have = bytearray()
        self.missing = 0
        self.assembly: Assembly | None = None
        self.fetched: list[Assembly] = []
        self.quiet_since = time.monotonic()
        self.offline_done = False
        # Repair state: chunk indices subscribed one by one (None: on `chunks/+`), the current
        # wait between rounds, `missing` at the last round (-1: none yet) and, after a
        # reconnect, the spread time before which no round starts.
        self.repairing: tuple[int, ...] | None = None
        self.backoff = 0.0
        self.round_missing = -1
        self.hold_until = 0.0


class ArtifactFetch:
    """The fetch half of a simulated agent's update: manifests, chunks, repair, offline fault."""

    # The update in progress lives here; SimAgent declares every other slot.
    __slots__ = ("update",)
    update: Update | None

    if TYPE_CHECKING:
        sim: Simulation
        device_id: str
        fd: int | None
        faults: Faults
        rng: random.Random | None
        connected: bool
        models: dict[str, StoredModel]

        def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int: ...
        def subscribe(self, *topics: str) -> None: ...
        def unsubscribe(self, *topics: str) -> None: ...
        def _fail(self, upd: Update, stage: AgentState, reason: str) -> None: ...
        def _downloaded(self, upd: Update) -> None: ...

    def _wait_manifest(self, upd: Update, sha: str) -> None:
        """Subscribe the retained manifest of a blob (model or golden) and wait for it."""
        upd.waiting_manifest = sha
        self.subscribe(self.sim.topics.manifest(sha))

    def _on_manifest(self, manifest: Manifest) -> None:
        """The manifest awaited: check it, then fetch what the store lacks."""
        upd = self.update
        if upd is None or upd.waiting_manifest != manifest.sha256:
            return
        upd.waiting_manifest = None
        self.unsubscribe(self.sim.topics.manifest(manifest.sha256))
        if manifest.expires is not None and manifest.expires < time.time():
            self._fail(upd, AgentState.FETCHING, f"manifest for {manifest.sha256[:12]} expired")
            return
        if manifest.sha256 == upd.sha:
            if manifest.size != upd.ref.size:
                size = upd.ref.size
                self._fail(
                    upd,
                    AgentState.FETCHING,
                    f"manifest size {manifest.size} != desired size {size}",
                )
                return
            upd.model_manifest = manifest
            if manifest.sha256 not in self.models:
                self._fetch_blob(upd, manifest)
                return
        else:
            golden = upd.model_manifest.golden if upd.model_manifest else None
            if golden is not None and manifest.size != golden.size:
                reason = f"golden manifest size {manifest.size} != referenced size {golden.size}"
                self._fail(upd, AgentState.FETCHING, reason)
                return
            self._fetch_blob(upd, manifest)
            return
        self._next_blob(upd)

    def _next_blob(self, upd: Update) -> None:
        """After the model: its golden blob when the store lacks it, else verify."""
        assert upd.model_manifest is not None
        golden = upd.model_manifest.golden
        stored = self.models.get(upd.sha)
        fetched = {a.manifest.sha256 for a in upd.fetched}
        has_golden = stored is not None and stored.golden == (golden.sha256 if golden else None)
        if golden is not None and not has_golden and golden.sha256 not in fetched:
            self._wait_manifest(upd, golden.sha256)
            return
        self._downloaded(upd)

    def _fetch_blob(self, upd: Update, manifest: Manifest) -> None:
        """Subscribe a blob's chunks; the broker delivers the retained ones, repair fills gaps."""
        upd.blob = manifest
        upd.have = bytearray(manifest.chunk_count)
        upd.missing = manifest.chunk_count
        upd.assembly = self.sim.assembly_for(manifest)
        upd.prefix = f"{self.sim.topics.root}/artifacts/{manifest.sha256}/chunks/"
        upd.repairing, upd.round_missing = None, -1
        upd.backoff = self.sim.repair_interval_s
        self.subscribe(upd.prefix + "+")
        upd.quiet_since = time.monotonic()
        self._arm_repair(upd)
        self._maybe_go_offline(upd)

    def _chunk_topics(self, upd: Update) -> list[str]:
        """The chunk topics this update is subscribed to now."""
        if upd.repairing is None:
            return [upd.prefix + "+"]
        return [upd.prefix + str(i) for i in upd.repairing]

    def _on_chunk(self, upd: Update, topic: str, payload: bytes) -> None:
        """Verify one chunk's length and sha256 against the manifest, then set its bit."""
        if not payload:
            return  # the controller cleared a retained chunk
        counters = self.sim.counters
        counters.bytes_received += len(payload)
        counters.chunks_received += 1
        blob = upd.blob
        tail = topic[len(upd.prefix) :]
        if blob is None or not tail.isdigit():
            counters.rejected_messages += 1
            return
        index = int(tail)
        if index >= blob.chunk_count or upd.have[index]:
            return  # a duplicate (the daemon hashes it before noticing; not worth simulating)
        if self.rng is not None and self.rng.random() < self.faults.drop:
            counters.chunks_dropped += 1
            return
        # Hashed inline: a hashing thread was measured slower here (GIL hand-offs on 2 cores).
        if len(payload) != blob.chunk_length(index) or (
            hashlib.sha256(payload).hexdigest() != blob.chunk_sha256[index]
        ):
            counters.chunks_rejected += 1
            return
        upd.have[index] = 1
        upd.missing -= 1
        upd.quiet_since = time.monotonic()
        counters.chunks_accepted += 1
        assert upd.assembly is not None
        upd.assembly.put(index, payload)
        if upd.missing:
            self._maybe_go_offline(upd)
            return
        self.unsubscribe(*self._chunk_topics(upd))
        upd.fetched.append(upd.assembly)
        upd.assembly, upd.blob, upd.prefix = None, None, ""
        self._next_blob(upd)

    def _send_need(self, upd: Update) -> None:
        """Ask the controller for every chunk still missing (it republishes once per round)."""
        assert upd.blob is not None
        missing = tuple(i for i, bit in enumerate(upd.have) if not bit)
        need = Need(device_id=self.device_id, chunks=missing)
        self.publish(self.sim.topics.need(upd.blob.sha256), dump(need))
        self.sim.counters.needs_sent += 1

    def _repair_round(self, upd: Update) -> None:
        """Re-subscribe the missing chunks one topic each (the broker re-sends its retained
        copies to this agent alone); after a round that brought nothing, also send a `need`."""
        missing = [i for i, bit in enumerate(upd.have) if not bit][:MAX_REPAIR_TOPICS]
        barren = upd.round_missing == upd.missing
        if upd.repairing is None:
            stale = [upd.prefix + "+"]
        else:  # the ones that arrived; the rest are subscribed again (retained re-sent)
            stale = [upd.prefix + str(i) for i in upd.repairing if upd.have[i]]
        if stale:
            self.unsubscribe(*stale)
        upd.repairing = tuple(missing)
        self.subscribe(*(upd.prefix + str(i) for i in missing))
        self.sim.counters.repair_rounds += 1
        if barren:
            self._send_need(upd)
            upd.backoff = min(
                upd.backoff * 2, max(REPAIR_BACKOFF_MAX_S, self.sim.repair_interval_s)
            )
        else:
            upd.backoff = self.sim.repair_interval_s
        upd.round_missing = upd.missing

    def _arm_repair(self, upd: Update) -> None:
        """Check for silence one (jittered, backed-off) round after the last chunk or round."""
        blob = upd.blob
        wait = upd.backoff * random.uniform(1.0 - REPAIR_JITTER, 1.0 + REPAIR_JITTER)
        self.sim.call_at(upd.quiet_since + wait, lambda: self._repair(upd, blob, wait))

    def _repair(self, upd: Update, blob: Manifest | None, wait: float) -> None:
        """After a silent round: re-subscribe the gaps (daemon: Fetcher._repair_round)."""
        if self.update is not upd or upd.blob is not blob or not upd.prefix:
            return
        now = time.monotonic()
        if now - upd.quiet_since >= wait and now >= upd.hold_until:
            if self.connected and not self._unread():
                self._repair_round(upd)
            upd.quiet_since = now  # offline: the reconnect repairs after its spread
        self._arm_repair(upd)

    def _unread(self) -> bool:
        """Whether bytes wait in this agent's socket: the simulation's loop is behind (its one
        thread starved of CPU), so the agent is not hearing silence. A device has its own CPU;
        without this, one starved loop makes every agent in it repair at once."""
        if self.fd is None or not unread_bytes(self.fd):
            return False
        self.sim.counters.repairs_deferred += 1
        return True

    def _resume(self, upd: Update) -> None:
        """Reconnected mid-download (the clean session dropped every subscription): repair
        after a random 0..RECONNECT_SPREAD_S, so a fleet reconnecting at once is spread out."""
        upd.repairing = ()
        upd.round_missing = -1
        upd.backoff = self.sim.repair_interval_s
        upd.hold_until = time.monotonic() + random.uniform(0.0, RECONNECT_SPREAD_S)
        blob = upd.blob
        self.sim.call_at(upd.hold_until, lambda: self._resumed(upd, blob))

    def _resumed(self, upd: Update, blob: Manifest | None) -> None:
        """The spread after a reconnect is over: one repair round now."""
        if self.update is not upd or upd.blob is not blob or not upd.prefix or not self.connected:
            return
        self._repair_round(upd)
        upd.quiet_since = time.monotonic()

    def _deadline(self, upd: Update) -> None:
        """The fetch deadline passed: fail the way the daemon words it."""
        if self.update is not upd:
            return
        if upd.waiting_manifest:
            self._fail(
                upd, AgentState.FETCHING, f"manifest for {upd.waiting_manifest[:12]} never arrived"
            )
        elif upd.blob is not None:
            sha, total = upd.blob.sha256[:12], upd.blob.chunk_count
            reason = f"download of {sha} timed out: {upd.missing} of {total} chunks missing"
            self._fail(upd, AgentState.FETCHING, reason)

    def _maybe_go_offline(self, upd: Update) -> None:
        """offline fault: drop the link once half the model is in (at once for one chunk)."""
        blob = upd.blob
        if not self.faults.offline_s or upd.offline_done or blob is None or blob.sha256 != upd.sha:
            return
        if blob.chunk_count - upd.missing >= blob.chunk_count // 2:
            upd.offline_done = True
            self.sim.drop_connection(cast("SimAgent", self), self.faults.offline_s)

    def _abandon(self, upd: Update) -> None:
        """Stop an update: unsubscribe its topics and release the shared assemblies."""
        if self.update is upd:
            self.update = None
        if upd.waiting_manifest:
            self.unsubscribe(self.sim.topics.manifest(upd.waiting_manifest))
            upd.waiting_manifest = None
        if upd.prefix:
            topics = self._chunk_topics(upd)
            if topics:
                self.unsubscribe(*topics)
            upd.prefix = ""
        if upd.assembly is not None:
            upd.fetched.append(upd.assembly)
            upd.assembly = None
        self._release_fetched(upd)

    def _took(self, upd: Update) -> None:
        """Count the update's time, desired state received -> verdict (its deadline's start)."""
        self.sim.update_latency.add(time.monotonic() - (upd.deadline - self.sim.fetch_timeout_s))

    def _release_fetched(self, upd: Update) -> None:
        """Hand back this update's references to shared assemblies."""
        for assembly in upd.fetched:
            self.sim.release(assembly)
        upd.fetched = []

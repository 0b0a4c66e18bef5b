"""Outbound: reconciles desired state, manifests and chunks into MQTT; housekeeping passes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from agent.protocol import (
    Manifest,
    dump,
)
from agent.protocol.limits import REPUBLISH_ROUND_S
from controller.fleet.registry import Fleet
from controller.runtime.tuning import (
    COMPACT_BUDGET_S,
    NEED_COALESCE_S,
    PACING_SLACK,
    REPUBLISHED_MEMORY,
    TICK_GRACE_S,
)
from controller.security.signing import current_fleet_keys
from controller.storage.db import Connection

if TYPE_CHECKING:
    pass

from controller.runtime.core import ServiceCore

log = logging.getLogger(__name__)


class Publisher(ServiceCore):
    """Publishes what the fleet wants devices to have (mixed into ControllerService)."""

    def _housekeep(self, fleet: Fleet, task: Callable[[Fleet], None]) -> None:
        """Run a periodic task in its own transaction; a failure is counted, never fatal."""
        try:
            with fleet.db.transaction():
                task(fleet)
        except Exception:
            self.errors += 1
            log.exception("%s failed", task.__name__)

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
                continue  # stays unpublished until a download slot frees up (pacing.py)
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

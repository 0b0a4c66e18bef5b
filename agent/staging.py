"""Getting an artifact and its golden file into the store: fetch what is missing, then verify.

The two halves run in the update states `fetching` and `verifying`; between them the state is
persisted, so a crash in either resumes from the chunk bitmaps or the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.download import Download, prune_partials
from agent.fetch import Fetcher
from agent.protocol import ArtifactRef, GoldenRef, Manifest
from agent.store import ModelStore, sha256_file
from agent.update.errors import UpdateFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fetched:
    """What the fetching stage produced: the manifest and the downloads still to verify."""

    manifest: Manifest
    model_part: Download | None  # None: the model was already stored
    golden_part: Download | None  # None: no golden, or it was already stored

    @property
    def golden(self) -> GoldenRef | None:
        """The golden blob the manifest names, if any."""
        return self.manifest.golden


class ArtifactStager:
    """Fetches a model and its golden blob into `downloads_dir`, verifies them into the store."""

    def __init__(self, store: ModelStore, fetcher: Fetcher, downloads_dir: Path) -> None:
        """Work on `store`, downloading with `fetcher`."""
        self.store = store
        self.fetcher = fetcher
        self.downloads_dir = downloads_dir

    def fetch(
        self, artifact: ArtifactRef, timeout_s: float, cancelled: Callable[[], bool]
    ) -> Fetched:
        """Manifest, then whatever of the model and its golden the store lacks (one deadline)."""
        sha = artifact.sha256
        deadline = time.monotonic() + timeout_s
        manifest = self.fetcher.manifest(sha, deadline, cancelled)
        if manifest.size != artifact.size:
            raise UpdateFailed(f"manifest size {manifest.size} != desired size {artifact.size}")
        golden = manifest.golden
        keep = {sha} | ({golden.sha256} if golden else set())
        for name in prune_partials(self.downloads_dir, keep):
            log.info("removed a superseded partial download: %s", name)
        model_part = None
        if not self.store.has(sha):
            model_part = self.fetcher.fetch(manifest, deadline, cancelled)
        golden_part = None
        if golden is not None and not self.store.has_golden(sha, golden.sha256):
            golden_manifest = self.fetcher.manifest(golden.sha256, deadline, cancelled)
            if golden_manifest.size != golden.size:
                raise UpdateFailed(
                    f"golden manifest size {golden_manifest.size} != referenced size {golden.size}"
                )
            golden_part = self.fetcher.fetch(golden_manifest, deadline, cancelled)
        return Fetched(manifest, model_part, golden_part)

    def verify(self, fetched: Fetched) -> None:
        """Check whole-file digests; move downloads into the store (stored files re-checked)."""
        sha = fetched.manifest.sha256
        part = fetched.model_part
        if part is not None:
            self._check(part, sha, "assembled file")
            self.store.add_verified(sha, part.part_path)
            part.discard()
        elif (actual := sha256_file(self.store.path(sha))) != sha:
            if sha != self.store.pointers().current:
                self.store.path(sha).unlink(missing_ok=True)
            raise UpdateFailed(f"verification failed: stored model now has sha256 {actual}")
        golden, golden_part = fetched.golden, fetched.golden_part
        if golden is not None and golden_part is not None:
            self._check(golden_part, golden.sha256, "golden file")
            self.store.add_golden(sha, golden.sha256, golden_part.part_path)
            golden_part.discard()
        elif golden is not None and not self.store.has_golden(sha, golden.sha256):
            raise UpdateFailed("verification failed: stored golden file changed on disk")

    @staticmethod
    def _check(part: Download, expected: str, what: str) -> None:
        """Whole-file digest of a download; on a mismatch its bitmap is untrustworthy: drop it."""
        actual = sha256_file(part.part_path)
        if actual != expected:
            part.forget_bitmap()
            part.discard()
            raise UpdateFailed(f"verification failed: {what} has sha256 {actual}")

"""Chunked artifact download: per-chunk sha256, a bitmap on disk so a restart resumes."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

from agent.fsutil import CorruptFileError, atomic_write_json, read_json
from agent.protocol import Manifest, ProtocolError

log = logging.getLogger(__name__)

_PART_SUFFIX = ".part"
_BITMAP_SUFFIX = ".chunks.json"


class ChunkRejected(ValueError):
    """A chunk whose index, length or digest does not match the manifest."""


class Download:
    """One artifact being assembled in `<sha>.part`, with the set of verified chunks persisted."""

    # Persist the bitmap after this many new chunks (and always at completion): a restart
    # then re-fetches at most this many chunks, while a write per chunk would double the I/O.
    BITMAP_EVERY = 8

    def __init__(self, manifest: Manifest, directory: Path) -> None:
        """Open (or resume) the partial file for `manifest` in `directory`."""
        self.manifest = manifest
        directory.mkdir(parents=True, exist_ok=True)
        self.part_path = directory / f"{manifest.sha256}{_PART_SUFFIX}"
        self._bitmap_path = directory / f"{manifest.sha256}{_BITMAP_SUFFIX}"
        self._lock = threading.Lock()
        self._unsaved = 0
        self.progress = threading.Event()
        self.have: set[int] = self._load_bitmap()
        if not self.part_path.exists() or self.part_path.stat().st_size != manifest.size:
            with self.part_path.open("wb") as fh:
                fh.truncate(manifest.size)
            self.have = set()
        # Chunks already on disk when this download (re)started: what a resume saved.
        self.resumed = len(self.have)

    def _load_bitmap(self) -> set[int]:
        """Verified chunk indices saved for this manifest; empty if none, foreign or corrupt."""
        try:
            saved = read_json(self._bitmap_path, default=None)
        except CorruptFileError as exc:
            log.warning("%s; downloading every chunk again", exc)
            return set()
        if not isinstance(saved, dict) or saved.get("manifest_chunks") != list(
            self.manifest.chunk_sha256
        ):
            return set()
        have = saved.get("have", [])
        if not isinstance(have, list):
            return set()
        return {
            i
            for i in have
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.manifest.chunk_count
        }

    def missing(self) -> list[int]:
        """Chunk indices not yet verified."""
        with self._lock:
            return [i for i in range(self.manifest.chunk_count) if i not in self.have]

    @property
    def complete(self) -> bool:
        """True when every chunk is verified."""
        with self._lock:
            return len(self.have) == self.manifest.chunk_count

    def accept(self, index: int, data: bytes) -> bool:
        """Verify and write one chunk; False if already had, ChunkRejected if it is wrong."""
        try:
            expected_len = self.manifest.chunk_length(index)
        except ProtocolError as exc:
            raise ChunkRejected(str(exc)) from None
        if len(data) != expected_len:
            raise ChunkRejected(f"chunk {index}: {len(data)} bytes, expected {expected_len}")
        if hashlib.sha256(data).hexdigest() != self.manifest.chunk_sha256[index]:
            raise ChunkRejected(f"chunk {index}: sha256 mismatch")
        with self._lock:
            if index in self.have:
                return False
            with self.part_path.open("r+b") as fh:
                fh.seek(index * self.manifest.chunk_size)
                fh.write(data)
                if len(self.have) + 1 == self.manifest.chunk_count:
                    fh.flush()
                    os.fsync(fh.fileno())
            self.have.add(index)
            self._unsaved += 1
            if self._unsaved >= self.BITMAP_EVERY or len(self.have) == self.manifest.chunk_count:
                self._save_locked()
        self.progress.set()
        return True

    def flush(self) -> None:
        """Persist chunks not yet in the saved bitmap (when a fetch ends, failed or not)."""
        with self._lock:
            if self._unsaved and self.part_path.exists():
                self._save_locked()

    def _save_locked(self) -> None:
        """Persist the bitmap (caller holds the lock)."""
        with self.part_path.open("rb") as fh:
            os.fsync(fh.fileno())
        atomic_write_json(
            self._bitmap_path,
            {"manifest_chunks": list(self.manifest.chunk_sha256), "have": sorted(self.have)},
        )
        self._unsaved = 0

    def discard(self) -> None:
        """Remove the partial file and bitmap (after success or a verification failure)."""
        self.part_path.unlink(missing_ok=True)
        self._bitmap_path.unlink(missing_ok=True)

    def forget_bitmap(self) -> None:
        """Drop the bitmap after the bitmap was found untrustworthy (whole-file digest failed)."""
        with self._lock:
            self.have = set()
            self._bitmap_path.unlink(missing_ok=True)


def prune_partials(directory: Path, keep: set[str]) -> list[str]:
    """Delete partial files and bitmaps of artifacts other than `keep` (superseded downloads)."""
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        name = path.name
        for suffix in (_PART_SUFFIX, _BITMAP_SUFFIX):
            if name.endswith(suffix) and name[: -len(suffix)] not in keep:
                path.unlink(missing_ok=True)
                removed.append(name)
    return removed

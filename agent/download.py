"""Chunked artifact download: per-chunk sha256, a bitmap on disk so a restart resumes."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from agent.fsutil import atomic_write_json, read_json
from agent.protocol import Manifest, ProtocolError


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
        self.part_path = directory / f"{manifest.sha256}.part"
        self._bitmap_path = directory / f"{manifest.sha256}.chunks.json"
        self._lock = threading.Lock()
        self._unsaved = 0
        self.progress = threading.Event()
        saved = read_json(self._bitmap_path, default=None)
        if saved and saved.get("manifest_chunks") == list(manifest.chunk_sha256):
            self.have: set[int] = {
                i for i in saved.get("have", []) if 0 <= i < manifest.chunk_count
            }
        else:
            self.have = set()
        if not self.part_path.exists() or self.part_path.stat().st_size != manifest.size:
            with self.part_path.open("wb") as fh:
                fh.truncate(manifest.size)
            self.have = set()

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

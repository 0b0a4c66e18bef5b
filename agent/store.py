"""Content-addressed model store with atomically switched `current` and `previous` pointers."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from agent.fsutil import atomic_write_json, fsync_dir, read_json
from agent.protocol import validate_sha256

# Read files in 1 MiB blocks when hashing: large enough to be fast, small enough for a Pi Zero.
_HASH_BLOCK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Pointers:
    """Which model serves now and which served before it (for rollback)."""

    current: str | None = None
    previous: str | None = None


class ModelStore:
    """`models/<sha256>.tflite` files plus one pointer file switched with os.replace."""

    def __init__(self, root: Path) -> None:
        """Create the store directory if needed."""
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._pointers_path = root / "pointers.json"

    def path(self, sha256: str) -> Path:
        """Path of a model by digest (validated, so no path tricks)."""
        return self.root / f"{validate_sha256(sha256)}.tflite"

    def has(self, sha256: str) -> bool:
        """True when the model is stored."""
        return self.path(sha256).is_file()

    def add_verified(self, sha256: str, source: Path) -> Path:
        """Move a downloaded file into the store after checking its digest once more."""
        actual = sha256_file(source)
        if actual != sha256:
            raise ValueError(f"sha256 mismatch for {source}: expected {sha256}, got {actual}")
        target = self.path(sha256)
        with source.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(source, target)
        fsync_dir(self.root)
        return target

    def pointers(self) -> Pointers:
        """Read the current/previous pointers."""
        data = read_json(self._pointers_path, default={}) or {}
        return Pointers(current=data.get("current"), previous=data.get("previous"))

    def activate(self, sha256: str) -> Pointers:
        """Make `sha256` current and the old current previous, in one atomic replace."""
        if not self.has(sha256):
            raise FileNotFoundError(f"model {sha256} is not in the store")
        old = self.pointers()
        if old.current == sha256:
            return old
        new = Pointers(current=sha256, previous=old.current)
        atomic_write_json(self._pointers_path, {"current": new.current, "previous": new.previous})
        if old.previous and old.previous not in (new.current, new.previous):
            self.discard(old.previous)  # fell off the end: bounded storage on devices
        return new

    def rollback(self) -> Pointers:
        """Swap back to the previous model."""
        old = self.pointers()
        if old.previous is None or not self.has(old.previous):
            raise FileNotFoundError("no previous model to roll back to")
        new = Pointers(current=old.previous, previous=old.current)
        atomic_write_json(self._pointers_path, {"current": new.current, "previous": new.previous})
        return new

    def discard(self, sha256: str) -> None:
        """Delete a stored model unless a pointer references it (e.g. one that failed self-test)."""
        pointers = self.pointers()
        if sha256 not in (pointers.current, pointers.previous):
            self.path(sha256).unlink(missing_ok=True)

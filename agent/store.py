"""Content-addressed model store with atomically switched `current` and `previous` pointers."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from agent.fsutil import CorruptFileError, atomic_write_json, fsync_dir, quarantine, read_json
from agent.protocol import ProtocolError, validate_sha256

log = logging.getLogger(__name__)

# Read files in 1 MiB blocks when hashing: large enough to be fast, small enough for a Pi Zero.
_HASH_BLOCK = 1 << 20
_MODEL_NAME = re.compile(r"([0-9a-f]{64})\.tflite")
_GOLDEN_SUFFIX = ".golden.npz"


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
    """`models/<sha256>.tflite` files, their goldens, and one pointer file switched atomically.

    A model's golden inputs live beside it as `<model sha>.golden.npz`; the file's own digest is
    checked against the manifest's GoldenRef whenever it is used, so it is content-verified.
    """

    def __init__(self, root: Path) -> None:
        """Create the store directory if needed."""
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.pointers_path = root / "pointers.json"
        # Models kept like pointer targets though no pointer names them (the armed fallback).
        self.pinned: frozenset[str] = frozenset()

    def path(self, sha256: str) -> Path:
        """Path of a model by digest (validated, so no path tricks)."""
        return self.root / f"{validate_sha256(sha256)}.tflite"

    def golden_path(self, model_sha256: str) -> Path:
        """Path of the golden inputs/outputs (.npz) that go with a model."""
        return self.root / f"{validate_sha256(model_sha256)}{_GOLDEN_SUFFIX}"

    def has(self, sha256: str) -> bool:
        """True when the model is stored."""
        return self.path(sha256).is_file()

    def models(self) -> list[str]:
        """Digests of every stored model."""
        return sorted(
            m.group(1) for p in self.root.iterdir() if (m := _MODEL_NAME.fullmatch(p.name))
        )

    def has_golden(self, model_sha256: str, golden_sha256: str) -> bool:
        """True when the model's golden file is stored and has the expected digest."""
        path = self.golden_path(model_sha256)
        return path.is_file() and sha256_file(path) == golden_sha256

    def add_verified(self, sha256: str, source: Path) -> Path:
        """Move a downloaded file into the store after checking its digest once more."""
        return self._move_verified(sha256, source, self.path(sha256))

    def add_golden(self, model_sha256: str, golden_sha256: str, source: Path) -> Path:
        """Move a downloaded golden file beside its model after checking its digest."""
        return self._move_verified(golden_sha256, source, self.golden_path(model_sha256))

    def _move_verified(self, sha256: str, source: Path, target: Path) -> Path:
        """Check `source` has digest `sha256`, flush it, then rename it to `target`."""
        actual = sha256_file(source)
        if actual != sha256:
            raise ValueError(f"sha256 mismatch for {source}: expected {sha256}, got {actual}")
        with source.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(source, target)
        fsync_dir(self.root)
        return target

    def pointers(self) -> Pointers:
        """Read the current/previous pointers; CorruptFileError if the file is damaged."""
        data = read_json(self.pointers_path, default={})
        if not isinstance(data, dict):
            raise CorruptFileError(f"{self.pointers_path}: expected a JSON object")
        values: dict[str, str | None] = {}
        for key in ("current", "previous"):
            value = data.get(key)
            if value is not None:
                try:
                    validate_sha256(value)
                except ProtocolError as exc:
                    raise CorruptFileError(f"{self.pointers_path}: {key}: {exc}") from None
            values[key] = value
        return Pointers(current=values["current"], previous=values["previous"])

    def _write_pointers(self, pointers: Pointers) -> None:
        """Persist the pointers with one atomic replace."""
        atomic_write_json(
            self.pointers_path, {"current": pointers.current, "previous": pointers.previous}
        )

    def rebuild_pointers(self, hint: str | None) -> str:
        """Quarantine a corrupt pointers.json and rebuild it where the store makes that safe.

        One stored model is unambiguous; so is `hint` (the model the update record says is
        active) when it is stored. Otherwise nothing is served until the next deployment.
        Returns what was done, for the log and the error event.
        """
        moved = quarantine(self.pointers_path) if self.pointers_path.exists() else None
        what = f"pointers.json was corrupt (moved to {moved.name if moved else '?'})"
        stored = self.models()
        if hint is not None and hint in stored:
            others = [s for s in stored if s != hint]
            pointers = Pointers(hint, others[0] if len(others) == 1 else None)
            done = f"{what}; rebuilt: current {hint[:12]} (the recorded active model)"
        elif len(stored) == 1:
            pointers = Pointers(stored[0], None)
            done = f"{what}; rebuilt: current {stored[0][:12]} (the only stored model)"
        else:
            pointers = Pointers()
            done = (
                f"{what}; {len(stored)} models in the store and no record of which was active: "
                "serving nothing until the next deployment"
            )
        self._write_pointers(pointers)
        log.error("%s", done)
        return done

    def activate(self, sha256: str) -> Pointers:
        """Make `sha256` current and the old current previous, in one atomic replace."""
        if not self.has(sha256):
            raise FileNotFoundError(f"model {sha256} is not in the store")
        old = self.pointers()
        if old.current == sha256:
            return old
        new = Pointers(current=sha256, previous=old.current)
        self._write_pointers(new)
        if old.previous and old.previous not in (new.current, new.previous):
            self.discard(old.previous)  # fell off the end: bounded storage on devices
        self.prune_goldens()
        return new

    def rollback(self) -> Pointers:
        """Swap back to the previous model."""
        old = self.pointers()
        if old.previous is None or not self.has(old.previous):
            raise FileNotFoundError("no previous model to roll back to")
        new = Pointers(current=old.previous, previous=old.current)
        self._write_pointers(new)
        return new

    def discard(self, sha256: str) -> None:
        """Delete a stored model and its golden unless a pointer references it or it is pinned."""
        pointers = self.pointers()
        if sha256 not in (pointers.current, pointers.previous) and sha256 not in self.pinned:
            self.path(sha256).unlink(missing_ok=True)
            self.golden_path(sha256).unlink(missing_ok=True)

    def prune_goldens(self) -> list[str]:
        """Delete golden files whose model is no longer stored; return their names."""
        removed = []
        for path in self.root.glob(f"*{_GOLDEN_SUFFIX}"):
            sha = path.name[: -len(_GOLDEN_SUFFIX)]
            if (
                _MODEL_NAME.fullmatch(f"{sha}.tflite")
                and not (self.root / f"{sha}.tflite").exists()
            ):
                path.unlink(missing_ok=True)
                removed.append(path.name)
        return removed

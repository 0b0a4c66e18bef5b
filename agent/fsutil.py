"""Crash-safe file writes: temp file, fsync, os.replace, then fsync of the directory."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# Suffix of a state file that could not be read: kept for a post-mortem, never read again.
CORRUPT_SUFFIX = ".corrupt"


class CorruptFileError(ValueError):
    """A state file exists but does not hold what it should (bad JSON, wrong fields or types)."""


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry so a rename inside it survives power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so a reader sees the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any) -> None:
    """Atomically replace `path` with `data` as JSON."""
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode())


def read_json(path: Path, default: Any = None) -> Any:
    """Read a JSON file, `default` when it does not exist, CorruptFileError when it is not JSON."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return default
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from None


def quarantine(path: Path) -> Path:
    """Move a corrupt file aside as `<name>.corrupt` (replacing an older one) and return it."""
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    os.replace(path, target)
    fsync_dir(path.parent)
    return target

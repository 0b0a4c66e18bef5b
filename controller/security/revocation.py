"""Which devices are revoked: HOME/security/revoked.json, read without `cryptography`.

Revoking a device removes its password (identity.FleetSecurity.revoke_device), denies its id
everything in the broker's ACL (broker_config.acl_text) and makes the controller refuse its
messages, including a hello that would register it again. Registering the device again
(`devices register`) is the only way back. This module is the part every layer needs (the
controller's inbound path runs where `cryptography` may be missing), so it imports nothing
heavier than json and pydantic. The file is a JSON array of device ids (`RevokedDoc`).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Annotated

from pydantic import Field, RootModel

from firmware_profiles.validation import FileContentError, read_json_model

__all__ = [
    "REVOKED_FILE",
    "RevocationError",
    "RevokedDoc",
    "RevokedSet",
    "read_revoked",
    "revoked_path",
    "write_revoked",
]

REVOKED_FILE = "revoked.json"


class RevocationError(ValueError):
    """The revoked file is unreadable; names the file and what is wrong."""


DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", strict=True)]


class RevokedDoc(RootModel[list[DeviceId]]):
    """HOME/security/revoked.json: the revoked device ids, a JSON array written sorted."""

    root: list[DeviceId] = Field(
        description="Ids of revoked devices ([A-Za-z0-9._-]{1,64}); registering one again "
        "removes it"
    )


def revoked_path(home: Path) -> Path:
    """HOME/security/revoked.json."""
    return home / "security" / REVOKED_FILE


def read_revoked(path: Path) -> set[str]:
    """The revoked ids in `path` (empty when the file does not exist)."""
    try:
        return set(read_json_model(path, RevokedDoc).root)
    except FileNotFoundError:
        return set()
    except FileContentError as exc:
        raise RevocationError(str(exc)) from None


def write_revoked(path: Path, ids: set[str]) -> None:
    """Persist the revoked set sorted, atomically, 0600 in a 0700 directory."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600 from the start
    try:
        with os.fdopen(fd, "wb") as out:
            out.write((json.dumps(sorted(ids)) + "\n").encode())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RevokedSet:
    """The revoked ids of one home, re-read only when the file changes (one stat per check)."""

    def __init__(self, home: Path) -> None:
        """Bind to HOME/security/revoked.json."""
        self.path = revoked_path(home)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._ids: frozenset[str] = frozenset()

    def __contains__(self, device_id: object) -> bool:
        """True when `device_id` is revoked (an unreadable file keeps the last good set)."""
        return device_id in self.snapshot()

    def snapshot(self) -> frozenset[str]:
        """The current revoked ids; the same object until the file changes."""
        try:
            st = self.path.stat()
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._ids = frozenset(read_revoked(self.path)) if stamp else frozenset()
                    self._stamp = stamp
                except (OSError, RevocationError):
                    pass  # keep refusing what was refused; the CLI reports the bad file
            return self._ids

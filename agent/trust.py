"""The agent's fleet verify keys: checks signed desired states, manifests and key rotations.

With no trusted keys configured the agent runs in development mode (nothing is checked; the
daemon logs one warning). With keys, everything that can make the device run a model must be
signed by one of them (docs/security.md, "Signed desired state and manifests").
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from agent.fsutil import CorruptFileError, atomic_write_json, quarantine, read_json
from agent.protocol import Command, Desired, FleetKeyChain, FleetKeys, Manifest, ProtocolError
from agent.protocol.signing import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    canonical_bytes,
    decode_b64,
    key_id,
)

log = logging.getLogger(__name__)

__all__ = ["SecurityRejected", "TrustStore", "load_verify_key"]


class SecurityRejected(Exception):
    """A message failed a signature, binding, freshness or anti-rollback check; str = reason."""


def load_verify_key(text: str) -> tuple[str, Any]:
    """(key id, Ed25519PublicKey) of one base64 raw public key; ValueError when malformed."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        raw = decode_b64(text, PUBLIC_KEY_BYTES, "trusted key")
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None
    return key_id(raw), Ed25519PublicKey.from_public_bytes(raw)


class TrustStore:
    """The set of fleet verify keys this agent trusts, from agent.toml or a signed rotation.

    A rotation is persisted to `path` (write temp, fsync, rename) before it is used; from then
    on the persisted set wins over agent.toml, which only seeds a fresh device.
    """

    def __init__(self, configured: tuple[str, ...], path: Path) -> None:
        """Load the persisted set if there is one, else the configured keys (may be none)."""
        self.path = path
        self.version = 0
        self.problem: str | None = None
        keys = configured
        try:
            saved = read_json(path, default=None)
            if saved is not None:
                version, saved_keys = saved.get("version"), saved.get("keys")
                if (
                    not isinstance(version, int)
                    or not isinstance(saved_keys, list)
                    or not all(isinstance(k, str) for k in saved_keys)
                ):
                    raise CorruptFileError(f"{path}: expected {{'version': N, 'keys': [...]}}")
                self.version, keys = version, tuple(saved_keys)
        except (CorruptFileError, AttributeError):
            moved = quarantine(path)
            self.problem = f"{path} was corrupt (moved to {moved.name}); using agent.toml's keys"
            log.error("%s", self.problem)
            keys = configured
        self._keys: dict[str, Any] = {}
        if keys:
            try:
                self._keys = dict(load_verify_key(k) for k in keys)
            except ImportError:
                raise RuntimeError(
                    "trusted_keys needs the 'cryptography' package (pip install cryptography)"
                ) from None

    @property
    def enforcing(self) -> bool:
        """True when signatures are required (at least one trusted key)."""
        return bool(self._keys)

    @property
    def key_ids(self) -> list[str]:
        """Ids of the trusted keys, sorted."""
        return sorted(self._keys)

    def verify(self, message: Desired | Manifest | FleetKeys | Command, what: str) -> None:
        """Raise SecurityRejected unless `message` carries a valid signature by a trusted key."""
        sig = message.sig
        if sig is None:
            raise SecurityRejected(f"unsigned {what}")
        key = self._keys.get(sig.key_id)
        if key is None:
            raise SecurityRejected(f"{what} signed by unknown key {sig.key_id}")
        try:
            raw = decode_b64(sig.value, SIGNATURE_BYTES, "signature")
        except ProtocolError as exc:
            raise SecurityRejected(f"{what}: malformed signature ({exc})") from None
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(raw, canonical_bytes(message))
        except InvalidSignature:
            raise SecurityRejected(
                f"{what}: bad signature by key {sig.key_id} (tampered)"
            ) from None

    def check_desired(
        self,
        desired: Desired,
        *,
        device_id: str,
        profile: str | None,
        highest_generation: int,
        applied_generation: int,
        now: float | None = None,
    ) -> None:
        """Signature, device and profile binding, anti-rollback and expiry of a desired state.

        `highest_generation` is the highest generation already acted on (persisted): an older
        one is a replay; the same one is a re-delivery of the retained message (no-op upstream).
        Expiry is only checked for a generation the agent would still act on.
        """
        self.verify(desired, "desired state")
        if desired.device_id != device_id:
            raise SecurityRejected(
                f"desired state for device {desired.device_id!r}, this is {device_id!r}"
            )
        if profile is not None and desired.profile != profile:
            raise SecurityRejected(
                f"desired state for profile {desired.profile!r}, this device is {profile!r}"
            )
        if desired.generation < highest_generation:
            raise SecurityRejected(
                f"desired generation {desired.generation} is older than generation "
                f"{highest_generation} already seen (replay or rollback)"
            )
        if desired.generation > applied_generation:
            if desired.expires is None:
                raise SecurityRejected(f"desired generation {desired.generation} has no expiry")
            current = time.time() if now is None else now
            if desired.expires < current:
                raise SecurityRejected(
                    f"desired generation {desired.generation} expired "
                    f"{current - desired.expires:.0f} s ago"
                )

    def check_command(
        self,
        command: Command,
        *,
        device_id: str,
        highest_counter: int,
        now: float | None = None,
    ) -> None:
        """Signature, device binding, expiry and replay counter of a command.

        `highest_counter` is the highest counter already accepted (persisted): a command must
        carry a strictly higher one, so a captured command is dead once a newer one arrived.
        """
        what = f"command {command.command_id} ({command.action})"
        self.verify(command, what)
        if command.device_id != device_id:
            raise SecurityRejected(
                f"{what} for device {command.device_id!r}, this is {device_id!r}"
            )
        if command.expires is None:
            raise SecurityRejected(f"{what} has no expiry")
        current = time.time() if now is None else now
        if command.expires < current:
            raise SecurityRejected(f"{what} expired {current - command.expires:.0f} s ago")
        if command.counter <= highest_counter:
            raise SecurityRejected(
                f"{what}: counter {command.counter} is not above counter {highest_counter} "
                "already accepted (replay)"
            )

    def check_manifest(self, manifest: Manifest) -> None:
        """Signature of an artifact manifest (its expiry is checked when a fetch reads it)."""
        self.verify(manifest, f"manifest of {manifest.sha256[:12]}")

    def accept_keys(self, message: FleetKeys) -> bool:
        """Adopt a newer key set signed by a trusted key; True when the set changed.

        The new set is persisted before it is used. Re-delivery of the set already held is a
        no-op; an older version is refused (it could bring back a retired key).
        """
        self.verify(message, f"fleet keys version {message.version}")
        if message.version == self.version:
            return False
        if message.version < self.version:
            raise SecurityRejected(
                f"fleet keys version {message.version} is older than version {self.version}"
            )
        try:
            keys = dict(load_verify_key(k) for k in message.keys)
        except ValueError as exc:
            raise SecurityRejected(f"fleet keys version {message.version}: {exc}") from None
        atomic_write_json(self.path, {"version": message.version, "keys": list(message.keys)})
        self.version, self._keys = message.version, keys
        log.info("trusted keys now version %d: %s", self.version, ", ".join(self.key_ids))
        return True

    def accept_chain(self, chain: FleetKeyChain) -> bool:
        """Walk a rotation chain from the held version up; True when the key set changed.

        Links at or below the held version are skipped; links before the first one signed by
        a key this device trusts are skipped too (a bundle written after some rotations already
        holds later keys). From the first accepted link on, every next link must verify
        against the keys its predecessor installed, each persisted before the next is checked.
        """
        changed = False
        refused: SecurityRejected | None = None
        for link in chain.links:
            if link.version <= self.version:
                continue
            try:
                changed = self.accept_keys(link) or changed
            except SecurityRejected as exc:
                if changed:
                    raise  # a broken link after a good one: stop at the last good version
                # Report the most telling refusal: a bad signature by a key we hold beats the
                # "unknown key" of links from before this device's trust point.
                if refused is None or "unknown key" in str(refused):
                    refused = exc if refused is None or "unknown key" not in str(exc) else refused
        if not changed and refused is not None:
            raise refused
        return changed

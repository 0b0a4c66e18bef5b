"""The fleet signing key: signs every desired state, manifest and key rotation the agents follow.

Files under HOME/security (docs/security.md, "Signed desired state and manifests"):
`signing.key` (ed25519 private key, PKCS#8 PEM, 0600), `fleet_keys.json` (the latest signed
`FleetKeys` message, published retained by the controller service), `retired/<key id>.key`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from agent.protocol import Command, FleetKeyChain, FleetKeys, Signature, dump, parse
from agent.protocol.keychain import MAX_CHAIN_LINKS
from agent.protocol.limits import COMMAND_VALIDITY_S
from agent.protocol.signing import canonical_bytes, encode_b64, key_id
from controller.security.files import write_private

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# `cryptography` is imported where it is used: the slim device environment runs the controller
# in end-to-end tests without it (Fleet then publishes unsigned; see Fleet.unpublished_desired).

__all__ = [
    "DESIRED_VALIDITY_S",
    "FleetSigner",
    "current_fleet_keys",
    "next_command_counter",
    "rotate_signing_key",
    "sign_command",
]

SIGNING_KEY = "signing.key"
FLEET_KEYS = "fleet_keys.json"
# Every rotation since the first, oldest first (what is published: agents walk it).
KEY_CHAIN = "fleet_keys_chain.json"
RETIRED_DIR = "retired"
# How long a signed desired state stays valid. The controller re-signs (fresh expiry) whenever it
# republishes, and republishes everything on every reconnect; 30 days lets a device that was
# offline for a month still take its pending update, while a captured message cannot be held
# back ("freeze") and replayed on a fresh device for longer than that.
DESIRED_VALIDITY_S = 30 * 24 * 3600.0

M = TypeVar("M")


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) 0700 and return it (as identity.private_dir, which this module
    cannot import: identity needs `cryptography` at import time)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path



def _new_key() -> Ed25519PrivateKey:
    """A fresh ed25519 private key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    """Raw 32-byte public key."""
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _pem(key: Ed25519PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM of a private key (the file is 0600 in a 0700 directory)."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class FleetSigner:
    """One ed25519 signing key with its id; signs protocol messages in place of their `sig`."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        """Wrap a private key."""
        self._key = key
        self.public_raw = _raw_public(key)
        self.key_id = key_id(self.public_raw)

    @property
    def public_b64(self) -> str:
        """The verify key as agents hold it (agent.toml `trusted_keys`)."""
        return encode_b64(self.public_raw)

    @classmethod
    def load_or_create(cls, directory: Path) -> FleetSigner:
        """The fleet key in `directory` (HOME/security), created 0600 on first use.

        Creation links a finished temp file into place, so two processes creating it at once
        end up with one key (the loser reads the winner's).
        """
        path = directory / SIGNING_KEY
        if not path.exists():
            private_dir(directory)
            tmp = directory / f".{SIGNING_KEY}.{os.getpid()}.tmp"
            write_private(tmp, _pem(_new_key()))
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        return cls.from_pem(path.read_bytes())

    @classmethod
    def from_pem(cls, pem: bytes) -> FleetSigner:
        """Load a PKCS#8 PEM ed25519 private key."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the fleet signing key is not an ed25519 key")
        return cls(key)

    def sign(self, message: M) -> M:
        """A copy of `message` with `sig` set over its canonical encoding (without `sig`)."""
        value = self._key.sign(canonical_bytes(message))
        return dataclasses.replace(  # type: ignore[type-var]
            message, sig=Signature(key_id=self.key_id, value=encode_b64(value))
        )


_counter_lock = threading.Lock()
_last_counter = 0


def next_command_counter() -> int:
    """A command counter above every earlier one of this process: unix time in microseconds.

    Time-based like desired generations, so a restarted controller (or another replica with a
    synchronised clock) keeps counting upwards without shared state; the lock and `+1` keep it
    strictly increasing within one process even when two commands share a microsecond.
    """
    global _last_counter
    with _counter_lock:
        _last_counter = max(time.time_ns() // 1000, _last_counter + 1)
        return _last_counter


def sign_command(
    signer: FleetSigner | None, command: Command, device_id: str, now: float | None = None
) -> Command:
    """`command` addressed to `device_id`, with a fresh counter and expiry, signed by the fleet
    key (addressed and counted but unsigned where `cryptography` is missing: development mode)."""
    addressed = dataclasses.replace(
        command,
        device_id=device_id,
        counter=next_command_counter(),
        expires=(time.time() if now is None else now) + COMMAND_VALIDITY_S,
    )
    return signer.sign(addressed) if signer is not None else addressed


def key_chain(directory: Path) -> FleetKeyChain | None:
    """Every rotation link so far (None before the first rotation).

    A data dir from before the chain has only fleet_keys.json: that link is the chain.
    """
    try:
        return parse((directory / KEY_CHAIN).read_bytes(), FleetKeyChain)
    except FileNotFoundError:
        pass
    try:
        return FleetKeyChain(links=(parse((directory / FLEET_KEYS).read_bytes(), FleetKeys),))
    except FileNotFoundError:
        return None


def current_fleet_keys(directory: Path) -> bytes | None:
    """The signed rotation chain to publish retained (None before the first rotation)."""
    chain = key_chain(directory)
    return dump(chain) if chain is not None else None


def rotate_signing_key(directory: Path) -> tuple[FleetSigner, FleetSigner, FleetKeys]:
    """Make a new signing key; (old, new, keys message signed by the old key).

    The keys message trusts the new key and the one it replaces (so desired states still
    retained under the old signature keep verifying); the key before that drops out. It is
    written before the new key replaces `signing.key`, so agents learn the new key through a
    message signed by a key they already trust.
    """
    old = FleetSigner.load_or_create(directory)
    chain = key_chain(directory)
    links = chain.links if chain is not None else ()
    version = links[-1].version + 1 if links else 1
    new_key = _new_key()
    new = FleetSigner(new_key)
    keys = old.sign(
        FleetKeys(version=version, keys=(new.public_b64, old.public_b64), ts=time.time())
    )
    # The chain first (what agents walk), then the latest link; the oldest links drop out past
    # MAX_CHAIN_LINKS (a device that slept through that many rotations is re-provisioned).
    write_private(
        directory / KEY_CHAIN, dump(FleetKeyChain(links=(*links, keys)[-MAX_CHAIN_LINKS:]))
    )
    write_private(directory / FLEET_KEYS, dump(keys))
    retired = private_dir(directory / RETIRED_DIR)
    write_private(retired / f"{old.key_id}.key", (directory / SIGNING_KEY).read_bytes())
    write_private(directory / SIGNING_KEY, _pem(new_key))
    return old, new, keys


def describe(directory: Path) -> dict[str, object]:
    """Key id, public key and keys-message version, for `edgefleet keys show`."""
    signer = FleetSigner.load_or_create(directory)
    chain = key_chain(directory)
    latest = chain.links[-1] if chain is not None else None
    return {
        "key_id": signer.key_id,
        "public_key": signer.public_b64,
        "keys_version": latest.version if latest else 0,
        "trusted": list(latest.keys) if latest else [signer.public_b64],
        "chain_length": len(chain.links) if chain is not None else 0,
    }

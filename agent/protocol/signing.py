"""What a fleet signature covers: the canonical encoding of a message without its `sig` field.

Both sides build the same bytes from the parsed message (not from the wire bytes), so the
controller may serialize however it likes and a field added later with a default is covered
once it is set. Standard library only; the ed25519 arithmetic lives in agent/trust.py
(verify) and controller/security/signing.py (sign).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from agent.protocol.errors import ProtocolError
from agent.protocol.schema import decode_dataclass, encode

# Hex characters of sha256(raw public key) that name a key: 64 bits tell a handful of fleet
# keys apart with no chance of an accidental collision, and stay readable in logs.
KEY_ID_HEX = 16
# Raw ed25519 public keys and signatures (RFC 8032).
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def canonical_bytes(message: object) -> bytes:
    """JSON of the message with sorted keys, no spaces and no `sig` field: the signed bytes.

    The message is first decoded as the receiver would decode it, so a value the sender
    built with another Python type (an int in a float field: `50` vs `50.0`) signs as what the
    receiver will see.
    """
    data: Any = encode(message)
    if not isinstance(data, dict):
        raise ProtocolError("only a message object can be signed")
    data = encode(decode_dataclass(data, type(message)))
    data.pop("sig", None)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def key_id(public_key: bytes) -> str:
    """The id of a raw ed25519 public key: the first 16 hex of its sha256."""
    return hashlib.sha256(public_key).hexdigest()[:KEY_ID_HEX]


def decode_b64(text: str, expected_len: int, what: str) -> bytes:
    """Strict base64 of exactly `expected_len` bytes, else ProtocolError naming `what`."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{what}: not valid base64") from None
    if len(raw) != expected_len:
        raise ProtocolError(f"{what}: {len(raw)} bytes, expected {expected_len}")
    return raw


def encode_b64(raw: bytes) -> str:
    """Standard base64 text of raw bytes."""
    return base64.b64encode(raw).decode("ascii")

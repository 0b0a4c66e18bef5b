"""The fleet key rotation chain: every key message since the first, each signed by its
predecessor's key, so a device offline across any number of rotations walks up to the current
keys (as TUF rotates root keys). Published retained on `fleet/keys` in place of the single
latest `FleetKeys` message, which is still accepted (a chain of one).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from agent.protocol.errors import ProtocolError
from agent.protocol.limits import SCHEMA_VERSION
from agent.protocol.messages import FleetKeys, _check_version, parse

__all__ = ["MAX_CHAIN_LINKS", "FleetKeyChain", "parse_fleet_keys"]

# Most rotations kept in the chain: one link is ~0.5 KB (8 keys at most plus a signature), so
# 64 stay far below the JSON cap; a device that slept through more rotations than that (years
# at a monthly rotation) is re-provisioned with a new bundle (docs/security.md).
MAX_CHAIN_LINKS = 64


@dataclass(frozen=True)
class FleetKeyChain:
    """Rotation links in version order; link N is signed by a key link N-1 trusts."""

    links: tuple[FleetKeys, ...]
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        """Bound the chain and require strictly increasing versions."""
        _check_version(self.v)
        if not 1 <= len(self.links) <= MAX_CHAIN_LINKS:
            raise ProtocolError(f"$.links: must hold 1-{MAX_CHAIN_LINKS} key messages")
        versions = [link.version for link in self.links]
        if any(b <= a for a, b in itertools.pairwise(versions)):
            raise ProtocolError(f"$.links: versions must strictly increase, got {versions}")


def parse_fleet_keys(payload: bytes) -> FleetKeyChain:
    """A chain from the keys topic: a chain message, or one FleetKeys (a chain of one)."""
    if b'"links"' in payload:
        return parse(payload, FleetKeyChain)
    return FleetKeyChain(links=(parse(payload, FleetKeys),))

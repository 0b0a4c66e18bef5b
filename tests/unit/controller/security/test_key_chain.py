"""Key rotation as a chain (issue 21, finding 5): a device offline across any number of
rotations walks the chain up to the current keys; broken, forged or reordered chains are refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from agent.protocol import FleetKeyChain, FleetKeys, ProtocolError, dump, parse_fleet_keys
from agent.trust import SecurityRejected, TrustStore
from controller.security.signing import (
    FleetSigner,
    current_fleet_keys,
    describe,
    key_chain,
    rotate_signing_key,
)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """A fresh controller's security dir."""
    return tmp_path / "home" / "security"


def _device(tmp_path: Path, name: str, keys: tuple[str, ...]) -> TrustStore:
    """A device trust store seeded with `keys` (its agent.toml)."""
    return TrustStore(keys, tmp_path / name / "trusted_keys.json")


def test_device_offline_across_three_rotations_catches_up(tmp_path: Path, directory: Path) -> None:
    first = FleetSigner.load_or_create(directory)
    device = _device(tmp_path, "offline", (first.public_b64,))
    signers = [rotate_signing_key(directory)[1] for _ in range(3)]
    published = current_fleet_keys(directory)
    assert published is not None
    chain = parse_fleet_keys(published)
    assert [link.version for link in chain.links] == [1, 2, 3]
    # Only the latest link (what used to be published) is signed by a key the device lacks.
    with pytest.raises(SecurityRejected, match="unknown key"):
        device.accept_keys(chain.links[-1])
    assert device.accept_chain(chain)
    assert device.version == 3
    assert device.key_ids == sorted([signers[2].key_id, signers[1].key_id])
    saved = json.loads(device.path.read_text())
    assert saved["version"] == 3
    assert not device.accept_chain(chain)  # retained re-delivery: a no-op


def test_bundle_written_after_rotations_starts_mid_chain(tmp_path: Path, directory: Path) -> None:
    FleetSigner.load_or_create(directory)
    rotate_signing_key(directory)
    rotate_signing_key(directory)
    trusted = tuple(describe(directory)["trusted"])  # type: ignore[arg-type]
    device = _device(tmp_path, "new", trusted)
    rotate_signing_key(directory)
    published = current_fleet_keys(directory)
    assert published is not None
    assert device.accept_chain(parse_fleet_keys(published)) and device.version == 3


def test_forged_or_broken_links_are_refused(tmp_path: Path, directory: Path) -> None:
    first = FleetSigner.load_or_create(directory)
    for _ in range(2):
        rotate_signing_key(directory)
    chain = key_chain(directory)
    assert chain is not None
    stranger = FleetSigner.load_or_create(tmp_path / "stranger")
    forged_link = stranger.sign(FleetKeys(version=3, keys=(stranger.public_b64,)))
    # A forged third link after two good ones: the good ones are kept, the forged one refused.
    device = _device(tmp_path, "a", (first.public_b64,))
    with pytest.raises(SecurityRejected, match="unknown key"):
        device.accept_chain(FleetKeyChain(links=(*chain.links, forged_link)))
    assert device.version == 2
    # A tampered middle link breaks everything after it.
    device_b = _device(tmp_path, "b", (first.public_b64,))
    tampered = dataclasses.replace(chain.links[0], keys=(stranger.public_b64,))
    with pytest.raises(SecurityRejected, match="bad signature"):
        device_b.accept_chain(FleetKeyChain(links=(tampered, chain.links[1])))
    assert device_b.version == 0 and not device_b.path.exists()
    # Versions out of order or repeated are malformed.
    with pytest.raises(ProtocolError, match="strictly increase"):
        FleetKeyChain(links=(chain.links[1], chain.links[0]))
    with pytest.raises(ProtocolError, match="1-64"):
        FleetKeyChain(links=())


def test_single_keys_message_still_parses_as_a_chain(directory: Path) -> None:
    FleetSigner.load_or_create(directory)
    _, _, keys = rotate_signing_key(directory)
    chain = parse_fleet_keys(dump(keys))
    assert chain.links == (keys,)
    # A data dir from before the chain (only fleet_keys.json) publishes that link as the chain.
    (directory / "fleet_keys_chain.json").unlink()
    assert key_chain(directory) == FleetKeyChain(links=(keys,))
    _, _, keys2 = rotate_signing_key(directory)
    assert [link.version for link in key_chain(directory).links] == [1, 2]  # type: ignore[union-attr]
    assert keys2.version == 2

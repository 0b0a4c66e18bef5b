"""Signed desired state: canonical encoding, ed25519 sign/verify, the agent's checks, rotation."""

from __future__ import annotations

import dataclasses
import json
import stat
import time
from pathlib import Path

import pytest

from tests.paths import TEST_DATA

# Signing and verifying need `cryptography` (controller env; the slim device env lacks it).
pytest.importorskip("cryptography")
from typer.testing import CliRunner

from agent.protocol import (
    ArtifactRef,
    Desired,
    FleetKeyChain,
    FleetKeys,
    Manifest,
    ProtocolError,
    Signature,
    Topics,
    dump,
    parse,
)
from agent.protocol.config import (
    AgentConfig,
    ConfigError,
    config_from_dict,
    dump_config,
    load_config,
)
from agent.protocol.signing import canonical_bytes, key_id
from agent.trust import SecurityRejected, TrustStore
from controller.cli.security import keys_app
from controller.fleet.artifacts import build_manifest
from controller.fleet.registry import Fleet
from controller.security.broker_config import acl_text
from controller.security.identity import FleetSecurity
from controller.security.signing import (
    DESIRED_VALIDITY_S,
    FleetSigner,
    current_fleet_keys,
    rotate_signing_key,
)

DATA = TEST_DATA
SHA = "ab" * 32


def _desired(**changes: object) -> Desired:
    """A desired state for dev-1 (profile rpi4), valid for an hour, generation 5."""
    base = Desired(
        generation=5,
        deployment_id="dep-1",
        artifact=ArtifactRef(sha256=SHA, size=100, name="m", version="1"),
        device_id="dev-1",
        profile="rpi4",
        expires=time.time() + 3600,
        latency_budget_ms=50,  # an int in a float field: must sign as the receiver decodes it
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def signer(tmp_path: Path) -> FleetSigner:
    """The fleet key of a fresh controller home."""
    return FleetSigner.load_or_create(tmp_path / "home" / "security")


@pytest.fixture
def trust(tmp_path: Path, signer: FleetSigner) -> TrustStore:
    """An agent trust store holding the fleet key."""
    return TrustStore((signer.public_b64,), tmp_path / "agent" / "trusted_keys.json")


def _check(trust: TrustStore, desired: Desired, *, highest: int = 4, applied: int = 4) -> None:
    """The agent's desired-state check for dev-1 / rpi4."""
    trust.check_desired(
        desired,
        device_id="dev-1",
        profile="rpi4",
        highest_generation=highest,
        applied_generation=applied,
    )


def test_canonical_bytes_sorted_compact_without_sig_and_as_decoded() -> None:
    desired = _desired()
    text = canonical_bytes(desired)
    data = json.loads(text)
    assert "sig" not in data and list(data) == sorted(data)
    assert b" " not in text and data["latency_budget_ms"] == 50.0
    assert b'"latency_budget_ms":50.0' in text  # as the agent decodes it, not the int 50
    signed = dataclasses.replace(desired, sig=Signature(key_id="k", value="v"))
    assert canonical_bytes(signed) == text
    assert canonical_bytes(parse(dump(desired), Desired)) == text


def test_signature_survives_the_wire_and_verifies(signer: FleetSigner, trust: TrustStore) -> None:
    signed = signer.sign(_desired())
    assert signed.sig is not None and signed.sig.key_id == key_id(signer.public_raw)
    assert len(signer.key_id) == 16
    _check(trust, parse(dump(signed), Desired))
    manifest = signer.sign(
        build_manifest(
            DATA / "tiny_fp32.tflite", name="t", version="1", recipe="fp32", profile=None
        )
    )
    trust.check_manifest(parse(dump(manifest), Manifest))


def test_old_messages_without_the_new_fields_still_parse() -> None:
    old = b'{"generation":1,"deployment_id":"d","artifact":null,"v":1}'
    desired = parse(old, Desired)
    assert desired.sig is None and desired.device_id is None and desired.expires is None
    with pytest.raises(ProtocolError, match=r"\$\.signature: unknown field"):
        parse(b'{"generation":1,"deployment_id":"d","artifact":null,"signature":1,"v":1}', Desired)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s, d: dataclasses.replace(d, sig=None), "unsigned desired state"),
        (lambda s, d: dataclasses.replace(s.sign(d), generation=9), "bad signature"),
        (
            lambda s, d: dataclasses.replace(
                s.sign(d), artifact=dataclasses.replace(d.artifact, sha256="cd" * 32)
            ),
            "bad signature",
        ),
        (
            lambda s, d: dataclasses.replace(
                s.sign(d), sig=Signature(key_id=s.key_id, value="AAAA")
            ),
            "malformed signature",
        ),
        (lambda s, d: s.sign(dataclasses.replace(d, device_id="dev-2")), "for device 'dev-2'"),
        (lambda s, d: s.sign(dataclasses.replace(d, device_id=None)), "for device None"),
        (lambda s, d: s.sign(dataclasses.replace(d, profile="rpi5")), "for profile 'rpi5'"),
        (lambda s, d: s.sign(dataclasses.replace(d, generation=3)), "older than generation 4"),
        (lambda s, d: s.sign(dataclasses.replace(d, expires=time.time() - 5)), "expired"),
        (lambda s, d: s.sign(dataclasses.replace(d, expires=None)), "has no expiry"),
    ],
)
def test_each_forgery_is_refused_with_its_reason(
    signer: FleetSigner, trust: TrustStore, mutate: object, reason: str
) -> None:
    message = mutate(signer, _desired())  # type: ignore[operator]
    with pytest.raises(SecurityRejected, match=reason):
        _check(trust, message)


def test_redelivery_of_the_applied_generation_is_accepted_even_expired(
    signer: FleetSigner, trust: TrustStore
) -> None:
    applied = signer.sign(_desired(generation=4, expires=time.time() - 5))
    _check(trust, applied)  # same generation: the retained message again; no action follows
    with pytest.raises(SecurityRejected, match="expired"):
        _check(trust, applied, applied=3)  # would be acted on: expiry matters


def test_unknown_key_refused(tmp_path: Path, trust: TrustStore) -> None:
    stranger = FleetSigner.load_or_create(tmp_path / "stranger")
    with pytest.raises(SecurityRejected, match=f"unknown key {stranger.key_id}"):
        _check(trust, stranger.sign(_desired()))


def test_no_keys_means_not_enforcing(tmp_path: Path) -> None:
    assert not TrustStore((), tmp_path / "k.json").enforcing


def test_signing_key_file_is_private_and_stable(tmp_path: Path) -> None:
    directory = tmp_path / "home" / "security"
    first = FleetSigner.load_or_create(directory)
    assert stat.S_IMODE((directory / "signing.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert FleetSigner.load_or_create(directory).key_id == first.key_id
    assert [p.name for p in directory.iterdir()] == ["signing.key"]  # no temp files left


def test_rotation_signed_by_old_key_is_adopted_and_persisted(
    tmp_path: Path, signer: FleetSigner, trust: TrustStore
) -> None:
    directory = tmp_path / "home" / "security"
    old, new, keys = rotate_signing_key(directory)
    assert old.key_id == signer.key_id and new.key_id != old.key_id
    assert keys.version == 1 and keys.keys == (new.public_b64, old.public_b64)
    # What is published is the rotation chain (agents walk it), here one link.
    assert current_fleet_keys(directory) == dump(FleetKeyChain(links=(keys,)))
    assert FleetSigner.load_or_create(directory).key_id == new.key_id
    assert (directory / "retired" / f"{old.key_id}.key").exists()
    with pytest.raises(SecurityRejected, match="unknown key"):
        _check(trust, new.sign(_desired()))
    assert trust.accept_keys(parse(dump(keys), FleetKeys))
    assert not trust.accept_keys(keys)  # the retained message again: no-op
    _check(trust, new.sign(_desired()))
    _check(trust, old.sign(_desired()))  # the replaced key stays trusted until the next rotation
    saved = json.loads(trust.path.read_text())
    assert saved == {"version": 1, "keys": [new.public_b64, old.public_b64]}
    # A restarted agent uses the persisted set, not agent.toml's original key.
    reloaded = TrustStore((signer.public_b64,), trust.path)
    assert reloaded.version == 1 and reloaded.key_ids == sorted([new.key_id, old.key_id])
    # The second rotation drops the first key.
    _, newest, keys2 = rotate_signing_key(directory)
    assert keys2.version == 2 and keys2.keys == (newest.public_b64, new.public_b64)
    assert trust.accept_keys(keys2)
    with pytest.raises(SecurityRejected, match="unknown key"):
        _check(trust, old.sign(_desired()))
    with pytest.raises(SecurityRejected, match="unknown key"):
        trust.accept_keys(keys)  # signed by the key that just dropped out
    rollback = new.sign(FleetKeys(version=1, keys=(old.public_b64,)))  # a still-trusted key
    with pytest.raises(SecurityRejected, match="older than version 2"):
        trust.accept_keys(rollback)


def test_keys_signed_by_a_stranger_or_tampered_are_refused(
    tmp_path: Path, signer: FleetSigner, trust: TrustStore
) -> None:
    stranger = FleetSigner.load_or_create(tmp_path / "stranger")
    hostile = stranger.sign(FleetKeys(version=7, keys=(stranger.public_b64,)))
    with pytest.raises(SecurityRejected, match="unknown key"):
        trust.accept_keys(hostile)
    tampered = dataclasses.replace(
        signer.sign(FleetKeys(version=7, keys=(signer.public_b64,))), keys=(stranger.public_b64,)
    )
    with pytest.raises(SecurityRejected, match="bad signature"):
        trust.accept_keys(tampered)
    assert not trust.path.exists() and trust.key_ids == [signer.key_id]


def test_corrupt_trusted_keys_file_falls_back_to_config(
    tmp_path: Path, signer: FleetSigner
) -> None:
    path = tmp_path / "trusted_keys.json"
    path.write_text("[1, 2")
    store = TrustStore((signer.public_b64,), path)
    assert store.problem is not None and store.key_ids == [signer.key_id]


def test_fleet_keys_message_bounds() -> None:
    with pytest.raises(ProtocolError, match="keys"):
        FleetKeys(version=1, keys=())
    with pytest.raises(ProtocolError, match="version"):
        FleetKeys(version=0, keys=("a",))
    topics = Topics("edgefleet/v1")
    parsed = topics.parse(topics.fleet_keys())
    assert (parsed.kind, parsed.channel) == ("fleet", "keys")


def test_devices_may_read_but_not_write_the_fleet_keys() -> None:
    lines = acl_text("edgefleet/v1").splitlines()
    assert "pattern read edgefleet/v1/fleet/keys" in lines
    assert not [line for line in lines if "fleet/keys" in line and "write" in line]


def test_config_trusted_keys_round_trip_and_bad_key(tmp_path: Path, signer: FleetSigner) -> None:
    config = AgentConfig(device_id="d", data_dir=tmp_path, trusted_keys=(signer.public_b64,))
    path = tmp_path / "agent.toml"
    path.write_text(dump_config(config))
    assert load_config(path).trusted_keys == (signer.public_b64,)
    assert "trusted_keys =" not in dump_config(AgentConfig(device_id="d", data_dir=tmp_path))
    with pytest.raises(ConfigError, match="not valid base64"):
        config_from_dict({"device_id": "d", "data_dir": "/x", "trusted_keys": ["!!"]})
    with pytest.raises(ConfigError, match=r"'trusted_keys\[0\]': expected a string, got int"):
        config_from_dict({"device_id": "d", "data_dir": "/x", "trusted_keys": [1]})


def test_fleet_signs_what_it_publishes(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "home")
    try:
        fleet.register_device("dev-1", "rpi4")
        fleet.deploy(DATA / "tiny_fp32.tflite", devices=["dev-1"])
        [(device, desired, manifests)] = fleet.unpublished_desired()
    finally:
        fleet.close()
    signer = FleetSigner.load_or_create(tmp_path / "home" / "security")
    trust = TrustStore((signer.public_b64,), tmp_path / "k.json")
    assert device == "dev-1" and desired.device_id == "dev-1" and desired.profile == "rpi4"
    assert desired.expires is not None
    assert (
        time.time() + DESIRED_VALIDITY_S - 60 < desired.expires <= time.time() + DESIRED_VALIDITY_S
    )
    trust.check_desired(
        parse(dump(desired), Desired),
        device_id="dev-1",
        profile="rpi4",
        highest_generation=0,
        applied_generation=0,
    )
    for manifest in manifests:
        trust.check_manifest(parse(dump(manifest), Manifest))


def test_bundle_carries_the_fleet_verify_key(tmp_path: Path) -> None:
    security = FleetSecurity(tmp_path / "home")
    creds = security.provision_device("cam-1", "password", tmp_path / "bundle")
    path = security.write_bundle(
        creds, tmp_path / "bundle", broker_url="mqtts://b:8883", profile="rpi4"
    )
    signer = FleetSigner.load_or_create(security.directory)
    assert load_config(path).trusted_keys == (signer.public_b64,)


def test_keys_cli_show_and_rotate(tmp_path: Path) -> None:
    home = tmp_path / "home"
    runner = CliRunner()
    shown = runner.invoke(keys_app, ["show", "--home", str(home), "--json"])
    assert shown.exit_code == 0, shown.output
    before = json.loads(shown.output)
    rotated = runner.invoke(keys_app, ["rotate", "--home", str(home), "--json"])
    assert rotated.exit_code == 0, rotated.output
    info = json.loads(rotated.output)
    assert info["old_key_id"] == before["key_id"] and info["keys_version"] == 1
    after = json.loads(runner.invoke(keys_app, ["show", "--home", str(home), "--json"]).output)
    assert after["key_id"] == info["new_key_id"] and after["keys_version"] == 1
    assert after["trusted"] == [info["new_public_key"], before["public_key"]]

"""Signed desired state end to end: real controller, real agent with trusted keys, mosquitto.

Forged, replayed, expired and misbound messages are injected by an MQTT probe publishing
retained on the device's desired topic and an artifact's manifest topic; each must be refused
with its reason in a security event stored by the controller while the previous model serves on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import InferenceClient, wait_for_service
from agent.protocol import ArtifactRef, Desired, FleetKeys, Topics, dump, parse
from controller.security.signing import FleetSigner, rotate_signing_key
from tests.e2e.conftest import DATA, AgentProcess, RunningController, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.parametrize("e2e_broker", ["mosquitto"], indirect=True),
]

# First deployments include a cold interpreter import in the self-test child: allow for it.
DEPLOY_TIMEOUT_S = 60
MODEL_A = DATA / "tiny_fp32.tflite"
MODEL_B = DATA / "tiny_int8.tflite"


def _sha(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _deploy(ctl: RunningController, model: Path, device: str, **kw: Any) -> None:
    """Deploy one model to one device and require success."""
    dep = ctl.fleet.deploy(model, devices=[device], **kw)

    def finished() -> dict[str, Any] | None:
        row = ctl.fleet.deployment(dep["id"])["devices"][0]
        return row if row["state"] in ("succeeded", "failed") else None

    row = wait_until(finished, DEPLOY_TIMEOUT_S, f"deployment of {model.name}")
    assert row["state"] == "succeeded", row


def _security_events(ctl: RunningController, device: str) -> list[str]:
    """Messages of the security events the controller stored for a device."""
    rows = ctl.fleet.db.query(
        "SELECT message FROM events WHERE device_id = ? AND kind = 'security' ORDER BY ts",
        (device,),
    )
    return [r["message"] for r in rows]


def _wait_security_event(ctl: RunningController, device: str, reason: str) -> str:
    """The first stored security event of `device` whose message contains `reason`."""
    return wait_until(
        lambda: next((m for m in _security_events(ctl, device) if reason in m), None),
        20,
        f"security event {reason!r} from {device}",
    )


def _assert_serving(ctl: RunningController, agent: AgentProcess, sha: str, generation: int) -> None:
    """The device reports `sha` at `generation` and answers an inference."""
    device = ctl.fleet.device(agent.config.device_id)
    assert device["model_sha256"] == sha and device["reported_generation"] == generation, device
    assert agent.config.socket_path is not None
    wait_for_service(agent.config.socket_path, 10)
    with InferenceClient(agent.config.socket_path) as client:
        assert client.model_info()["model_sha256"] == sha
        spec = client.model_info()["inputs"][0]
        out = client.infer(np.zeros(spec["shape"], dtype=spec["dtype"]))
        assert np.all(np.isfinite(np.asarray(out)))


def test_signed_rollout_then_forged_messages_are_refused(
    controller: RunningController,
    start_agent: Callable[..., AgentProcess],
    mqtt_probe: Callable[..., Any],
    e2e_broker: Any,
    topic_root: str,
) -> None:
    agent = start_agent("dev-s", profile="rpi4")
    assert agent.config.trusted_keys, "the e2e fixture gives agents the controller's key"
    topics = Topics(topic_root)
    probe = mqtt_probe(e2e_broker)
    probe.subscribe(topics.desired("dev-s"))
    wait_until(
        lambda: controller.fleet.has_device("dev-s") and controller.fleet.device("dev-s")["online"],
        30,
        "hello from dev-s",
    )
    sha_a, sha_b = _sha(MODEL_A), _sha(MODEL_B)

    _deploy(controller, MODEL_A, "dev-s", name="tiny", version="1")
    first = _current_desired(controller, probe, topics)
    assert first.sig is not None and first.device_id == "dev-s"
    assert first.profile == "rpi4" and first.expires is not None
    _deploy(controller, MODEL_B, "dev-s", name="tiny", version="2")
    # A deliberate downgrade is a new signed desired state with a higher generation.
    _deploy(controller, MODEL_A, "dev-s", name="tiny", version="1")
    current = _current_desired(controller, probe, topics)
    assert current.generation > first.generation  # generations grow (ms timestamps)
    _assert_serving(controller, agent, sha_a, current.generation)
    assert not _security_events(controller, "dev-s"), agent.log()[-3000:]

    signer = FleetSigner.load_or_create(controller.home / "security")
    ref_b = ArtifactRef(sha256=sha_b, size=MODEL_B.stat().st_size, name="tiny", version="2")
    forged = dataclasses.replace(
        current, generation=current.generation + 10, artifact=ref_b, sig=None
    )
    cases: list[tuple[str, bytes, str]] = [
        ("unsigned", dump(forged), "unsigned desired state"),
        ("tampered", _tampered(current, sha_b), "bad signature"),
        (
            "wrong device",
            dump(signer.sign(dataclasses.replace(forged, device_id="dev-t"))),
            "for device 'dev-t'",
        ),
        (
            "wrong profile",
            dump(signer.sign(dataclasses.replace(forged, profile="jetson-nano"))),
            "for profile 'jetson-nano'",
        ),
        (
            "replay",
            dump(first),
            f"generation {first.generation} is older than generation {current.generation}",
        ),
        (
            "expired",
            dump(signer.sign(dataclasses.replace(forged, expires=time.time() - 60))),
            "expired",
        ),
        ("no expiry", dump(signer.sign(dataclasses.replace(forged, expires=None))), "no expiry"),
        ("stranger", dump(FleetSigner.from_pem(_stranger_pem()).sign(forged)), "unknown key"),
    ]
    for label, payload, reason in cases:
        probe.publish(topics.desired("dev-s"), payload, retain=True)
        message = _wait_security_event(controller, "dev-s", reason)
        assert "desired" in message, (label, message)
        _assert_serving(controller, agent, sha_a, current.generation)

    # Re-delivery of the current signed desired state (what every reconnect does) is no event.
    before = len(_security_events(controller, "dev-s"))
    probe.publish(topics.desired("dev-s"), dump(current), retain=True)
    probe.publish(topics.desired("dev-s"), dump(current), retain=True)
    agent.terminate()
    agent.start()  # the retained gen 3 is delivered again on subscribe
    wait_until(lambda: controller.fleet.device("dev-s")["online"], 30, "dev-s back online")
    _assert_serving(controller, agent, sha_a, current.generation)
    assert len(_security_events(controller, "dev-s")) == before

    # Tampered manifest: a properly signed desired state for B, but B's retained manifest has a
    # flipped chunk hash (the controller's signature kept): refused, the update fails, A serves.
    manifest_b = signer.sign(controller.fleet.manifest(sha_b))
    flipped = manifest_b.chunk_sha256[0][::-1]
    bad_manifest = dataclasses.replace(
        manifest_b, chunk_sha256=(flipped, *manifest_b.chunk_sha256[1:])
    )
    probe.publish(topics.manifest(sha_b), dump(bad_manifest), retain=True)
    desired_b = signer.sign(
        dataclasses.replace(
            current,
            generation=current.generation + 11,
            artifact=ref_b,
            deployment_id="dep-forgedmanifest",
            expires=time.time() + 600,
        )
    )
    probe.publish(topics.desired("dev-s"), dump(desired_b), retain=True)
    message = _wait_security_event(controller, "dev-s", f"manifest of {sha_b[:12]}")
    assert "bad signature" in message
    wait_until(lambda: agent_state(agent) == "failed", 20, "the forged-manifest update failed")
    device = controller.fleet.device("dev-s")
    assert device["model_sha256"] == sha_a, device
    assert agent.alive


def _current_desired(ctl: RunningController, probe: Any, topics: Topics) -> Desired:
    """The signed desired state the controller published for dev-s at its current generation."""
    generation = ctl.fleet.device("dev-s")["desired_generation"]
    message = probe.wait_for(
        topics.desired("dev-s"), lambda m: parse(m.payload, Desired).generation == generation
    )
    return parse(message.payload, Desired)


def agent_state(agent: AgentProcess) -> str:
    """The agent's persisted update state."""
    return str(json.loads((agent.config.data_dir / "update.json").read_text())["state"])


def _tampered(signed: Desired, sha: str) -> bytes:
    """The signed desired state with its artifact digest and generation changed, sig kept."""
    data = json.loads(dump(signed))
    data["artifact"]["sha256"] = sha
    data["generation"] += 10
    return json.dumps(data).encode()


def _stranger_pem() -> bytes:
    """A signing key the fleet never trusted."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_key_rotation_signed_by_old_key_is_trusted_stranger_refused(
    controller: RunningController,
    start_agent: Callable[..., AgentProcess],
    mqtt_probe: Callable[..., Any],
    e2e_broker: Any,
    topic_root: str,
) -> None:
    agent = start_agent("dev-k", profile="rpi4")
    wait_until(
        lambda: controller.fleet.has_device("dev-k") and controller.fleet.device("dev-k")["online"],
        30,
        "hello from dev-k",
    )
    _deploy(controller, MODEL_A, "dev-k", name="tiny", version="1")
    old, new, keys = rotate_signing_key(controller.home / "security")
    assert keys.sig is not None and keys.sig.key_id == old.key_id
    # Signed by the new key from now on; the agent learnt it from the old key's keys message.
    _deploy(controller, MODEL_B, "dev-k", name="tiny", version="2")
    _assert_serving(
        controller, agent, _sha(MODEL_B), controller.fleet.device("dev-k")["desired_generation"]
    )
    saved = json.loads((agent.config.data_dir / "trusted_keys.json").read_text())
    assert saved == {"version": 1, "keys": [new.public_b64, old.public_b64]}
    probe = mqtt_probe(e2e_broker)
    desired = parse(
        wait_until(lambda: _retained(probe, Topics(topic_root).desired("dev-k")), 10, "desired"),
        Desired,
    )
    assert desired.sig is not None and desired.sig.key_id == new.key_id

    stranger = FleetSigner.from_pem(_stranger_pem())
    hostile = stranger.sign(FleetKeys(version=5, keys=(stranger.public_b64,)))
    probe.publish(Topics(topic_root).fleet_keys(), dump(hostile), retain=True)
    message = _wait_security_event(controller, "dev-k", "fleet keys version 5")
    assert f"unknown key {stranger.key_id}" in message
    assert json.loads((agent.config.data_dir / "trusted_keys.json").read_text()) == saved
    _assert_serving(
        controller, agent, _sha(MODEL_B), controller.fleet.device("dev-k")["desired_generation"]
    )


def _retained(probe: Any, topic: str) -> bytes | None:
    """The retained message on `topic` (subscribing once), or None until it arrived."""
    if topic not in probe.__dict__.setdefault("_subscribed_topics", set()):
        probe.subscribe(topic)
        probe.__dict__["_subscribed_topics"].add(topic)
    found = probe.messages(topic)
    return found[-1].payload if found else None

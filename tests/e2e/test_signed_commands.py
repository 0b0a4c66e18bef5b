"""Commands are authenticated like desired states, and bounded (issue 21, finding 1).

A real agent behind the generated secured mosquitto config; the attacker publishes on the
device's `cmd` topic with mosquitto_pub as the controller user. Unsigned, tampered,
misaddressed, expired, replayed and stranger-signed commands are refused with a security
event, the model keeps serving, and a properly signed rollback still works. A benchmark asking
for 100,000,000 runs is refused at parse time; SIGTERM during a long benchmark is answered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import time
from pathlib import Path

import pytest

from agent.protocol import Command, dump
from controller.security.signing import FleetSigner, sign_command
from tests.e2e.conftest import DATA
from tests.e2e.secured_fleet import SecuredFleet
from tests.e2e.secured_fleet import secured as secured
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL_A = DATA / "tiny_fp32.tflite"
MODEL_B = DATA / "tiny_int8.tflite"
# What the agent documents (docs/agent.md, "Stopping"): it exits within 10 s of SIGTERM.
SIGTERM_ANSWER_S = 10.0


def _sha(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stranger() -> FleetSigner:
    """A signing key the fleet never trusted."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return FleetSigner(Ed25519PrivateKey.generate())


def test_forged_commands_are_refused_and_signed_ones_work(secured: SecuredFleet) -> None:
    agent = secured.start_agent("dev-a")
    assert agent.config.trusted_keys, "bundles carry the fleet verify key"
    secured.wait_online(agent)
    secured.deploy(MODEL_A, "dev-a", name="tiny", version="1")
    secured.deploy(MODEL_B, "dev-a", name="tiny", version="2")
    sha_b = _sha(MODEL_B)
    signer = FleetSigner.load_or_create(secured.home / "security")
    cmd_topic = secured.topic("dev-a", "cmd")
    rollback = Command(command_id="atk-rollback", action="rollback")

    def still_serving_b() -> None:
        device = secured.fleet.device("dev-a")
        assert device["model_sha256"] == sha_b and device["state"] != "rolled_back", device
        assert agent.alive, agent.log()[-3000:]

    # The exact attack: an unsigned rollback from anyone with write access.
    secured.attacker_pub(cmd_topic, b'{"command_id":"x","action":"rollback","v":1}')
    message = secured.wait_event("dev-a", "security", "unsigned command x (rollback)")
    assert message.startswith(f"refused message on {cmd_topic}: ")
    still_serving_b()

    # An unbounded benchmark is refused when parsed, signed or not.
    secured.attacker_pub(
        cmd_topic, b'{"command_id":"big","action":"benchmark","runs":100000000,"v":1}'
    )
    secured.wait_event("dev-a", "rejected", "$.runs: must be 1..10000, got 100000000")

    # Captured earlier (a lower counter), delivered after a newer command: a replay.
    stale = secured.fleet.sign_command("dev-a", dataclasses.replace(rollback, command_id="old"))
    accepted = secured.fleet.sign_command(
        "dev-a", Command(command_id="ok-status", action="resend_status")
    )
    tampered = json.loads(dump(accepted))
    tampered["action"] = "rollback"
    cases = [
        (json.dumps(tampered).encode(), "security", "bad signature"),
        (
            dump(secured.fleet.sign_command("dev-x", rollback)),
            "security",
            "for device 'dev-x', this is 'dev-a'",
        ),
        (
            dump(sign_command(signer, rollback, "dev-a", now=time.time() - 7200)),
            "security",
            "(rollback) expired",
        ),
        (dump(sign_command(_stranger(), rollback, "dev-a")), "security", "unknown key"),
        (
            dump(dataclasses.replace(sign_command(signer, rollback, "dev-a"), expires=None)),
            "security",
            "bad signature",  # the expiry is covered by the signature
        ),
    ]
    for payload, kind, reason in cases:
        secured.attacker_pub(cmd_topic, payload)
        secured.wait_event("dev-a", kind, reason)
        still_serving_b()

    # Replay: `stale` was signed before `accepted`; once the newer counter is in, it is dead.
    secured.attacker_pub(cmd_topic, dump(accepted))
    secured.wait_event("dev-a", "command", "resend_status done")
    secured.attacker_pub(cmd_topic, dump(stale))
    message = secured.wait_event("dev-a", "security", "command old (rollback): counter")
    assert "(replay)" in message
    still_serving_b()
    # The counter survives a restart (persisted before the command runs).
    agent.terminate()
    agent.start()
    secured.wait_online(agent)
    before = len(secured.events("dev-a", "security"))
    secured.attacker_pub(cmd_topic, dump(stale))
    wait_until(
        lambda: len(secured.events("dev-a", "security")) > before, 20, "replay refused again"
    )
    still_serving_b()

    # The controller's own signed rollback still works.
    secured.fleet.send_command("dev-a", "rollback")
    wait_until(
        lambda: secured.fleet.device("dev-a")["model_sha256"] == _sha(MODEL_A),
        30,
        f"signed rollback\n{agent.log()[-3000:]}",
    )


def test_sigterm_is_answered_during_a_long_benchmark(secured: SecuredFleet) -> None:
    sha_a = _sha(MODEL_A)
    # 50 ms per benchmark invoke: 10,000 runs would take over 8 minutes.
    agent = secured.start_agent(
        "dev-b", env={"EDGEFLEET_INJECT_BENCHMARK_LATENCY_MS": f"{sha_a[:16]}:50"}
    )
    secured.wait_online(agent)
    secured.deploy(MODEL_A, "dev-b", name="tiny", version="1")
    secured.fleet.send_command("dev-b", "benchmark", runs=10_000, warmup=0)
    wait_until(lambda: "10000 runs after 0 warm-up" in agent.log(), 30, "benchmark started")
    time.sleep(1.0)  # well inside the timed loop
    assert agent.proc is not None
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    code = agent.proc.wait(60)
    took = time.monotonic() - started
    print(f"SIGTERM during a 10,000-run benchmark answered in {took:.2f} s")
    assert took < SIGTERM_ANSWER_S, f"SIGTERM answered after {took:.1f} s\n{agent.log()[-2000:]}"
    assert code == 0
    assert "benchmark cancelled" in agent.log()

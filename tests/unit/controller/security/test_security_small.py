"""The smaller findings of issue 21, each shown on the real code paths: bounded commands and
command checks, model names with ':', device ids starting with '-', bundle file modes, control
characters from devices, anti-rollback after a quarantined update.json, revocation bookkeeping.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.paths import TEST_DATA

pytest.importorskip("cryptography")

from typer.testing import CliRunner

from agent.daemon import Agent
from agent.protocol import (
    Command,
    Desired,
    Event,
    Hello,
    ProtocolError,
    Status,
    Topics,
    dump,
    escape_controls,
    validate_device_id,
)
from agent.trust import SecurityRejected, TrustStore
from controller.cli.main import app
from controller.fleet.registry import Fleet, FleetError
from controller.runtime.service import ControllerService
from controller.security.identity import FleetSecurity
from controller.security.revocation import RevokedSet
from controller.security.signing import FleetSigner, sign_command
from tests.memory_agent import ROOT, MemoryBroker, apply_desired, make_desired

DATA = TEST_DATA


# ----------------------------------------------------------------------------- commands
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("runs", 100_000_000, "$.runs: must be 1..10000, got 100000000"),
        ("runs", 0, "$.runs: must be 1..10000"),
        ("warmup", 1001, "$.warmup: must be 0..1000"),
        ("counter", -1, "$.counter: must be >= 0"),
    ],
)
def test_command_numbers_are_bounded(field: str, value: int, message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        Command(command_id="c", action="benchmark", **{field: value})
    assert message in str(caught.value)


def test_desired_numbers_are_bounded() -> None:
    for field, value in (
        ("benchmark_runs", 10_001),
        ("benchmark_warmup", 1_001),
        ("latency_budget_ms", 1e12),
        ("memory_budget_mb", 1e12),
    ):
        with pytest.raises(ProtocolError, match=field):
            Desired(generation=1, deployment_id="dep-1", artifact=None, **{field: value})


def test_command_checks(tmp_path: Path) -> None:
    signer = FleetSigner.load_or_create(tmp_path / "home" / "security")
    trust = TrustStore((signer.public_b64,), tmp_path / "k.json")
    command = Command(command_id="c1", action="rollback")

    def check(cmd: Command, highest: int = 0) -> None:
        trust.check_command(cmd, device_id="dev-1", highest_counter=highest)

    good = sign_command(signer, command, "dev-1")
    check(good)
    cases = [
        (command, "unsigned command c1 (rollback)"),
        (dataclasses.replace(good, action="benchmark"), "bad signature"),
        (sign_command(signer, command, "dev-2"), "for device 'dev-2', this is 'dev-1'"),
        (sign_command(signer, command, "dev-1", now=time.time() - 7200), "expired"),
        (signer.sign(dataclasses.replace(good, expires=None, sig=None)), "has no expiry"),
    ]
    for cmd, reason in cases:
        with pytest.raises(SecurityRejected, match=re.escape(reason)):
            check(cmd)
    with pytest.raises(SecurityRejected, match=r"not above counter .* already accepted"):
        check(good, highest=good.counter)
    later = sign_command(signer, command, "dev-1")
    assert later.counter > good.counter  # strictly increasing within a process


# ----------------------------------------------------------------------------- names
def test_model_name_with_colon_is_refused_before_anything_is_stored(tmp_path: Path) -> None:
    home = ["--home", str(tmp_path / "home")]
    runner = CliRunner()
    model = str(DATA / "tiny_fp32.tflite")
    result = runner.invoke(app, ["models", "add", model, "--name", "a:b", "--version", "1", *home])
    assert result.exit_code != 0
    assert "contains ':'" in result.output
    listed = runner.invoke(app, ["models", "list", "--json", *home])
    assert listed.exit_code == 0 and listed.output.strip() == "[]", listed.output
    ok = runner.invoke(app, ["models", "add", model, "--name", "a", "--version", "1", *home])
    assert ok.exit_code == 0, ok.output


def test_device_id_starting_with_dash_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match="starts with '-'"):
        validate_device_id("-rf")
    fleet = Fleet(tmp_path / "home")
    try:
        with pytest.raises(FleetError, match="starts with '-'"):
            fleet.register_device("-dev", "rpi4")
    finally:
        fleet.close()
    assert validate_device_id("dev-1") == "dev-1"


# ----------------------------------------------------------------------------- bundle modes
@pytest.mark.parametrize("auth", ["password", "cert"])
def test_every_bundle_file_is_0600(tmp_path: Path, auth: str) -> None:
    security = FleetSecurity(tmp_path / "home")
    bundle = tmp_path / "bundle"
    creds = security.provision_device("dev-1", auth, bundle)
    security.write_bundle(creds, bundle, broker_url="mqtts://b.lan:8883", profile="rpi4")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in bundle.iterdir()}
    assert modes and all(mode == 0o600 for mode in modes.values()), modes
    if auth == "cert":
        assert "device.crt" in modes


# ----------------------------------------------------------------------------- free text
def test_escape_controls() -> None:
    assert escape_controls("ok: modèle 1.2") == "ok: modèle 1.2"
    assert escape_controls("a\nINFO forged\x1b[31m\u202e") == "a\\nINFO forged\\x1b[31m\\u202e"


def test_device_free_text_reaches_storage_and_logs_escaped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = tmp_path / "home"
    fleet = Fleet(home)
    service = ControllerService(home, "mqtt://127.0.0.1:1", topic_root=ROOT)
    topics = Topics(ROOT)
    evil = "boom\n2026-01-01 INFO controller: all good\x1b[2J\u202e"
    hello = Hello(
        device_id="dev-1",
        agent_version="1.0",
        facts=_facts(arch="x86_64\x1b[31m"),
    )
    cases = [
        (topics.hello("dev-1"), dump(hello)),
        (topics.status("dev-1"), dump(Status(device_id="dev-1", online=True, detail=evil))),
        (
            topics.events("dev-1"),
            dump(Event(device_id="dev-1", event_id="e1", kind="error", message=evil)),
        ),
    ]
    try:
        with caplog.at_level(logging.DEBUG), fleet.db.transaction():
            service._handle_each(fleet, cases, {}, {})
        message = fleet.db.query_one("SELECT message FROM events WHERE event_id = 'e1'")
        device = fleet.device("dev-1")
    finally:
        fleet.close()
    assert message is not None and message["message"] == escape_controls(evil)
    assert "\n" not in message["message"] and "\x1b" not in message["message"]
    assert device["status_detail"] == escape_controls(evil)
    assert "\x1b" not in str(device["facts"])
    for record in caplog.records:
        text = record.getMessage()
        assert "\x1b" not in text and "\u202e" not in text, text


def _facts(**overrides: str) -> object:
    """Sample device facts."""
    from agent.protocol import DeviceFacts

    values = dict(
        arch="x86_64",
        system="Linux",
        cpu_count=4,
        ram_mb=4096,
        runtime="tflite",
        runtime_version="2.14",
        python="3.11",
    )
    values.update(overrides)
    return DeviceFacts(**values)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- anti-rollback
def test_quarantined_update_json_keeps_the_anti_rollback_counter(
    make_agent: Callable[..., tuple[Agent, MemoryBroker]],
    tmp_path: Path,
) -> None:
    signer = FleetSigner.load_or_create(tmp_path / "home" / "security")
    keys = (signer.public_b64,)
    agent, broker = make_agent(trusted_keys=keys, profile="rpi4")
    manifest = signer.sign(broker.offer((DATA / "tiny_fp32.tflite").read_bytes()))
    broker.retained[broker.topics.manifest(manifest.sha256)] = dump(manifest)

    def signed(generation: int) -> Desired:
        return signer.sign(
            make_desired(
                generation, manifest, device_id="dev-u", profile="rpi4", expires=time.time() + 600
            )
        )

    old, current = signed(3), signed(5)
    agent.router.on_message(broker.topics.desired("dev-u"), dump(current))
    apply_desired(agent, current)
    assert agent.state.record.applied_generation == 5
    (tmp_path / "agent" / "update.json").write_text("{not json")
    restarted, broker2 = make_agent(trusted_keys=keys, profile="rpi4")
    assert restarted.state.problem is not None  # quarantined and rebuilt
    restarted.router.on_message(broker2.topics.desired("dev-u"), dump(old))
    refused = broker2.events(kind="security")
    assert refused and "generation 3 is older than generation 5" in refused[-1]["message"]


# ----------------------------------------------------------------------------- revocation
def test_revoke_and_reregister_bookkeeping(tmp_path: Path) -> None:
    home = tmp_path / "home"
    security = FleetSecurity(home)
    revoked = RevokedSet(home)
    security.provision_device("dev-1", "password", tmp_path / "b1")
    assert "dev-1" in security.passwords.entries() and "dev-1" not in revoked
    assert security.revoke_device("dev-1")
    assert "dev-1" not in security.passwords.entries() and "dev-1" in revoked
    assert stat.S_IMODE(security.revoked_path.stat().st_mode) == 0o600
    security.provision_device("dev-1", "password", tmp_path / "b1")  # registering again
    assert "dev-1" not in revoked and "dev-1" in security.passwords.entries()

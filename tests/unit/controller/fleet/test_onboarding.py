"""`devices register` writes a bundle for the controller as it runs (serving.json) and prints the
device's commands; the agent picks its data dir by who runs it; the agent wheel installs."""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.protocol.config import default_data_dir, load_config
from controller.cli.main import app
from controller.fleet.agent_wheel import agent_requirements, build_agent_wheel, wheel_name
from controller.fleet.onboarding import (
    UP_DEFAULT_BROKER,
    Serving,
    ServingFileError,
    embedded_serving,
    read_serving,
    write_serving,
)
from controller.security.identity import FleetSecurity

runner = CliRunner()


def _register(home: Path, *args: str) -> dict[str, object]:
    """Run `devices register ... --json` and return its row (exit 0 asserted)."""
    result = runner.invoke(
        app, ["devices", "register", *args, "--profile", "rpi4", "--home", str(home), "--json"]
    )
    assert result.exit_code == 0, result.output
    row: dict[str, object] = json.loads(result.stdout)
    return row


def _modes(directory: Path) -> dict[str, int]:
    """File name → permission bits of every file in `directory`."""
    return {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}


def test_defaults_without_up_match_what_up_serves_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    home = tmp_path / "home"
    row = _register(home, "pi-kitchen")
    bundle = home / "bundles" / "pi-kitchen"
    assert row["auth"] == "none" and row["broker"] == UP_DEFAULT_BROKER
    text = (bundle / "agent.toml").read_text()
    assert "data_dir =" not in text and "ca_file" not in text and "password" not in text
    config = load_config(bundle / "agent.toml")
    assert config.broker == UP_DEFAULT_BROKER and config.username is None
    assert config.data_dir == tmp_path / "state", "no data_dir: the device picks its own"
    assert config.trusted_keys, "the bundle trusts the fleet's signing key"
    assert _modes(bundle) == {"agent.toml": 0o600, wheel_name(): 0o600}
    assert (bundle.stat().st_mode & 0o777) == 0o700
    assert any("edgefleet-agent run --config" in line for line in row["commands"])  # type: ignore[union-attr]


def test_follows_the_record_of_a_plain_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    serving = embedded_serving(
        host="127.0.0.1",
        url="mqtt://127.0.0.1:41883",
        secured=False,
        tls_port=None,
        cert_port=None,
        topic_root="fleet/t1",
        broker_pid=None,
        broker_dir=None,
    )
    write_serving(home, serving)
    assert read_serving(home) == serving
    row = _register(home, "pi-1")
    config = load_config(home / "bundles" / "pi-1" / "agent.toml")
    assert (config.broker, config.topic_root, config.username) == (
        "mqtt://127.0.0.1:41883",
        "fleet/t1",
        None,
    )
    assert "running" in str(row["broker_source"])  # this test process wrote the record


def test_follows_the_record_of_a_secured_up(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_serving(
        home,
        embedded_serving(
            host="192.0.2.7",
            url="mqtt://127.0.0.1:1883",
            secured=True,
            tls_port=8883,
            cert_port=None,
            topic_root="edgefleet/v1",
            broker_pid=None,
            broker_dir=None,
        ),
    )
    row = _register(home, "pi-2")
    bundle = home / "bundles" / "pi-2"
    config = load_config(bundle / "agent.toml")
    assert row["auth"] == "password" and config.broker == "mqtts://192.0.2.7:8883"
    assert config.username == "pi-2" and config.password
    assert FleetSecurity(home).passwords.verify("pi-2", config.password)
    assert config.ca_file == str(bundle / "ca.crt")
    assert set(_modes(bundle).values()) == {0o600}
    bad = runner.invoke(
        app, ["devices", "register", "pi-3", "-p", "rpi4", "--auth", "cert", "--home", str(home)]
    )
    assert bad.exit_code == 2 and "no client-certificate listener" in bad.output


def test_plain_broker_override_with_a_password_is_accepted(tmp_path: Path) -> None:
    """The issue's case: `--broker mqtt://127.0.0.1:18830` was refused (ca_file on plain MQTT)."""
    home = tmp_path / "home"
    row = _register(home, "pi-4", "--broker", "mqtt://127.0.0.1:18830", "--auth", "password")
    config = load_config(home / "bundles" / "pi-4" / "agent.toml")
    assert config.broker == "mqtt://127.0.0.1:18830" and config.ca_file is None
    assert config.username == "pi-4" and row["broker_source"] == "--broker"
    none = _register(home, "pi-5", "--broker", "mqtt://10.0.0.2:1883")
    assert none["auth"] == "none"
    bad = runner.invoke(
        app,
        [
            *("devices", "register", "pi-6", "-p", "rpi4", "--auth", "cert"),
            *("--broker", "mqtt://10.0.0.2:1883", "--home", str(home)),
        ],
    )
    assert bad.exit_code == 2 and "needs a TLS broker URL" in bad.output
    bad = runner.invoke(
        app,
        ["devices", "register", "pi-7", "-p", "rpi4", "--broker", "http://x", "--home", str(home)],
    )
    assert bad.exit_code == 2 and "unsupported broker URL scheme" in bad.output


def test_explicit_data_dir_is_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _register(home, "pi-8", "--data-dir", "/srv/agent")
    assert load_config(home / "bundles" / "pi-8" / "agent.toml").data_dir == Path("/srv/agent")


def test_printed_commands_name_the_bundle_and_the_wheel(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = runner.invoke(
        app, ["devices", "register", "cam-1", "--profile", "rpi4", "--home", str(home)]
    )
    assert result.exit_code == 0, result.output
    bundle = home / "bundles" / "cam-1"
    assert f"scp -rp {bundle} DEVICE:edgefleet-cam-1" in result.stdout
    assert f"pip install ~/edgefleet-cam-1/{wheel_name()}" in result.stdout
    assert "install-service --config ~/edgefleet-cam-1/agent.toml" in result.stdout
    assert "loopback" in result.stderr


@pytest.mark.parametrize(
    ("environ", "euid", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/edgefleet-agent"}, 990, "/var/lib/edgefleet-agent"),
        ({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}, 0, "/var/lib/a"),
        ({}, 0, "/var/lib/edgefleet-agent"),
        ({}, 1000, "/home/pi/.local/share/edgefleet-agent"),
        ({"XDG_DATA_HOME": "/data/pi"}, 1000, "/data/pi/edgefleet-agent"),
        ({"XDG_DATA_HOME": "relative"}, 1000, "/home/pi/.local/share/edgefleet-agent"),
    ],
)
def test_default_data_dir_fits_who_runs_the_agent(
    environ: dict[str, str], euid: int, expected: str
) -> None:
    assert default_data_dir(environ, euid, Path("/home/pi")) == Path(expected)


def test_agent_wheel_is_a_valid_wheel_with_the_agent_extra(tmp_path: Path) -> None:
    wheel = build_agent_wheel(tmp_path)
    assert wheel.name == wheel_name() and (wheel.stat().st_mode & 0o777) == 0o600
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        record = zf.read(next(n for n in names if n.endswith("/RECORD"))).decode()
    assert "agent/cli.py" in names and "agent/protocol/__init__.py" in names
    assert not any(n.startswith(("controller/", "converters/")) for n in names)
    assert not any("__pycache__" in n for n in names)
    for requirement in agent_requirements():
        assert f"Requires-Dist: {requirement}\n" in metadata
    assert all(n in record for n in names)
    assert build_agent_wheel(tmp_path / "again").read_bytes() == wheel.read_bytes()


def test_serving_record_knows_a_dead_up(tmp_path: Path) -> None:
    serving = Serving(pid=2**22 + 7, started_at=0.0, device_broker="mqtt://h:1", auth="none")
    assert not serving.running
    write_serving(tmp_path, serving)
    assert read_serving(tmp_path) == serving
    (tmp_path / "serving.json").write_text("{not json")
    # A bad record is named, not taken for "no `up` ran" (docs/onboarding.md).
    with pytest.raises(ServingFileError, match=r"serving.json: not valid JSON"):
        read_serving(tmp_path)


def test_reload_never_signals_a_process_that_only_reuses_the_broker_pid(tmp_path: Path) -> None:
    """The record names this test process as the broker: it is not our mosquitto, so no SIGHUP
    (which would kill it) and no password file written."""
    from controller.fleet.onboarding import reload_broker_passwords

    broker_dir = tmp_path / "broker"
    write_serving(
        tmp_path,
        Serving(
            pid=os.getpid(),
            started_at=time.time(),
            device_broker="mqtts://h:8883",
            auth="password",
            broker_pid=os.getpid(),
            broker_dir=str(broker_dir),
        ),
    )
    passwd = tmp_path / "passwd"
    passwd.write_text("dev:x\n")
    assert reload_broker_passwords(tmp_path, passwd) is None
    assert not (broker_dir / "passwd").exists()
    stale = Serving(pid=os.getpid(), started_at=0.0, device_broker="mqtt://h:1", auth="none")
    assert not stale.running, "a process started after the record only reuses the pid"

"""Onboarding against a secured controller broker (what `up --host <LAN address>` runs): a device
registered while the broker runs is accepted at once (password file reloaded by SIGHUP), over
TLS, by a real agent started from the untouched bundle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from typer.testing import CliRunner

from controller.brokers.base import BrokerHandle
from controller.cli.main import app
from controller.fleet.onboarding import embedded_serving, read_serving, write_serving
from controller.fleet.registry import Fleet
from controller.runtime.service import ControllerService
from controller.security.broker_config import start_secure_mosquitto
from controller.security.identity import FleetSecurity
from tests.polling import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_device_registered_while_the_secured_broker_runs_connects_over_tls(
    mosquitto_binary: str, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    security = FleetSecurity(home)
    # As `up` does beyond loopback: secured mosquitto on HOME/broker, then its serving record.
    handle: BrokerHandle = start_secure_mosquitto(
        security, home / "broker", host="127.0.0.1", tls_port=0, binary=mosquitto_binary
    )
    write_serving(
        home,
        embedded_serving(
            host="127.0.0.1",
            url=handle.url,
            secured=True,
            tls_port=handle.tls_port,
            cert_port=None,
            topic_root="edgefleet/v1",
            broker_pid=handle.pid,
            broker_dir=handle.data_dir,
        ),
    )
    username, password = security.controller_credentials()
    service = ControllerService(home, handle.url, username=username, password=password)
    proc = None
    try:
        service.start()
        assert service.ready.wait(15), "controller did not connect with its credentials"
        result = CliRunner().invoke(
            app, ["devices", "register", "pi-tls", "--profile", "rpi4", "--home", str(home)]
        )
        assert result.exit_code == 0, result.output
        assert "reloaded the running broker's passwords" in result.stdout
        serving = read_serving(home)
        assert serving is not None
        assert f"broker {serving.device_broker}" in result.stdout
        assert serving.device_broker == f"mqtts://127.0.0.1:{handle.tls_port}"
        bundle = home / "bundles" / "pi-tls"
        assert sorted(p.name for p in bundle.iterdir())[:2] == ["agent.toml", "ca.crt"]
        log = tmp_path / "agent.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(bundle / "agent.toml")],
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "STATE_DIRECTORY": str(tmp_path / "state")},
        )
        fleet = Fleet(home)
        try:
            wait_until(lambda: fleet.device("pi-tls")["online"], 30, "the TLS agent online")
        finally:
            fleet.close()
        assert "refused" not in log.read_text()
    finally:
        if proc is not None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
        service.stop()
        handle.stop()

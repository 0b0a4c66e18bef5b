"""The controller logs in to a broker `edgefleet broker config` configured (issue 21, 2 and 6).

`edgefleet up --broker URL` from the same data dir finds its credentials (and the fleet CA for
mqtts://) in HOME/security with no further flags; credentials in the URL are refused with a
clear error that does not echo the secret. A second connection as the controller user (an
operator's mosquitto_sub, another replica) does not take the controller's session over.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

from controller.brokers.mosquitto import free_port
from controller.security.identity import FleetSecurity
from tests.e2e.secured_fleet import SecuredFleet, require_mosquitto_clients
from tests.e2e.secured_fleet import secured as secured
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e]

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
# `up` connects within a second; 30 s covers a cold start of the CLI on a loaded machine.
CONNECT_TIMEOUT_S = 30


def _broker_from_config(
    tmp_path: Path, home: Path, topic_root: str, binary: str
) -> tuple[subprocess.Popen[bytes], int, int]:
    """`edgefleet broker config` into a directory, then mosquitto run on that config."""
    plain, tls = free_port(), free_port()
    out = tmp_path / "broker-config"
    subprocess.run(
        [EDGEFLEET, "broker", "config", "--out", str(out), "--host", "127.0.0.1",
         "--tls-port", str(tls), "--cert-port", "0", "--plain-port", str(plain),
         "--server-name", "localhost", "--topic-root", topic_root, "--home", str(home)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    broker = subprocess.Popen([binary, "-c", str(out / "mosquitto.conf")])
    wait_until(lambda: (out / "mosquitto.pid").exists(), 10, "mosquitto started")
    return broker, plain, tls


def _up(home: Path, url: str, topic_root: str, log: Path) -> subprocess.Popen[bytes]:
    """`edgefleet up --broker URL` in its own process, output to `log`."""
    return subprocess.Popen(
        [EDGEFLEET, "up", "--broker", url, "--topic-root", topic_root, "--home", str(home)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("scheme", ["mqtt", "mqtts"])
def test_up_logs_in_to_the_generated_broker_with_no_flags(
    tmp_path: Path, topic_root: str, scheme: str, mosquitto_binary: str
) -> None:
    home = tmp_path / "home"
    broker, plain, tls = _broker_from_config(tmp_path, home, topic_root, mosquitto_binary)
    url = f"mqtt://127.0.0.1:{plain}" if scheme == "mqtt" else f"mqtts://localhost:{tls}"
    log = tmp_path / "up.log"
    up = _up(home, url, topic_root, log)
    try:
        wait_until(
            lambda: "connected to" in log.read_text(),
            CONNECT_TIMEOUT_S,
            f"up connected\n{log.read_text()[-2000:]}",
        )
        time.sleep(2)  # a refused login would show up as reconnect attempts meanwhile
        text = log.read_text()
        assert "Not authorized" not in text and "not authorised" not in text.lower(), text
        assert "logging in as ctl@edgefleet" in text
        assert (scheme == "mqtts") == ("with the fleet CA" in text)
        secret = (home / "security" / "controller.secret").read_text().strip()
        assert secret not in text
        assert up.poll() is None
    finally:
        up.terminate()
        up.wait(30)
        broker.terminate()
        broker.wait(10)


def test_credentials_in_the_url_are_refused_and_not_echoed(tmp_path: Path) -> None:
    done = subprocess.run(
        [EDGEFLEET, "up", "--broker", "mqtt://ctl:hunter2@127.0.0.1:1", "--home", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "carries credentials: not supported" in done.stderr
    assert "mqtt://***@127.0.0.1:1" in done.stderr
    assert "hunter2" not in done.stdout + done.stderr


def test_second_controller_connection_does_not_kick_the_controller(
    secured: SecuredFleet,
) -> None:
    session = secured.service.session
    connections = session.connection
    user, password = FleetSecurity(secured.home).controller_credentials()
    # An operator watching everything with the controller's credentials, for 4 s.
    subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(secured.handle.port), "-u", user,
         "-P", password, "-t", f"{secured.topic_root}/#", "-W", "4"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    time.sleep(1.0)
    assert session.connected.is_set()
    assert session.connection == connections, "the controller was disconnected and reconnected"
    log = (secured.tmp / "broker" / "mosquitto.log").read_text()
    assert "already connected, closing old connection" not in log, log[-2000:]


def _device_login(tls: int, ca: Path, user: str, password: str, topic: str) -> bool:
    """Whether a device password is accepted on the TLS listener (mosquitto_sub, 2 s)."""
    done = subprocess.run(
        ["mosquitto_sub", "-h", "localhost", "-p", str(tls), "--cafile", str(ca), "-u", user,
         "-P", password, "-t", topic, "-C", "1", "-W", "2"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    text = (done.stdout + done.stderr).lower()
    return "refused" not in text and "not auth" not in text


def test_external_broker_operator_is_told_the_exact_reload_step(
    tmp_path: Path, topic_root: str, mosquitto_binary: str
) -> None:
    require_mosquitto_clients()
    from typer.testing import CliRunner

    from controller.cli.main import app
    from controller.fleet.registry import Fleet
    from controller.security.broker_config import refresh_broker_copies

    home = tmp_path / "home"
    broker, _, tls = _broker_from_config(tmp_path, home, topic_root, mosquitto_binary)
    out = tmp_path / "broker-config"
    ca = out / "ca.crt"
    try:
        fleet = Fleet(home)
        try:
            fleet.register_device(
                "ext-1", "rpi4", auth="password", bundle_dir=tmp_path / "b",
                broker_url=f"mqtts://localhost:{tls}",
            )  # fmt: skip
        finally:
            fleet.close()
        steps = refresh_broker_copies(FleetSecurity(home))
        assert steps == [f"kill -HUP $(cat {out / 'mosquitto.pid'})"]
        hashed = FleetSecurity(home).passwords.path.read_text()
        assert "ext-1:" in hashed and "ext-1:" in (out / "passwd").read_text()
        secret = (tmp_path / "b" / "agent.toml").read_text().split('password = "')[1].split('"')[0]
        topic = f"{topic_root}/devices/ext-1/cmd"
        assert not _device_login(tls, ca, "ext-1", secret, topic)  # not reloaded yet
        subprocess.run(["sh", "-c", steps[0]], check=True)
        wait_until(lambda: _device_login(tls, ca, "ext-1", secret, topic), 10, "ext-1 accepted")

        result = CliRunner().invoke(app, ["devices", "revoke", "ext-1", "--home", str(home)])
        assert result.exit_code == 0, result.output
        assert f"reload that broker now: {steps[0]}" in result.output
        assert "ext-1:" not in (out / "passwd").read_text()
        assert "user ext-1\ntopic deny #" in (out / "acl").read_text()
        subprocess.run(["sh", "-c", steps[0]], check=True)
        wait_until(lambda: not _device_login(tls, ca, "ext-1", secret, topic), 10, "refused")
    finally:
        broker.terminate()
        broker.wait(10)

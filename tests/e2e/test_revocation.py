"""Revocation that takes effect, and registration while the broker runs (issue 21, 3 and 4).

Generated secured mosquitto config, real agents from bundles, the controller with its own
credentials. `devices remove` / `devices revoke` must cut a connected device off, keep it out
(old password refused, hello does not register it again), and re-registering must bring it
back with a new password while the old one stays refused, all without restarting anything.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from typer.testing import CliRunner

from controller.cli.main import app
from tests.e2e.secured_fleet import SecuredFleet
from tests.e2e.secured_fleet import secured as secured
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# mosquitto_sub with -W: a refused CONNECT returns at once; an accepted one waits this long.
ATTEMPT_WAIT_S = 3


def _connect_as(fleet: SecuredFleet, username: str, password: str) -> str:
    """Try a TLS connection with mosquitto_sub; 'accepted' or the refusal text."""
    assert fleet.handle.tls_port is not None
    cmd = ["mosquitto_sub", "-h", "localhost", "-p", str(fleet.handle.tls_port)]
    cmd += ["--cafile", str(fleet.security.ca.cert_path), "-u", username, "-P", password]
    cmd += ["-t", fleet.topic(username, "cmd"), "-C", "1", "-W", str(ATTEMPT_WAIT_S)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    text = (done.stdout + done.stderr).strip()
    return "refused: " + text if "refused" in text.lower() or "not auth" in text.lower() else (
        "accepted"
    )


def test_revoked_device_is_cut_off_and_reregistration_rotates(secured: SecuredFleet) -> None:
    runner = CliRunner()
    home = ["--home", str(secured.home)]
    agent = secured.start_agent("dev-r")  # registered after the broker started: no restart
    other = secured.start_agent("dev-s")
    secured.wait_online(agent)
    secured.wait_online(other)
    old_password = agent.config.password
    assert old_password and _connect_as(secured, "dev-r", old_password) == "accepted"
    # dev-s may have been refused once at start, before the broker reloaded the file with its
    # new password (each failed attempt is logged): only what follows the revocation counts.
    other_log_before = len(other.log())

    result = runner.invoke(app, ["devices", "remove", "dev-r", *home])
    assert result.exit_code == 0, result.output
    assert "removed and revoked dev-r" in result.output
    assert "dev-r" not in secured.security.passwords.entries()
    assert "dev-r" in secured.security.revoked()
    # Cut off: the running agent loses its connection and cannot get back in.
    broker_log = secured.tmp / "broker" / "mosquitto.log"
    wait_until(
        lambda: "not authorised" in agent.log().lower() or "not authorized" in agent.log().lower(),
        30,
        f"dev-r refused by the broker\n{agent.log()[-2000:]}",
    )
    assert "refused" in _connect_as(secured, "dev-r", old_password)
    # Its hello does not register it again (the agent keeps retrying in the background).
    time.sleep(3)
    assert not secured.fleet.has_device("dev-r")
    # The other device is untouched.
    assert secured.fleet.device("dev-s")["online"]
    assert other.alive and "not auth" not in other.log()[other_log_before:].lower()
    assert "SIGHUP" in broker_log.read_text() or "Reloading" in broker_log.read_text()

    # Re-registering brings it back with a new password; the old one stays refused.
    agent.terminate()
    secured.agents.remove(agent)
    again = secured.start_agent("dev-r")
    assert again.config.password and again.config.password != old_password
    secured.wait_online(again)
    assert secured.fleet.device("dev-r")["registered_by"] == "cli"
    assert "refused" in _connect_as(secured, "dev-r", old_password)

    # `devices revoke` keeps the row but cuts the device off the same way.
    result = runner.invoke(app, ["devices", "revoke", "dev-s", *home])
    assert result.exit_code == 0, result.output
    wait_until(
        lambda: not secured.fleet.device("dev-s")["online"]
        or "not auth" in other.log().lower(),
        30,
        f"dev-s cut off\n{other.log()[-2000:]}",
    )
    assert "refused" in _connect_as(secured, "dev-s", other.config.password or "")

"""A real agent process that cannot reach its broker says so on every attempt, with the reason
and its backoff: against a closed port, and against a broker that refuses its credentials."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol.config import AgentConfig, dump_config
from controller.brokers.base import BrokerHandle, free_port
from controller.brokers.mosquitto import start_mosquitto
from controller.security.broker_config import start_secure_mosquitto
from controller.security.identity import FleetSecurity, PasswordFile
from tests.polling import wait_until

pytestmark = [pytest.mark.integration]

# How the agent's MQTT session logs (level and logger name).
LOGGER = "WARNING agent.protocol.transport:"


class Agent:
    """`edgefleet-agent run` at INFO (not DEBUG: failures must show at the default level)."""

    def __init__(self, tmp_path: Path, broker: str, **overrides: object) -> None:
        """Write the config and start the process."""
        config = AgentConfig(
            device_id="dev-x", data_dir=tmp_path / "agent", broker=broker, **overrides
        )  # type: ignore[arg-type]
        path = tmp_path / "agent.toml"
        path.write_text(dump_config(config))
        self.log_path = tmp_path / "agent.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def log(self) -> str:
        """What the agent logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM by PID and wait."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    """Agents started by a test, stopped at teardown."""
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.stop()


def _attempts(log: str, pattern: str) -> list[tuple[float, int, int]]:
    """(time, attempt, announced retry seconds) of every failure line matching `pattern`."""
    stamp = r"\d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d),(\d{3}) "
    return [
        (
            int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) + int(m[4]) / 1000,
            int(m[5]),
            int(m[6]),
        )
        for m in re.finditer(
            stamp + pattern + r" \(attempt (\d+)\): .*; retrying in (\d+) s", log
        )
    ]


def _check_backoff(attempts: list[tuple[float, int, int]]) -> None:
    """Attempts count 1, 2, 3...; each announced wait is the real gap to the next attempt."""
    assert [a for _, a, _ in attempts] == list(range(1, len(attempts) + 1))
    for (t0, _, wait), (t1, _, _) in itertools.pairwise(attempts):
        gap = t1 - t0
        assert abs(gap - wait) < 0.9, f"announced {wait} s, next attempt {gap:.2f} s later"
    waits = [w for _, _, w in attempts]
    assert waits == sorted(waits) and waits[-1] > waits[0], f"backoff grows: {waits}"


def test_closed_port_logs_every_attempt_with_reason_and_backoff(
    tmp_path: Path, agents: list[Agent]
) -> None:
    port = free_port()  # nothing listens here
    agent = Agent(tmp_path, f"mqtt://127.0.0.1:{port}")
    agents.append(agent)
    pattern = re.escape(f"{LOGGER} cannot connect to mqtt://127.0.0.1:{port}")
    wait_until(lambda: len(_attempts(agent.log(), pattern)) >= 3, 30, "three failure lines")
    _check_backoff(_attempts(agent.log(), pattern)[:3])
    assert "ConnectionRefusedError: [Errno 111] Connection refused" in agent.log()


def test_refused_credentials_log_every_attempt_with_reason_and_backoff(
    tmp_path: Path, agents: list[Agent], mosquitto_binary: str
) -> None:
    passwd = PasswordFile(tmp_path / "passwd")
    passwd.set("dev-x", "the-right-password")
    handle: BrokerHandle = start_mosquitto(
        tmp_path / "broker",
        extra_config=f"allow_anonymous false\npassword_file {passwd.path}\n",
        binary=mosquitto_binary,
    )
    try:
        agent = Agent(tmp_path, handle.url, username="dev-x", password="wrong")
        agents.append(agent)
        pattern = re.escape(
            f"{LOGGER} broker 127.0.0.1:{handle.port} refused the connection"
        )
        wait_until(lambda: len(_attempts(agent.log(), pattern)) >= 3, 30, "three refusals")
        _check_backoff(_attempts(agent.log(), pattern)[:3])
        assert "): Not authorized; retrying in" in agent.log()
    finally:
        for agent in agents:
            agent.stop()
        handle.stop()


def test_untrusted_broker_certificate_logs_the_tls_reason(
    tmp_path: Path, agents: list[Agent], mosquitto_binary: str
) -> None:
    """A bundle whose CA did not sign the broker's certificate: the TLS error, every attempt."""
    broker_side = FleetSecurity(tmp_path / "fleet-a")
    handle = start_secure_mosquitto(
        broker_side, tmp_path / "broker", host="127.0.0.1", tls_port=0, binary=mosquitto_binary
    )
    other_ca = FleetSecurity(tmp_path / "fleet-b").ca.cert_path  # another fleet's CA
    try:
        agent = Agent(
            tmp_path,
            f"mqtts://127.0.0.1:{handle.tls_port}",
            username="dev-x",
            password="whatever",
            ca_file=str(other_ca),
        )
        agents.append(agent)
        pattern = re.escape(
            f"{LOGGER} cannot connect to mqtts://127.0.0.1:{handle.tls_port}"
        )
        wait_until(lambda: len(_attempts(agent.log(), pattern)) >= 2, 30, "two TLS failures")
        _check_backoff(_attempts(agent.log(), pattern)[:2])
        assert "SSLCertVerificationError" in agent.log()
        assert "certificate verify failed" in agent.log()
    finally:
        for agent in agents:
            agent.stop()
        handle.stop()

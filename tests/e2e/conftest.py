"""End-to-end fixtures: a real controller service and real agent processes on a real broker."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.config import AgentConfig, dump_config
from controller.brokers.base import BrokerHandle
from controller.fleet.registry import Fleet
from controller.runtime.service import ControllerService
from controller.security.signing import FleetSigner
from tests.polling import wait_until

DATA = Path(__file__).resolve().parent.parent / "data"

__all__ = ["DATA", "AgentProcess", "RunningController", "wait_until"]


@pytest.fixture(params=["mosquitto", "amqtt"])
def e2e_broker(request: pytest.FixtureRequest) -> BrokerHandle:
    """A real broker per test; amqtt only where it is installed (not in the slim device env)."""
    if request.param == "amqtt" and importlib.util.find_spec("amqtt") is None:
        pytest.skip("amqtt is not installed in this environment (slim agent env)")
    handle: BrokerHandle = request.getfixturevalue(f"{request.param}_broker")
    return handle


def _fleet_verify_keys(home: Path) -> tuple[str, ...]:
    """The controller's verify key for agents' trusted_keys; () where `cryptography` is missing
    (the slim device env: the controller then publishes unsigned, the agents do not check)."""
    if importlib.util.find_spec("cryptography") is None:
        return ()
    return (FleetSigner.load_or_create(home / "security").public_b64,)


@dataclass
class RunningController:
    """A controller service plus a Fleet handle on the same data dir for assertions."""

    service: ControllerService
    fleet: Fleet
    home: Path


@pytest.fixture
def controller(
    e2e_broker: BrokerHandle, topic_root: str, tmp_path: Path
) -> Iterator[RunningController]:
    """The real controller service on the test's broker and topic root."""
    home = tmp_path / "controller"
    _fleet_verify_keys(home)  # the signing key exists before any agent reads it
    service = ControllerService(
        home, e2e_broker.url, topic_root=topic_root, client_id=f"ctl-{topic_root.split('/')[1]}"
    )
    service.start()
    assert service.ready.wait(15), "controller did not connect to the broker"
    fleet = Fleet(home)
    try:
        yield RunningController(service, fleet, home)
    finally:
        fleet.close()
        service.stop()


@dataclass
class AgentProcess:
    """One real `edgefleet-agent run` process, started and killed by PID."""

    config: AgentConfig
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        """Start (or restart) the agent process."""
        self.starts += 1
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "run",
                "--config",
                str(self.config_path),
                "--log-level",
                "DEBUG",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )

    def kill(self) -> None:
        """SIGKILL by PID, as a power loss would."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> None:
        """SIGTERM and wait; SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """The agent's log so far (for failure messages)."""
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def start_agent(
    e2e_broker: BrokerHandle, topic_root: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., AgentProcess]]:
    """Factory: start_agent(device_id, env=None, broker=None, **config) -> a running AgentProcess
    (stopped at teardown); `env` adds to the process environment, `broker` replaces the test
    broker's URL (a proxy in front of it).

    With the `controller` fixture the agents trust its signing key, so every such test runs
    with signatures enforced; tests that run their own controller elsewhere get development
    mode unless they pass `trusted_keys`.
    """
    agents: list[AgentProcess] = []
    in_use = "controller" in request.fixturenames
    default_keys = _fleet_verify_keys(tmp_path / "controller") if in_use else ()

    def start(
        device_id: str,
        env: dict[str, str] | None = None,
        broker: str | None = None,
        **overrides: Any,
    ) -> AgentProcess:
        overrides.setdefault("trusted_keys", default_keys)
        config = AgentConfig(
            device_id=device_id,
            data_dir=tmp_path / "agents" / device_id,
            broker=broker or e2e_broker.url,
            topic_root=topic_root,
            **{"profile": "rpi4", "threads": 1, **overrides},
        )
        config.data_dir.mkdir(parents=True, exist_ok=True)
        path = config.data_dir.parent / f"{device_id}.toml"
        path.write_text(dump_config(config))
        agent = AgentProcess(
            config, path, config.data_dir.parent / f"{device_id}.log", env=dict(env or {})
        )
        agent.start()
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.terminate()

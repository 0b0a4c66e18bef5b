"""A fleet behind the mosquitto config `edgefleet broker config` generates, for attack tests.

The controller service logs in with its own credentials over loopback; real agents come from
bundles `devices register` writes and reach the broker over TLS only. The attacker is the
mosquitto_pub / mosquitto_sub command line logged in as the controller user (a compromised
broker or a leaked admin credential: the strongest position short of the signing key).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("cryptography")

from agent.protocol.config import load_config
from controller.brokers.mosquitto import BrokerHandle, free_port
from controller.fleet.registry import Fleet
from controller.runtime.service import ControllerService
from controller.security.broker_config import start_secure_mosquitto
from controller.security.identity import FleetSecurity
from tests.conftest import running_in_ci
from tests.e2e.conftest import AgentProcess
from tests.polling import wait_until

# First deployments include a cold interpreter import in the self-test child: allow for it.
DEPLOY_TIMEOUT_S = 60
# A security event travels agent -> broker -> controller -> SQLite in well under a second;
# 20 s only trips when the message was never refused.
EVENT_TIMEOUT_S = 20
# mosquitto_pub connects, publishes one QoS 1 message and disconnects in milliseconds.
PUB_TIMEOUT_S = 10


@dataclass
class SecuredFleet:
    """Controller home, running secured broker and service, and the agents started so far."""

    home: Path
    tmp: Path
    topic_root: str
    fleet: Fleet
    security: FleetSecurity
    handle: BrokerHandle
    service: ControllerService
    agents: list[AgentProcess] = field(default_factory=list)

    def topic(self, device_id: str, channel: str) -> str:
        """A device topic under this test's root."""
        return f"{self.topic_root}/devices/{device_id}/{channel}"

    def start_agent(
        self, device_id: str, env: dict[str, str] | None = None, register: bool = True
    ) -> AgentProcess:
        """Register `device_id` (password auth, TLS) and run a real agent from its bundle."""
        bundle = self.tmp / "bundles" / device_id
        if register:
            self.fleet.register_device(
                device_id,
                "rpi4",
                auth="password",
                bundle_dir=bundle,
                broker_url=f"mqtts://localhost:{self.handle.tls_port}",
                topic_root=self.topic_root,
                agent_data_dir=str(self.tmp / "agents" / device_id),
            )
        config_path = bundle / "agent.toml"
        agent = AgentProcess(
            load_config(config_path),
            config_path,
            self.tmp / f"{device_id}.log",
            env=dict(env or {}),
        )
        agent.start()
        self.agents.append(agent)
        return agent

    def wait_online(self, agent: AgentProcess) -> None:
        """Until the controller saw the agent's hello and it is online."""
        device = agent.config.device_id
        wait_until(
            lambda: self.fleet.has_device(device) and self.fleet.device(device)["online"],
            30,
            f"hello from {device}\n{agent.log()[-2000:]}",
        )

    def deploy(self, model: Path, device: str, **kw: Any) -> None:
        """Deploy one model to one device and require success."""
        dep = self.fleet.deploy(model, devices=[device], **kw)

        def finished() -> dict[str, Any] | None:
            row = self.fleet.deployment(dep["id"])["devices"][0]
            return row if row["state"] in ("succeeded", "failed") else None

        row = wait_until(finished, DEPLOY_TIMEOUT_S, f"deployment of {model.name}")
        assert row["state"] == "succeeded", row

    def events(self, device: str, kind: str) -> list[str]:
        """Messages of the events of one kind the controller stored for a device."""
        rows = self.fleet.db.query(
            "SELECT message FROM events WHERE device_id = ? AND kind = ? ORDER BY ts",
            (device, kind),
        )
        return [r["message"] for r in rows]

    def wait_event(self, device: str, kind: str, reason: str) -> str:
        """The first stored event of `kind` from `device` whose message contains `reason`."""
        return wait_until(
            lambda: next((m for m in self.events(device, kind) if reason in m), None),
            EVENT_TIMEOUT_S,
            f"{kind} event {reason!r} from {device}: have {self.events(device, kind)}",
        )

    def attacker_pub(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish as the controller user with the mosquitto_pub command line."""
        user, password = self.security.controller_credentials()
        cmd = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.handle.port)]
        cmd += ["-u", user, "-P", password, "-i", "attacker", "-q", "1"]
        cmd += ["-t", topic, "-s"] + (["-r"] if retain else [])
        subprocess.run(cmd, input=payload, check=True, timeout=PUB_TIMEOUT_S)


def require_mosquitto_clients() -> None:
    """mosquitto_pub and mosquitto_sub (the attacker's tools); skip locally, fail in CI."""
    missing = [tool for tool in ("mosquitto_pub", "mosquitto_sub") if shutil.which(tool) is None]
    if missing:
        reason = f"{', '.join(missing)} not found (apt-get install mosquitto-clients)"
        if running_in_ci():
            pytest.fail(f"{reason}; CI must run the attack tests", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def secured(mosquitto_binary: str, tmp_path: Path, topic_root: str) -> Iterator[SecuredFleet]:
    """A controller with its own credentials on the generated secured mosquitto config."""
    require_mosquitto_clients()
    home = tmp_path / "controller"
    fleet = Fleet(home)
    security = FleetSecurity(home)
    handle = start_secure_mosquitto(
        security,
        tmp_path / "broker",
        host="127.0.0.1",
        tls_port=free_port(),
        cert_port=None,
        topic_root=topic_root,
        binary=mosquitto_binary,
    )
    username, password = security.controller_credentials()
    service = ControllerService(
        home, handle.url, topic_root=topic_root, username=username, password=password
    )
    fixture = SecuredFleet(home, tmp_path, topic_root, fleet, security, handle, service)
    try:
        service.start()
        assert service.ready.wait(15), "controller did not connect with its credentials"
        yield fixture
    finally:
        for agent in fixture.agents:
            agent.terminate()
        service.stop()
        fleet.close()
        handle.stop()

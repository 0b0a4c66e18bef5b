"""The secured mosquitto config for real: ACL isolation, client-id takeover, TLS, refusals.

Each test runs mosquitto with the config `edgefleet broker config` generates (loopback plaintext
for the controller, TLS + password and TLS + certificate listeners for devices) on free ports.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

# The controller needs `cryptography`; the slim device env (agent tests only) lacks it.
pytest.importorskip("cryptography")

from agent.protocol.config import load_config
from agent.protocol.transport import tls_context
from controller.brokers.base import BrokerError, BrokerHandle, free_port
from controller.fleet.registry import Fleet
from controller.runtime.embedded_broker import start_embedded
from controller.runtime.service import ControllerService
from controller.security.broker_config import start_secure_mosquitto
from controller.security.identity import DeviceCredentials, FleetCA, FleetSecurity
from tests.e2e.conftest import DATA, AgentProcess
from tests.mqtt_helpers import MqttProbe
from tests.polling import wait_until

pytestmark = pytest.mark.integration

# A refusal (CONNACK failure, TLS alert or closed socket) arrives in milliseconds; 5 s only
# trips when the broker hangs instead of refusing, which is a failure too.
REFUSAL_TIMEOUT_S = 5.0


@dataclass
class SecureBroker:
    """A running secured broker plus the fleet security it was generated from."""

    handle: BrokerHandle
    security: FleetSecurity
    topic_root: str
    creds: dict[str, DeviceCredentials]
    bundles: Path

    @property
    def ca_file(self) -> str:
        """The fleet CA certificate clients verify the broker with."""
        return str(self.security.ca.cert_path)

    def at(self, port: int) -> BrokerHandle:
        """A handle naming one listener, for MqttProbe (which connects to handle.host/port)."""
        return BrokerHandle("mosquitto", "127.0.0.1", port, None, None)

    def device_topic(self, device_id: str, channel: str) -> str:
        """edgefleet/v1/devices/{id}/{channel} under this test's root."""
        return f"{self.topic_root}/devices/{device_id}/{channel}"


@pytest.fixture
def secure_broker(mosquitto_binary: str, tmp_path: Path, topic_root: str) -> Iterator[SecureBroker]:
    """Password devices dev-a and dev-b, certificate device dev-c, the controller user."""
    security = FleetSecurity(tmp_path / "home")
    bundles = tmp_path / "bundles"
    creds = {
        "dev-a": security.provision_device("dev-a", "password", bundles / "dev-a"),
        "dev-b": security.provision_device("dev-b", "password", bundles / "dev-b"),
        "dev-c": security.provision_device("dev-c", "cert", bundles / "dev-c"),
    }
    handle = start_secure_mosquitto(
        security,
        tmp_path / "broker",
        host="127.0.0.1",
        tls_port=0,
        cert_port=0,
        topic_root=topic_root,
        binary=mosquitto_binary,
    )
    try:
        yield SecureBroker(handle, security, topic_root, creds, bundles)
    finally:
        handle.stop()


@pytest.fixture
def connect(secure_broker: SecureBroker) -> Iterator[Any]:
    """Factory: connect(who, client_id=None) -> a connected MqttProbe with that identity.

    who is "controller" (plaintext loopback), a password device (TLS) or "dev-c" (certificate).
    """
    probes: list[MqttProbe] = []

    def make(who: str, client_id: str | None = None) -> MqttProbe:
        b = secure_broker
        if who == "controller":
            probe = MqttProbe(b.handle, client_id=client_id)
            probe.client.username_pw_set(*b.security.controller_credentials())
        elif b.creds[who].auth == "cert":
            assert b.handle.cert_port is not None
            probe = MqttProbe(b.at(b.handle.cert_port), client_id=client_id)
            cert = b.creds[who]
            probe.client.tls_set_context(
                tls_context(b.ca_file, str(cert.cert_path), str(cert.key_path))
            )
        else:
            assert b.handle.tls_port is not None
            probe = MqttProbe(b.at(b.handle.tls_port), client_id=client_id)
            probe.client.username_pw_set(who, b.creds[who].password)
            probe.client.tls_set_context(tls_context(b.ca_file))
        probes.append(probe)
        return probe.connect()

    yield make
    for probe in probes:
        probe.close()


def _attempt(
    port: int,
    *,
    username: str | None = None,
    password: str | None = None,
    context: ssl.SSLContext | None = None,
) -> str:
    """Try one connection; 'accepted', or how it was refused (reason code, TLS error, closed)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="attempt")
    outcome: list[str] = []
    done = threading.Event()

    def on_connect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        outcome.append("accepted" if not reason.is_failure else f"refused: {reason}")
        done.set()

    def on_disconnect(c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        outcome.append(f"closed: {reason}")
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    if username is not None:
        client.username_pw_set(username, password)
    if context is not None:
        client.tls_set_context(context)
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except (ssl.SSLError, OSError) as exc:
        return f"tls error: {exc}"
    client.loop_start()
    try:
        assert done.wait(REFUSAL_TIMEOUT_S), f"no answer from port {port}"
    finally:
        client.disconnect()
        client.loop_stop()
    return outcome[0]


# --------------------------------------------------------------------------- ACL isolation


def test_device_cannot_publish_on_another_devices_topics(
    secure_broker: SecureBroker, connect: Any
) -> None:
    b = secure_broker
    controller = connect("controller")
    controller.subscribe(f"{b.topic_root}/#")
    dev_b = connect("dev-b")
    dev_b.subscribe(b.device_topic("dev-b", "cmd"))
    dev_a = connect("dev-a")
    for channel in ("telemetry", "cmd", "status", "hello", "desired"):
        dev_a.publish(b.device_topic("dev-b", channel), b"forged by dev-a")
    dev_a.publish(f"{b.topic_root}/artifacts/{'0' * 64}/manifest", b"forged manifest")
    dev_a.publish(f"{b.topic_root}/artifacts/{'0' * 64}/chunks/0", b"forged chunk")
    # A's own channels go through; the same connection's earlier publishes were handled first,
    # so once these arrive, anything forged would have arrived too.
    dev_a.publish(b.device_topic("dev-a", "telemetry"), b"own telemetry")
    dev_a.publish(f"{b.topic_root}/artifacts/{'0' * 64}/need", b"own need")
    controller.wait_for(b.device_topic("dev-a", "telemetry"))
    controller.wait_for(f"{b.topic_root}/artifacts/+/need")
    forged = [m.topic for m in controller.messages() if m.payload.startswith(b"forged")]
    assert forged == []
    assert dev_b.messages() == []


def test_device_cannot_read_other_devices_or_everything(
    secure_broker: SecureBroker, connect: Any
) -> None:
    b = secure_broker
    dev_a = connect("dev-a")
    for pattern in (f"{b.topic_root}/devices/+/cmd", "#", f"{b.topic_root}/#"):
        # A refused SUBACK is as good as a subscription that delivers nothing.
        with contextlib.suppress(ConnectionError):
            dev_a.subscribe(pattern)
    dev_a.subscribe(b.device_topic("dev-a", "cmd"))
    dev_a.subscribe(f"{b.topic_root}/artifacts/+/manifest")
    dev_b = connect("dev-b")
    dev_b.subscribe(b.device_topic("dev-b", "cmd"))
    controller = connect("controller")
    controller.publish(b.device_topic("dev-b", "cmd"), b"secret for b")
    controller.publish(b.device_topic("dev-b", "desired"), b"secret for b")
    dev_b.publish(b.device_topic("dev-b", "telemetry"), b"secret for b")
    dev_b.wait_for(b.device_topic("dev-b", "cmd"))
    # Sentinels A may read, published after the secrets by the same clients (ordered delivery).
    dev_b.publish(f"{b.topic_root}/artifacts/{'1' * 64}/manifest", b"not allowed either")
    controller.publish(b.device_topic("dev-a", "cmd"), b"for a")
    controller.publish(f"{b.topic_root}/artifacts/{'2' * 64}/manifest", b"manifest")
    dev_a.wait_for(b.device_topic("dev-a", "cmd"))
    dev_a.wait_for(f"{b.topic_root}/artifacts/+/manifest")
    payloads = sorted(m.payload for m in dev_a.messages())
    assert payloads == [b"for a", b"manifest"]


def test_certificate_device_is_confined_to_its_cn(
    secure_broker: SecureBroker, connect: Any
) -> None:
    b = secure_broker
    controller = connect("controller")
    controller.subscribe(f"{b.topic_root}/devices/#")
    dev_c = connect("dev-c")
    dev_c.subscribe(b.device_topic("dev-c", "cmd"))
    dev_c.publish(b.device_topic("dev-a", "telemetry"), b"forged by dev-c")
    dev_c.publish(b.device_topic("dev-c", "telemetry"), b"own")
    controller.wait_for(b.device_topic("dev-c", "telemetry"))
    assert [m.payload for m in controller.messages()] == [b"own"]
    controller.publish(b.device_topic("dev-c", "cmd"), b"for c")
    assert dev_c.wait_for(b.device_topic("dev-c", "cmd")).payload == b"for c"


def test_client_id_of_another_device_cannot_disconnect_it(
    secure_broker: SecureBroker, connect: Any
) -> None:
    b = secure_broker
    controller = connect("controller")
    controller.subscribe(f"{b.topic_root}/devices/+/telemetry")
    dev_b = connect("dev-b", client_id="dev-b")
    disconnected = threading.Event()
    dev_b.client.on_disconnect = lambda *args: disconnected.set()
    connect("dev-a", client_id="dev-b")  # a takeover attempt: same client id as B
    connect("dev-a", client_id="dev-b")  # twice: it may only ever replace A's own session
    dev_b.publish(b.device_topic("dev-b", "telemetry"), b"b still here")
    controller.wait_for(b.device_topic("dev-b", "telemetry"))
    assert not disconnected.is_set(), "dev-a's connection kicked dev-b off"
    log = (b.handle.data_dir / "mosquitto.log").read_text()  # type: ignore[operator]
    assert "as dev-a (" in log, "the broker must have replaced the requested client id"


# --------------------------------------------------------------------------- refusals


def test_anonymous_and_wrong_password_are_refused(secure_broker: SecureBroker) -> None:
    b = secure_broker
    tls_port = b.handle.tls_port
    assert tls_port is not None
    ca = tls_context(b.ca_file)
    assert _attempt(b.handle.port).startswith("refused")
    assert _attempt(tls_port, context=tls_context(b.ca_file)).startswith("refused")
    assert _attempt(tls_port, username="dev-a", password="wrong", context=ca).startswith("refused")
    b_password = b.creds["dev-b"].password
    result = _attempt(
        tls_port, username="dev-a", password=b_password, context=tls_context(b.ca_file)
    )
    assert result.startswith("refused"), "B's password must not open A's account"
    result = _attempt(tls_port, username="dev-c", password="", context=tls_context(b.ca_file))
    assert result.startswith("refused"), "a certificate device has no password"
    # The positive control: the same path with the right password is accepted.
    good = b.creds["dev-a"].password
    assert _attempt(tls_port, username="dev-a", password=good, context=ca) == "accepted"


def test_plaintext_on_the_tls_port_is_refused(secure_broker: SecureBroker) -> None:
    b = secure_broker
    assert b.handle.tls_port is not None
    result = _attempt(b.handle.tls_port, username="dev-a", password=b.creds["dev-a"].password)
    assert result.startswith("closed"), result


def test_certificate_from_another_ca_is_refused(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    b = secure_broker
    assert b.handle.cert_port is not None
    rogue = FleetCA.load_or_create(tmp_path / "rogue-ca")
    rogue.issue("dev-c", tmp_path / "rogue.crt", tmp_path / "rogue.key")
    context = tls_context(b.ca_file, str(tmp_path / "rogue.crt"), str(tmp_path / "rogue.key"))
    result = _attempt(b.handle.cert_port, context=context)
    assert result.startswith(("tls error", "closed")), result
    # No certificate at all on the certificate listener, even with a valid password.
    password = b.creds["dev-a"].password
    result = _attempt(
        b.handle.cert_port, username="dev-a", password=password, context=tls_context(b.ca_file)
    )
    assert result.startswith(("tls error", "closed")), result
    cert = b.creds["dev-c"]
    own = tls_context(b.ca_file, str(cert.cert_path), str(cert.key_path))
    assert _attempt(b.handle.cert_port, context=own) == "accepted"


def test_client_refuses_a_broker_signed_by_another_ca(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    b = secure_broker
    assert b.handle.tls_port is not None
    rogue = FleetCA.load_or_create(tmp_path / "rogue-ca")
    password = b.creds["dev-a"].password
    result = _attempt(
        b.handle.tls_port,
        username="dev-a",
        password=password,
        context=tls_context(str(rogue.cert_path)),
    )
    assert result.startswith("tls error") and "CERTIFICATE_VERIFY_FAILED" in result, result


# --------------------------------------------------------------------------- embedded broker


def test_embedded_mosquitto_beyond_loopback_requires_authentication(
    mosquitto_binary: str, tmp_path: Path
) -> None:
    with pytest.raises(BrokerError, match="requires device authentication"):
        start_embedded(tmp_path / "bare", host="0.0.0.0", prefer="mosquitto")
    assert not (tmp_path / "bare" / "mosquitto.conf").exists()
    security = FleetSecurity(tmp_path / "home")
    creds = security.provision_device("dev-a", "password", tmp_path / "bundle")
    handle = start_embedded(
        tmp_path / "broker", host="0.0.0.0", prefer="mosquitto", security=security, tls_port=0
    )
    try:
        assert handle.kind == "mosquitto" and handle.tls_port is not None
        conf = (tmp_path / "broker" / "mosquitto.conf").read_text()
        listeners = conf.split("\nlistener ")[1:]
        assert listeners[0].startswith(f"{handle.port} 127.0.0.1\n"), "plaintext is loopback"
        assert all("certfile" in section for section in listeners[1:]), "the rest is TLS"
        assert _attempt(handle.port).startswith("refused")
        ca = tls_context(str(security.ca.cert_path))
        assert _attempt(handle.tls_port, context=ca).startswith("refused")
        good = _attempt(handle.tls_port, username="dev-a", password=creds.password, context=ca)
        assert good == "accepted"
    finally:
        handle.stop()


def test_amqtt_refuses_to_listen_beyond_loopback(tmp_path: Path) -> None:
    pytest.importorskip("amqtt")
    from controller.brokers.amqtt_broker import start_amqtt

    port = free_port("0.0.0.0")
    for start in (
        lambda: start_embedded(tmp_path, host="0.0.0.0", port=port, prefer="amqtt"),
        lambda: start_amqtt(host="0.0.0.0", port=port),
    ):
        with pytest.raises(BrokerError, match="only listens on loopback"):
            start()
        assert not [t for t in threading.enumerate() if t.name == f"amqtt-{port}"]


# --------------------------------------------------------------------------- end to end


def _finished(fleet: Fleet, deployment_id: str) -> dict[str, Any] | None:
    """The deployment once every device reached a terminal state."""
    dep = fleet.deployment(deployment_id)
    return dep if all(d["state"] in ("succeeded", "failed") for d in dep["devices"]) else None


@pytest.mark.e2e
def test_agents_over_tls_register_and_deploy(
    mosquitto_binary: str, tmp_path: Path, topic_root: str
) -> None:
    """Real agents from generated bundles (password and certificate) reach a credentialed
    controller over TLS only, and a deployment to both succeeds."""
    home = tmp_path / "controller"
    fleet = Fleet(home)
    tls_port, cert_port = free_port(), free_port()
    agents: list[AgentProcess] = []
    for device_id, auth, port in (
        ("tls-pw", "password", tls_port),
        ("tls-cert", "cert", cert_port),
    ):
        row = fleet.register_device(
            device_id,
            "rpi4",
            auth=auth,
            bundle_dir=tmp_path / "bundles" / device_id,
            broker_url=f"mqtts://localhost:{port}",
            topic_root=topic_root,
            agent_data_dir=str(tmp_path / "agents" / device_id),
        )
        config_path = Path(row["bundle"]) / "agent.toml"
        agents.append(
            AgentProcess(load_config(config_path), config_path, tmp_path / f"{device_id}.log")
        )
    security = FleetSecurity(home)
    handle = start_secure_mosquitto(
        security,
        tmp_path / "broker",
        host="127.0.0.1",
        tls_port=tls_port,
        cert_port=cert_port,
        topic_root=topic_root,
        binary=mosquitto_binary,
    )
    username, password = security.controller_credentials()
    service = ControllerService(
        home, handle.url, topic_root=topic_root, username=username, password=password
    )
    try:
        service.start()
        assert service.ready.wait(15), "controller did not connect with its credentials"
        for agent in agents:
            agent.start()
        for agent in agents:
            wait_until(
                lambda a=agent: fleet.device(a.config.device_id)["online"],
                30,
                f"hello from {agent.config.device_id} over TLS\n{agent.log()[-2000:]}",
            )
        dep = fleet.deploy(DATA / "tiny_fp32.tflite", devices=[a.config.device_id for a in agents])
        done = wait_until(lambda: _finished(fleet, dep["id"]), 60, f"deployment {dep['id']}")
        logs = "\n".join(a.log()[-1500:] for a in agents)
        assert [d["state"] for d in done["devices"]] == ["succeeded", "succeeded"], logs
        log = (tmp_path / "broker" / "mosquitto.log").read_text()
        assert "as tls-pw (" in log and "as tls-cert (" in log
        # The loopback listener keeps the controller's client id; the username is its own.
        assert f"as edgefleet-controller (p2, c0, k30, u'{username}')" in log, log
    finally:
        for agent in agents:
            agent.terminate()
        service.stop()
        fleet.close()
        handle.stop()

"""Integration tests for controller/brokers/ against real mosquitto and amqtt brokers."""

from __future__ import annotations

import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest

from controller.brokers import mosquitto as broker_mod
from controller.brokers.amqtt_broker import start_amqtt
from controller.brokers.base import (
    BrokerError,
    BrokerHandle,
    PortInUseError,
    free_port,
    parse_broker_url,
    wait_for_port,
)
from controller.brokers.mosquitto import MAX_QUEUED_MESSAGES, start_mosquitto
from controller.runtime.embedded_broker import start_embedded
from tests.mqtt_helpers import LastWill, MqttProbe, wait_until

pytestmark = pytest.mark.integration

ProbeFactory = Callable[..., MqttProbe]

# The protocol's chunk cap (protocol/limits.py: 128 KiB); the largest payload we must carry.
CHUNK_BYTES = 128 * 1024
# More than mosquitto's default max_queued_messages (1000), so the default would drop some.
BACKLOG_MESSAGES = 1500


# --------------------------------------------------------------------------- helpers


def accepts_connections(host: str, port: int) -> bool:
    """Whether something accepts a TCP connection on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def mosquitto_children() -> list[psutil.Process]:
    """Live mosquitto processes started by this test process."""
    return [
        child
        for child in psutil.Process().children()
        if child.is_running()
        and child.status() != psutil.STATUS_ZOMBIE
        and child.name() == "mosquitto"
    ]


def config_values_from_text(text: str) -> dict[str, str]:
    """mosquitto config text as {option: rest of line} (last one wins, comments skipped)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, rest = line.strip().partition(" ")
            values[key] = rest
    return values


def config_values(conf: Path) -> dict[str, str]:
    """config_values_from_text() for a config file on disk."""
    return config_values_from_text(conf.read_text())


def publish_then_mark(publisher: MqttProbe, receiver: MqttProbe, topic_root: str) -> None:
    """Publish a marker and wait for `receiver` to get it: what came before it has arrived."""
    publisher.publish(f"{topic_root}/marker", b"marker")
    receiver.wait_for(f"{topic_root}/marker")


@pytest.fixture
def listening_socket() -> Iterator[tuple[str, int]]:
    """A plain TCP listener on a free loopback port, standing in for 'another broker'."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield "127.0.0.1", sock.getsockname()[1]
    finally:
        sock.close()


# --------------------------------------------------------------------------- both brokers


def test_broker_starts_on_a_free_loopback_port(broker: BrokerHandle) -> None:
    """port=0 yields a real, listening port and a URL that parses back to it."""
    assert broker.port > 0
    assert broker.host == "127.0.0.1"
    assert broker.is_running()
    assert accepts_connections(broker.host, broker.port)
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert parse_broker_url(broker.url) == ("127.0.0.1", broker.port)


def test_qos1_round_trip(broker: BrokerHandle, topic_root: str, mqtt_probe: ProbeFactory) -> None:
    """A QoS1 publish is acknowledged and delivered at QoS1 with its payload intact."""
    subscriber = mqtt_probe(broker)
    subscriber.subscribe(f"{topic_root}/devices/+/events", qos=1)
    publisher = mqtt_probe(broker)
    publisher.publish(f"{topic_root}/devices/d1/events", b'{"v":1}', qos=1)

    message = subscriber.wait_for(f"{topic_root}/devices/d1/events")
    assert message.payload == b'{"v":1}'
    assert message.qos == 1
    assert message.retain is False


def test_retained_message_reaches_late_subscriber(
    broker: BrokerHandle, topic_root: str, mqtt_probe: ProbeFactory
) -> None:
    """A retained status reaches a subscriber that arrives later; a plain event does not."""
    publisher = mqtt_probe(broker)
    publisher.publish(f"{topic_root}/devices/d1/status", b"online", qos=1, retain=True)
    publisher.publish(f"{topic_root}/devices/d1/events", b"missed", qos=1)

    late = mqtt_probe(broker)
    late.subscribe(f"{topic_root}/#", qos=1)
    status = late.wait_for(f"{topic_root}/devices/d1/status")
    assert status.payload == b"online"
    assert status.retain is True
    publish_then_mark(publisher, late, topic_root)
    assert late.messages(f"{topic_root}/devices/d1/events") == []


def test_128_kib_binary_payload_round_trip(
    broker: BrokerHandle, topic_root: str, mqtt_probe: ProbeFactory
) -> None:
    """A full-size artifact chunk (random bytes, every byte value) arrives unchanged."""
    payload = os.urandom(CHUNK_BYTES - 256) + bytes(range(256))
    subscriber = mqtt_probe(broker)
    subscriber.subscribe(f"{topic_root}/artifacts/+/chunks/+", qos=1)
    publisher = mqtt_probe(broker)
    publisher.publish(f"{topic_root}/artifacts/abc/chunks/0", payload, qos=1)

    message = subscriber.wait_for(f"{topic_root}/artifacts/abc/chunks/0")
    assert len(message.payload) == CHUNK_BYTES
    assert message.payload == payload


def test_last_will_is_published_and_retained(
    broker: BrokerHandle, topic_root: str, mqtt_probe: ProbeFactory
) -> None:
    """A device that drops without DISCONNECT gets its retained 'offline' status published."""
    status = f"{topic_root}/devices/d1/status"
    watcher = mqtt_probe(broker)
    watcher.subscribe(status)
    device = mqtt_probe(broker, will=LastWill(status, b"offline", qos=1, retain=True))
    device.drop()
    assert watcher.wait_for(status).payload == b"offline"

    late = mqtt_probe(broker)
    late.subscribe(status)
    message = late.wait_for(status)
    assert (message.payload, message.retain) == (b"offline", True)


def port_in_use_message(host: str, port: int) -> str:
    """The exact PortInUseError text the CLI shows."""
    return (
        f"port {port} on {host} is already in use (another MQTT broker?); "
        "pass --port 0 for a free port or --broker URL to use it"
    )


def test_mosquitto_taken_port_raises_before_starting_anything(
    listening_socket: tuple[str, int], tmp_path: Path, mosquitto_binary: str
) -> None:
    """A port someone listens on gives PortInUseError and leaves no process or config."""
    host, port = listening_socket
    with pytest.raises(PortInUseError) as exc:
        start_mosquitto(tmp_path / "m", host=host, port=port, binary=mosquitto_binary)
    assert str(exc.value) == port_in_use_message(host, port)
    assert not (tmp_path / "m" / "mosquitto.conf").exists()
    assert mosquitto_children() == []


def test_amqtt_taken_port_raises_before_starting_anything(
    listening_socket: tuple[str, int],
) -> None:
    """A port someone listens on gives PortInUseError and leaves no broker thread behind."""
    host, port = listening_socket
    with pytest.raises(PortInUseError) as exc:
        start_amqtt(host=host, port=port)
    assert str(exc.value) == port_in_use_message(host, port)
    assert not [t for t in threading.enumerate() if t.name == f"amqtt-{port}"]


# --------------------------------------------------------------------------- mosquitto


def test_mosquitto_generated_config(mosquitto_broker: BrokerHandle) -> None:
    """The generated config raises the queue limit, caps packets and points into the data dir."""
    assert mosquitto_broker.data_dir is not None
    conf = mosquitto_broker.data_dir / "mosquitto.conf"
    values = config_values(conf)
    assert int(values["max_queued_messages"]) == MAX_QUEUED_MESSAGES > 1000
    assert 1 <= int(values["max_inflight_messages"]) <= 1000
    assert int(values["max_packet_size"]) >= 1024 * 1024
    assert "message_size_limit" not in conf.read_text()
    assert values["listener"] == f"{mosquitto_broker.port} 127.0.0.1"
    assert values["allow_anonymous"] == "true"
    assert values["persistence"] == "false"
    assert values["log_dest"] == f"file {mosquitto_broker.data_dir / 'mosquitto.log'}"
    pid_file = Path(values["pid_file"])
    assert pid_file.parent == mosquitto_broker.data_dir
    assert wait_until(pid_file.exists)
    assert int(pid_file.read_text()) == mosquitto_broker.pid


def test_mosquitto_non_loopback_listener_is_not_anonymous(tmp_path: Path) -> None:
    """Only a loopback listener allows anonymous clients; a LAN one needs extra_config auth."""
    lan = broker_mod.mosquitto_config(tmp_path, host="0.0.0.0", port=1884, persistence=False)
    assert config_values_from_text(lan)["allow_anonymous"] == "false"
    opened = broker_mod.mosquitto_config(
        tmp_path, host="0.0.0.0", port=1884, persistence=False, extra_config="allow_anonymous true"
    )
    assert config_values_from_text(opened)["allow_anonymous"] == "true"


def test_mosquitto_queues_more_than_its_default_for_an_offline_subscriber(
    mosquitto_broker: BrokerHandle, topic_root: str, mqtt_probe: ProbeFactory
) -> None:
    """A persistent QoS1 subscriber that was away gets all 1500 messages (default keeps 1000)."""
    client_id = f"lagging-{os.getpid()}"
    away = mqtt_probe(mosquitto_broker, client_id=client_id, clean_session=False)
    away.subscribe(f"{topic_root}/telemetry", qos=1)
    away.close()

    publisher = mqtt_probe(mosquitto_broker)
    infos = [
        publisher.client.publish(f"{topic_root}/telemetry", str(n).encode(), qos=1)
        for n in range(BACKLOG_MESSAGES)
    ]
    for info in infos:
        info.wait_for_publish(10.0)
    assert all(info.is_published() for info in infos)

    back = mqtt_probe(mosquitto_broker, client_id=client_id, clean_session=False)
    received = back.wait_for_count(f"{topic_root}/telemetry", BACKLOG_MESSAGES, timeout=20.0)
    assert [int(m.payload) for m in received] == list(range(BACKLOG_MESSAGES))


def test_mosquitto_mqtt5_client_carries_a_full_chunk(
    mosquitto_broker: BrokerHandle, topic_root: str, mqtt_probe: ProbeFactory
) -> None:
    """paho's MQTT 5 client works with the generated limits (the reason for max_packet_size)."""
    payload = os.urandom(CHUNK_BYTES)
    subscriber = mqtt_probe(mosquitto_broker, protocol=mqtt.MQTTv5)
    subscriber.subscribe(f"{topic_root}/artifacts/x/chunks/+", qos=1)
    publisher = mqtt_probe(mosquitto_broker, protocol=mqtt.MQTTv5)
    publisher.publish(f"{topic_root}/artifacts/x/chunks/7", payload, qos=1)
    assert subscriber.wait_for(f"{topic_root}/artifacts/x/chunks/7").payload == payload


def test_mosquitto_stop_kills_the_process(mosquitto_binary: str, tmp_path: Path) -> None:
    """stop() ends the PID and frees the port; a second stop() is harmless."""
    handle = start_mosquitto(tmp_path / "m", binary=mosquitto_binary)
    assert handle.pid is not None
    pid = handle.pid
    assert psutil.pid_exists(pid)
    handle.stop()
    assert not psutil.pid_exists(pid)
    assert not handle.is_running()
    assert not accepts_connections(handle.host, handle.port)
    handle.stop()


def test_mosquitto_gets_the_hard_open_files_limit(mosquitto_binary: str, tmp_path: Path) -> None:
    """One fd per connection: a broker started under a 1,024 soft limit still gets the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"hard open files limit {hard}: nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        handle = start_mosquitto(tmp_path / "m", binary=mosquitto_binary)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert handle.pid is not None
        assert psutil.Process(handle.pid).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
    finally:
        handle.stop()


def test_mosquitto_stop_escalates_to_sigkill(mosquitto_binary: str, tmp_path: Path) -> None:
    """A broker that cannot act on SIGTERM (stopped with SIGSTOP) is SIGKILLed after the timeout."""
    handle = start_mosquitto(tmp_path / "m", binary=mosquitto_binary)
    assert handle.pid is not None
    os.kill(handle.pid, signal.SIGSTOP)
    started = time.monotonic()
    handle.stop(timeout=0.5)
    assert time.monotonic() - started >= 0.5
    assert not psutil.pid_exists(handle.pid)


def test_mosquitto_stop_by_pid_without_the_popen(mosquitto_binary: str, tmp_path: Path) -> None:
    """A handle rebuilt from kind/host/port/pid alone (no Popen) still stops the broker."""
    original = start_mosquitto(tmp_path / "m", binary=mosquitto_binary)
    try:
        assert original.pid is not None and original._process is not None
        rebuilt = BrokerHandle("mosquitto", original.host, original.port, original.pid, None)
        assert rebuilt.is_running()
        # Our child must still be reaped by its Popen, or it lingers as a zombie that
        # os.kill(pid, 0) keeps seeing; a non-child broker is reaped by its own parent.
        reaper = threading.Thread(target=original._process.wait)
        reaper.start()
        rebuilt.stop(timeout=5.0)
        reaper.join(5.0)
        assert not psutil.pid_exists(original.pid)
        assert not accepts_connections(original.host, original.port)
    finally:
        original.stop()


def test_mosquitto_bad_config_raises_with_log_tail(mosquitto_binary: str, tmp_path: Path) -> None:
    """A process that dies on start raises BrokerError quoting mosquitto's own error lines."""
    with pytest.raises(BrokerError) as exc:
        start_mosquitto(
            tmp_path / "m", binary=mosquitto_binary, extra_config="edgefleet_no_such_option 1"
        )
    message = str(exc.value)
    assert not isinstance(exc.value, PortInUseError)
    assert "exited with code" in message
    assert 'Unknown configuration variable "edgefleet_no_such_option"' in message
    assert mosquitto_children() == []


def test_mosquitto_refuses_a_second_broker_on_the_same_data_dir(
    mosquitto_broker: BrokerHandle, mosquitto_binary: str
) -> None:
    """A live broker from an earlier run on the same data dir is named, not silently doubled."""
    assert mosquitto_broker.data_dir is not None
    with pytest.raises(BrokerError, match=f"mosquitto pid {mosquitto_broker.pid} from an earlier"):
        start_mosquitto(mosquitto_broker.data_dir, binary=mosquitto_binary)
    assert mosquitto_broker.is_running()
    assert len(mosquitto_children()) == 1


def test_mosquitto_ignores_a_stale_pid_file(mosquitto_binary: str, tmp_path: Path) -> None:
    """A pid file left by a killed broker (its PID now gone or reused) does not block a start."""
    data_dir = tmp_path / "m"
    data_dir.mkdir()
    (data_dir / "mosquitto.pid").write_text(f"{os.getpid()}\n")  # alive, but not our broker
    handle = start_mosquitto(data_dir, binary=mosquitto_binary)
    try:
        assert handle.is_running()
    finally:
        handle.stop()


def test_mosquitto_missing_binary_raises(tmp_path: Path) -> None:
    """An explicit binary that does not exist is a BrokerError, not a FileNotFoundError."""
    with pytest.raises(BrokerError, match="cannot run"):
        start_mosquitto(tmp_path / "m", binary=str(tmp_path / "no-mosquitto"))


def test_mosquitto_auto_port_retries_a_port_taken_meanwhile(
    mosquitto_binary: str,
    tmp_path: Path,
    listening_socket: tuple[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """port=0: when the free port is gone before mosquitto binds it, another one is picked."""
    _, busy = listening_socket
    ports = iter([busy, free_port()])
    monkeypatch.setattr(broker_mod, "free_port", lambda host="127.0.0.1": next(ports))
    handle = start_mosquitto(tmp_path / "m", binary=mosquitto_binary)
    try:
        assert handle.port != busy
        assert accepts_connections(handle.host, handle.port)
    finally:
        handle.stop()


def test_mosquitto_bind_failure_after_the_check_is_port_in_use(
    mosquitto_binary: str,
    tmp_path: Path,
    listening_socket: tuple[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the port is taken between the check and mosquitto's bind, the log is read correctly."""
    host, busy = listening_socket
    monkeypatch.setattr(broker_mod, "_check_port_free", lambda host, port: None)
    with pytest.raises(PortInUseError, match=f"port {busy} on {host}"):
        start_mosquitto(tmp_path / "m", host=host, port=busy, binary=mosquitto_binary)
    assert mosquitto_children() == []


@pytest.mark.parametrize("persistence", [True, False], ids=["persistent", "volatile"])
def test_mosquitto_persistence_keeps_retained_across_restart(
    persistence: bool,
    mosquitto_binary: str,
    tmp_path: Path,
    topic_root: str,
    mqtt_probe: ProbeFactory,
) -> None:
    """With persistence a retained message survives a restart on the same data dir; without, not."""
    data_dir = tmp_path / "m"
    first = start_mosquitto(data_dir, persistence=persistence, binary=mosquitto_binary)
    try:
        publisher = mqtt_probe(first)
        publisher.publish(f"{topic_root}/devices/d1/desired", b"gen-7", qos=1, retain=True)
        publisher.close()
    finally:
        first.stop()
    assert (data_dir / "mosquitto.db").exists() is persistence

    second = start_mosquitto(data_dir, persistence=persistence, binary=mosquitto_binary)
    try:
        late = mqtt_probe(second)
        late.subscribe(f"{topic_root}/#", qos=1)
        publish_then_mark(late, late, topic_root)
        desired = late.messages(f"{topic_root}/devices/d1/desired")
        assert [m.payload for m in desired] == ([b"gen-7"] if persistence else [])
    finally:
        second.stop()


# --------------------------------------------------------------------------- amqtt


def test_amqtt_stop_frees_the_port_and_thread(
    amqtt_broker: BrokerHandle, mqtt_probe: ProbeFactory
) -> None:
    """stop() with a client still connected closes the listener and ends the broker thread."""
    mqtt_probe(amqtt_broker)
    assert amqtt_broker.pid is None
    amqtt_broker.stop(timeout=5.0)
    assert not amqtt_broker.is_running()
    assert not accepts_connections(amqtt_broker.host, amqtt_broker.port)
    assert wait_until(
        lambda: not [t for t in threading.enumerate() if t.name == f"amqtt-{amqtt_broker.port}"],
        timeout=5.0,
    )
    amqtt_broker.stop()


def test_amqtt_stop_is_prompt_right_after_qos1_traffic(
    topic_root: str, mqtt_probe: ProbeFactory
) -> None:
    """Stopping just after a QoS1 exchange does not hang in amqtt's shutdown (a 3.11 race)."""
    for _ in range(5):
        handle = start_amqtt()
        try:
            probe = mqtt_probe(handle)
            probe.subscribe(f"{topic_root}/x", qos=1)
            probe.publish(f"{topic_root}/x", b"hi", qos=1)
            probe.wait_for(f"{topic_root}/x")
        finally:
            started = time.monotonic()
            handle.stop(timeout=5.0)
        assert time.monotonic() - started < 2.0
        assert not accepts_connections(handle.host, handle.port)


# --------------------------------------------------------------------------- start_embedded


@pytest.fixture
def no_mosquitto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty PATH and no sbin fallback: mosquitto cannot be found."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(broker_mod, "MOSQUITTO_FALLBACK_DIRS", ())


def test_embedded_auto_picks_mosquitto_on_path(
    mosquitto_binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prefer="auto" starts mosquitto (with persistence) when PATH has one."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mosquitto").symlink_to(mosquitto_binary)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(broker_mod, "MOSQUITTO_FALLBACK_DIRS", ())
    handle = start_embedded(tmp_path / "data")
    try:
        assert handle.kind == "mosquitto"
        assert handle.pid is not None
        assert handle.data_dir == (tmp_path / "data").resolve()
        assert config_values(tmp_path / "data" / "mosquitto.conf")["persistence"] == "true"
    finally:
        handle.stop()


def test_embedded_auto_finds_mosquitto_in_sbin(
    mosquitto_binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_mosquitto: None
) -> None:
    """Off PATH, the sbin fallback directories still find mosquitto."""
    monkeypatch.setattr(
        broker_mod, "MOSQUITTO_FALLBACK_DIRS", (str(Path(mosquitto_binary).parent),)
    )
    handle = start_embedded(tmp_path / "data")
    try:
        assert handle.kind == "mosquitto"
    finally:
        handle.stop()


def test_embedded_auto_falls_back_to_amqtt(
    tmp_path: Path, no_mosquitto: None, topic_root: str, mqtt_probe: ProbeFactory
) -> None:
    """Without mosquitto, prefer="auto" runs amqtt in-process, and it carries messages."""
    handle = start_embedded(tmp_path / "data")
    try:
        assert handle.kind == "amqtt"
        assert handle.pid is None
        probe = mqtt_probe(handle)
        probe.subscribe(f"{topic_root}/x")
        probe.publish(f"{topic_root}/x", b"hi")
        assert probe.wait_for(f"{topic_root}/x").payload == b"hi"
    finally:
        handle.stop()


def test_embedded_prefer_amqtt_even_with_mosquitto(mosquitto_binary: str, tmp_path: Path) -> None:
    """prefer="amqtt" is honoured when mosquitto is installed."""
    handle = start_embedded(tmp_path / "data", prefer="amqtt")
    try:
        assert handle.kind == "amqtt"
    finally:
        handle.stop()


def test_embedded_prefer_mosquitto_without_binary_raises(
    tmp_path: Path, no_mosquitto: None
) -> None:
    """prefer="mosquitto" never falls back silently."""
    with pytest.raises(BrokerError, match="mosquitto not found"):
        start_embedded(tmp_path / "data", prefer="mosquitto")


def test_embedded_unknown_prefer_raises(tmp_path: Path) -> None:
    """A typo in prefer is a ValueError naming the choices."""
    with pytest.raises(ValueError, match="unknown broker 'mosqitto'"):
        start_embedded(tmp_path / "data", prefer="mosqitto")


# --------------------------------------------------------------------------- ports and URLs


def test_free_port_is_bindable() -> None:
    """free_port() returns a port nobody holds."""
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_wait_for_port(listening_socket: tuple[str, int]) -> None:
    """wait_for_port returns for a listener and times out quickly on a closed port."""
    host, port = listening_socket
    wait_for_port(host, port, timeout=2.0)
    closed = free_port()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"{closed}"):
        wait_for_port("127.0.0.1", closed, timeout=0.3)
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://localhost", ("localhost", 1883)),
        ("mqtt://10.0.0.5:1884", ("10.0.0.5", 1884)),
        ("tcp://broker.example:8883", ("broker.example", 8883)),
        ("mqtt://[::1]:1885", ("::1", 1885)),
        ("  mqtt://h:1/ ", ("h", 1)),
        ("MQTT://Broker:2", ("broker", 2)),
    ],
)
def test_parse_broker_url_good(url: str, expected: tuple[str, int]) -> None:
    """Accepted URL forms and their (host, port)."""
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("localhost:1883", "no scheme"),
        ("", "no scheme"),
        ("mqtts://h:8883", "unsupported scheme 'mqtts'"),
        ("http://h", "unsupported scheme 'http'"),
        ("mqtt://:1883", "missing host"),
        ("mqtt://h:abc", "invalid port 'abc'"),
        ("mqtt://h:70000", "invalid port '70000'"),
        ("mqtt://h:0", "invalid port '0'"),
        ("mqtt://h:", "empty port"),
        ("mqtt://user:pw@h", "credentials"),
        ("mqtt://h/edgefleet", "unexpected path '/edgefleet'"),
        ("mqtt://h?x=1", "unexpected query or fragment 'x=1'"),
    ],
)
def test_parse_broker_url_bad(url: str, names: str) -> None:
    """Rejected URLs raise ValueError naming the bad part."""
    with pytest.raises(ValueError, match=names):
        parse_broker_url(url)


def test_credentials_in_a_broker_url_are_not_echoed() -> None:
    """The refusal names the problem without printing the secret (issue 21)."""
    with pytest.raises(ValueError, match="credentials") as caught:
        parse_broker_url("mqtt://ctl:hunter2@h:1883")
    assert "hunter2" not in str(caught.value) and "mqtt://***@h:1883" in str(caught.value)


def test_ipv6_url_round_trips() -> None:
    """An IPv6 handle's URL brackets the host so it parses back."""
    handle = BrokerHandle("mosquitto", "::1", 1999, None, None)
    assert handle.url == "mqtt://[::1]:1999"
    assert parse_broker_url(handle.url) == ("::1", 1999)

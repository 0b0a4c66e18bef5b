"""agent.toml: strict keys, clear errors naming file and key, round trip through dump_config."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.protocol.config import (
    AgentConfig,
    ConfigError,
    PowerModelConfig,
    dump_config,
    load_config,
)
from agent.protocol.transport import parse_mqtt_url

pytestmark = pytest.mark.agent


def test_round_trip(tmp_path: Path) -> None:
    cfg = AgentConfig(
        device_id="d-1",
        data_dir=tmp_path / "data",
        broker="mqtt://127.0.0.1:1999",
        profile="rpi4",
        threads=2,
        serve_http="127.0.0.1:8765",
        batch_window_ms=2.5,
        max_batch=16,
        result_cache_entries=128,
        telemetry_interval_s=5,
        spool_max_records=500,
        spool_overflow="drop_newest",
        spool_keep_acked=50,
        power=PowerModelConfig(2.7, 0.9, 0.0),
    )
    path = tmp_path / "agent.toml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert cfg.socket_path == tmp_path / "data" / "infer.sock"
    assert AgentConfig("d", tmp_path, serve_socket="").socket_path is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('device_id = "d"\ndata_dir = "/x"\nbogus = 1\n', "unknown key 'bogus'"),
        ('data_dir = "/x"\n', "missing key 'device_id'"),
        (
            'device_id = "d"\ndata_dir = "/x"\nthreads = "2"\n',
            "'threads': expected an integer, got '2'",
        ),
        ('device_id = "d"\ndata_dir = "/x"\nreported = true\n', "unknown key 'reported'"),
        ('device_id = "d"\ndata_dir = 7\n', "'data_dir': expected a string, got int"),
        ('device_id = "d"\ndata_dir = "/x"\nthreads = true\n', "expected an integer, got True"),
        ('device_id = "d"\ndata_dir = "/x"\npower = 3\n', "'power': expected an object"),
        ('device_id = "d"\ndata_dir = "/x"\n[power]\nidle_w = "2"\n', "'power.idle_w': expected"),
        ('device_id = "a/b"\ndata_dir = "/x"\n', "Invalid device id"),
        ('device_id = "d"\ndata_dir = "/x"\n[power]\nwatts = 3\n', "unknown key 'power.watts'"),
        ('device_id = "d"\ndata_dir = "/x"\nthreads = 0\n', "threads must be >= 1"),
        ('device_id = "d"\ndata_dir = "/x"\nspool_overflow = "lifo"\n', "spool_overflow must be"),
        ('device_id = "d"\ndata_dir = "/x"\nmax_batch = 0\n', "max_batch must be >= 1"),
        ('device_id = "d"\ndata_dir = "/x"\ntelemetry_interval_s = 0\n', "must be > 0"),
        ('device_id = "d"\ndata_dir = "/x"\nspool_keep_acked = -1\n', "must be >= 0"),
        ("device_id = \n", "invalid TOML"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("url", "expected"),
    [("mqtt://127.0.0.1:1999", ("127.0.0.1", 1999)), ("tcp://h", ("h", 1883)), ("h:12", ("h", 12))],
)
def test_parse_mqtt_url(url: str, expected: tuple[str, int]) -> None:
    assert parse_mqtt_url(url) == expected


@pytest.mark.parametrize("url", ["http://h:1", "mqtt://:1"])
def test_parse_mqtt_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        parse_mqtt_url(url)


@pytest.mark.parametrize(
    ("machine", "pointer", "expected"),
    [
        ("aarch64", 8, "aarch64"),
        ("aarch64", 4, "armv7l"),
        ("armv7l", 4, "armv7l"),
        ("x86_64", 8, "x86_64"),
        ("x86_64", 4, "i686"),
    ],
)
def test_userland_arch(machine: str, pointer: int, expected: str) -> None:
    from agent.facts import userland_arch

    assert userland_arch(machine, pointer) == expected


# --------------------------------------------------------------------------- TLS keys


def test_tls_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "agent.toml").write_text(
        'device_id = "d"\ndata_dir = "/srv/d"\nbroker = "mqtts://b:8884"\n'
        'ca_file = "ca.crt"\ncert_file = "device.crt"\nkey_file = "/abs/device.key"\n'
    )
    cfg = load_config(bundle / "agent.toml")
    assert cfg.ca_file == str(bundle / "ca.crt")
    assert cfg.cert_file == str(bundle / "device.crt")
    assert cfg.key_file == "/abs/device.key"
    assert load_config(Path(dump_config_path(cfg, tmp_path))) == cfg


def dump_config_path(cfg: AgentConfig, directory: Path) -> str:
    """Write `cfg` as agent.toml in `directory` and return its path."""
    path = directory / "round.toml"
    path.write_text(dump_config(cfg))
    return str(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"broker": "mqtt://b:1883", "ca_file": "ca.crt"}, "is not TLS: use mqtts://"),
        ({"broker": "mqtts://b", "cert_file": "c.crt"}, "must be given together"),
    ],
)
def test_tls_config_errors(tmp_path: Path, kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AgentConfig("d", tmp_path, **kwargs)  # type: ignore[arg-type]


def test_mqtts_url_and_missing_tls_file(tmp_path: Path) -> None:
    from agent.protocol.transport import MqttSession, is_tls_url

    assert parse_mqtt_url("mqtts://b") == ("b", 8883)
    assert parse_mqtt_url("ssl://b:9") == ("b", 9)
    assert is_tls_url("mqtts://b") and not is_tls_url("mqtt://b") and not is_tls_url("b:1")
    missing = str(tmp_path / "nope.crt")
    with pytest.raises(ValueError, match=r"ca_file .*nope.crt.* does not exist"):
        MqttSession("mqtts://b", "d", on_message=print, on_connect=print, ca_file=missing)
    with pytest.raises(ValueError, match="not mqtts://"):
        MqttSession("mqtt://b", "d", on_message=print, on_connect=print, ca_file=missing)
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(ValueError, match="cannot load client certificate"):
        MqttSession(
            "mqtts://b",
            "d",
            on_message=print,
            on_connect=print,
            cert_file=str(tmp_path / "junk.crt"),
            key_file=str(tmp_path / "junk.crt"),
        )
    session = MqttSession("mqtts://b", "d", on_message=print, on_connect=print)
    assert session.tls and session.port == 8883

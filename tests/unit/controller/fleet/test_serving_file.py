"""HOME/serving.json through its pydantic model (`Serving`): the records `up` writes load back,
and a bad record is one line naming the file, the key and the problem, also at the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli.main import app
from controller.fleet.onboarding import (
    SERVING_FILE,
    Serving,
    ServingFileError,
    embedded_serving,
    external_serving,
    read_serving,
    write_serving,
)

# A record exactly as the writer before the model (dataclasses.asdict) wrote it for a secured
# embedded broker: the same keys, in the same order.
WRITTEN_BEFORE = """{
  "pid": 4242,
  "started_at": 1733570000.25,
  "device_broker": "mqtts://gw.example:8883",
  "auth": "password",
  "topic_root": "edgefleet/v1",
  "embedded": true,
  "cert_broker": "mqtts://gw.example:8884",
  "broker_pid": 4243,
  "broker_dir": "/home/op/.local/share/edgefleet/broker"
}
"""


def test_a_record_written_before_the_model_loads(tmp_path: Path) -> None:
    (tmp_path / SERVING_FILE).write_text(WRITTEN_BEFORE)
    assert read_serving(tmp_path) == Serving(
        pid=4242,
        started_at=1733570000.25,
        device_broker="mqtts://gw.example:8883",
        auth="password",
        cert_broker="mqtts://gw.example:8884",
        broker_pid=4243,
        broker_dir="/home/op/.local/share/edgefleet/broker",
    )


@pytest.mark.parametrize(
    "serving",
    [
        embedded_serving(
            host="127.0.0.1", url="mqtt://127.0.0.1:1883", secured=False, tls_port=None,
            cert_port=None, topic_root="edgefleet/v1", broker_pid=None, broker_dir=None,
        ),
        embedded_serving(
            host="0.0.0.0", url="mqtt://127.0.0.1:1883", secured=True, tls_port=8883,
            cert_port=8884, topic_root="site/edgefleet/v1", broker_pid=77,
            broker_dir=Path("/tmp/b"),
        ),
        external_serving("mqtt://broker.lan:1883", "edgefleet/v1"),
    ],
    ids=["plain", "secured", "external"],
)  # fmt: skip
def test_every_record_up_writes_loads_back(tmp_path: Path, serving: Serving) -> None:
    write_serving(tmp_path, serving)
    assert set(json.loads((tmp_path / SERVING_FILE).read_text())) == set(Serving.model_fields)
    assert read_serving(tmp_path) == serving


def test_no_record_is_none(tmp_path: Path) -> None:
    assert read_serving(tmp_path) is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pid": "4242"}, "'pid' must be an integer, got '4242'"),
        ({"pid": 0}, "'pid' must be >= 1, got 0"),
        ({"auth": "token"}, "'auth' must be one of none, password; got 'token'"),
        ({"embedded": "yes"}, "'embedded' must be true or false, got 'yes'"),
        ({"device_broker": ""}, "'device_broker' must not be empty"),
        ({"port": 1883}, "unknown key 'port'"),
        ({"device_broker": None}, "'device_broker' must be a non-empty string, got None"),
    ],
)
def test_a_bad_record_is_one_line_naming_file_key_and_problem(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    record = {**json.loads(WRITTEN_BEFORE), **change}
    (tmp_path / SERVING_FILE).write_text(json.dumps(record))
    with pytest.raises(ServingFileError) as caught:
        read_serving(tmp_path)
    text = str(caught.value)
    assert text.startswith(f"{tmp_path / SERVING_FILE}: {message}"), text
    assert text.endswith("run `edgefleet up` again to rewrite it") and "\n" not in text


def test_register_names_a_bad_record_instead_of_guessing_a_broker(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / SERVING_FILE).write_text(json.dumps({**json.loads(WRITTEN_BEFORE), "auth": 1}))
    result = CliRunner().invoke(
        app, ["devices", "register", "pi-1", "--profile", "rpi4", "--home", str(home)]
    )
    assert result.exit_code == 2, result.output
    assert f"error: {home / SERVING_FILE}: 'auth' must be one of none, password; got 1" in (
        result.output
    )
    assert not (home / "bundles" / "pi-1").exists()

"""Shared pytest fixtures: MQTT brokers, unique topic roots and MQTT probe clients."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.broker import BrokerHandle, find_mosquitto, start_mosquitto
from controller.broker_amqtt import start_amqtt
from tests.mqtt_helpers import MqttProbe

MqttProbeFactory = Callable[..., MqttProbe]


def running_in_ci() -> bool:
    """Whether the CI environment variable is set to something true-ish."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# =========================================================================== MQTT brokers


@pytest.fixture(scope="session")
def mosquitto_binary() -> str:
    """Path of the mosquitto binary; skips without it locally, fails under CI=true."""
    binary = find_mosquitto()
    if binary is None:
        reason = "mosquitto binary not found on PATH or in /usr/sbin (apt-get install mosquitto)"
        if running_in_ci():
            pytest.fail(f"{reason}; CI must run the broker tests", pytrace=False)
        pytest.skip(reason)
    return binary


@pytest.fixture
def mosquitto_broker(mosquitto_binary: str, tmp_path: Path) -> Iterator[BrokerHandle]:
    """A fresh mosquitto on a free loopback port, config and log in tmp_path, stopped by PID."""
    handle = start_mosquitto(tmp_path / "mosquitto", binary=mosquitto_binary)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def amqtt_broker() -> Iterator[BrokerHandle]:
    """The embedded amqtt broker (in-process thread) on a free loopback port."""
    handle = start_amqtt()
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest) -> BrokerHandle:
    """Each test using it runs once against mosquitto and once against amqtt."""
    handle: BrokerHandle = request.getfixturevalue(f"{request.param}_broker")
    return handle


# =========================================================================== MQTT clients


@pytest.fixture
def topic_root() -> str:
    """A topic root no other test uses, so tests never see each other's messages."""
    return f"test/{uuid.uuid4().hex[:12]}/edgefleet/v1"


@pytest.fixture
def mqtt_probe() -> Iterator[MqttProbeFactory]:
    """Factory: ``mqtt_probe(handle, **kwargs)`` -> a connected MqttProbe, closed at teardown."""
    probes: list[MqttProbe] = []

    def connect(handle: BrokerHandle, **kwargs: Any) -> MqttProbe:
        """Create, remember (for teardown) and connect one probe."""
        probe = MqttProbe(handle, **kwargs)
        probes.append(probe)
        return probe.connect()

    yield connect
    for probe in probes:
        probe.close()

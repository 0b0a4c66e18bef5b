"""The e2e broker variants a module picks by importing one: each is named `e2e_broker`, so the
conftest's `controller` and `start_agent` run on it instead of on both broker kinds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.brokers.base import BrokerHandle
from controller.brokers.mosquitto import start_mosquitto


@pytest.fixture(name="e2e_broker")
def mosquitto_only(
    request: pytest.FixtureRequest, mosquitto_binary: str, tmp_path: Path
) -> Iterator[BrokerHandle]:
    """One mosquitto per test (no amqtt run); with an indirect param True, one with persistence.

    Without persistence it is the `mosquitto_broker` fixture itself, so a test that asks for both
    gets one broker. The test may kill it by PID and start a new one on its `data_dir` and
    `port` (restarts keep its config, and with persistence its retained state).
    """
    if not getattr(request, "param", False):
        yield request.getfixturevalue("mosquitto_broker")
        return
    handle = start_mosquitto(
        tmp_path / "mosquitto-persistent", binary=mosquitto_binary, persistence=True
    )
    try:
        yield handle
    finally:
        handle.stop()

"""Shared pytest fixtures: MQTT brokers, unique topic roots, MQTT probe clients, the model
cache and PostgreSQL schemas."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.brokers.amqtt_broker import start_amqtt
from controller.brokers.base import BrokerHandle
from controller.brokers.mosquitto import find_mosquitto, start_mosquitto
from controller.storage.db import with_search_path
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


# =========================================================================== model cache


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The shared test cache (trained model, conversions, built models), reused across runs."""
    default = Path(tempfile.gettempdir()) / "edgefleet-test-cache"
    path = Path(os.environ.get("EDGEFLEET_TEST_CACHE") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


# =========================================================================== PostgreSQL

# The server `make test` sets up (scripts/ensure-postgres.sh); each test gets its own schema.
TEST_PG_URL = os.environ.get(
    "EDGEFLEET_TEST_PG", "postgresql://edgefleet:edgefleet@127.0.0.1:5432/edgefleet_test"
)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The test server's URL; skips when it does not answer locally, fails under CI=true."""
    import psycopg

    try:
        psycopg.connect(TEST_PG_URL, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL for tests is unreachable ({exc}); run scripts/ensure-postgres.sh"
        if running_in_ci():
            pytest.fail(f"{reason}; CI must run the PostgreSQL tests", pytrace=False)
        pytest.skip(reason)
    return TEST_PG_URL


@contextlib.contextmanager
def fresh_schema(server: str, prefix: str) -> Iterator[str]:
    """A database URL whose tables live in a new schema of their own, dropped afterwards."""
    import psycopg

    schema = f"{prefix}_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(server, schema)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def pg_url(postgres_server: str) -> Iterator[str]:
    """A database URL on a fresh schema of the test's own."""
    with fresh_schema(postgres_server, "t") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs once on an SQLite file and once on a PostgreSQL schema."""
    if request.param == "sqlite":
        return str(tmp_path / "edgefleet.db")
    url: str = request.getfixturevalue("pg_url")
    return url


def all_on_postgres() -> bool:
    """Whether this run puts every fleet on PostgreSQL (EDGEFLEET_TEST_ALL_PG=1, `make test-pg`)."""
    return os.environ.get("EDGEFLEET_TEST_ALL_PG", "") in ("1", "true")


@pytest.fixture(scope="module")
def module_db(postgres_server_if_all_pg: str | None) -> Iterator[str | None]:
    """For fleets a module-scoped fixture opens: None (HOME/edgefleet.db), or under
    `make test-pg` a schema of the module's own (the per-test schema is dropped between tests)."""
    if postgres_server_if_all_pg is None:
        yield None
        return
    with fresh_schema(postgres_server_if_all_pg, "m") as url:
        yield url


@pytest.fixture(scope="session")
def postgres_server_if_all_pg(request: pytest.FixtureRequest) -> str | None:
    """The PostgreSQL test server under `make test-pg`, else None (no server needed)."""
    if not all_on_postgres():
        return None
    url: str = request.getfixturevalue("postgres_server")
    return url


@pytest.fixture(autouse=True)
def _all_on_postgres(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """EDGEFLEET_TEST_ALL_PG=1 (`make test-pg`): every Fleet a test opens, in this process or a
    child, uses a fresh PostgreSQL schema instead of HOME/edgefleet.db."""
    if not all_on_postgres():
        return
    monkeypatch.setenv("EDGEFLEET_DB", request.getfixturevalue("pg_url"))

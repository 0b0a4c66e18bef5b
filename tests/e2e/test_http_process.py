"""`edgefleet up --http` as a real process: the API answers with the token it wrote, and sees
the devices that said hello over MQTT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")  # controller-only (not in the slim device env)
pytest.importorskip("httpx")  # controller-only (not in the slim device env)
import httpx

from controller.brokers.base import BrokerHandle, free_port
from controller.http.auth import TOKEN_FILE
from tests.e2e.brokers import mosquitto_only  # noqa: F401  (is e2e_broker)
from tests.e2e.conftest import AgentProcess, wait_until

pytestmark = [pytest.mark.e2e]
# e2e_broker is mosquitto only: the HTTP side does not depend on the broker kind.

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


@pytest.fixture
def up_with_http(
    e2e_broker: BrokerHandle, topic_root: str, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path, int, Path]]:
    """`edgefleet up --broker URL --http 127.0.0.1:PORT`; killed by PID at teardown."""
    home, log, port = tmp_path / "ctl", tmp_path / "ctl.log", free_port()
    args = [EDGEFLEET, "up", "--broker", e2e_broker.url, "--topic-root", topic_root]
    args += ["--http", f"127.0.0.1:{port}", "--home", str(home)]
    with log.open("ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    yield proc, home, port, log
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(15)


def test_up_serves_the_api_with_its_local_token(
    up_with_http: tuple[subprocess.Popen[bytes], Path, int, Path],
    start_agent: Callable[..., AgentProcess],
) -> None:
    proc, home, port, log = up_with_http
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: f"dashboard: {base}/ (token in " in log.read_text(), 30, "dashboard line")
    token = (home / TOKEN_FILE).read_text().strip()
    assert token not in log.read_text(), "the admin token must not go into a log file"
    headers = {"Authorization": f"Bearer {token}"}

    def healthy() -> dict[str, Any] | None:
        response = httpx.get(f"{base}/healthz", timeout=10)
        body: dict[str, Any] = response.json()
        return body if response.status_code == 200 and body["controller"] else None

    # `up` passes its loop's health to the HTTP server: broker, database, leader, reconcile.
    health = wait_until(healthy, 30, "/healthz reporting the controller loop")
    assert health["ok"] and health["database"]["ok"] and health["controller"]["leader"]
    assert health["controller"]["broker"]["connected"]
    status = subprocess.run(
        [EDGEFLEET, "status", "--home", str(home)], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    assert f"controller  {base}: ok" in status.stdout and "leader      yes" in status.stdout
    assert httpx.get(f"{base}/api/v1/devices").status_code == 401
    start_agent("http-dev")

    def online() -> bool:
        devices = httpx.get(f"{base}/api/v1/devices", headers=headers, timeout=10).json()["items"]
        return any(d["id"] == "http-dev" and d["online"] for d in devices)

    wait_until(online, 30, "the agent's hello, read through the HTTP API")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(20) == 0, log.read_text()[-2000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/healthz")

"""/healthz and `edgefleet status` on a real controller loop, broker and HTTP server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")  # controller-only (not in the slim device env)
import httpx
from typer.testing import CliRunner

from controller.brokers.base import BrokerHandle, free_port
from controller.cli.main import app as cli_app
from controller.http.server import start_http
from controller.runtime.service import ControllerService
from tests.polling import wait_until


@contextmanager
def up_with_http(home: Path, broker_url: str) -> Iterator[str]:
    """What `edgefleet up --http` runs: the HTTP server, the service, the status callback."""
    server, _ = start_http(home, "127.0.0.1", 0)
    service = ControllerService(home, broker_url, client_id="ctl-health")
    service.start()
    server.set_status(service.health)
    try:
        yield server.url
    finally:
        service.stop()
        server.stop()


def test_healthz_and_status_report_broker_database_leader_and_reconcile(
    mosquitto_broker: BrokerHandle, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    with up_with_http(home, mosquitto_broker.url) as url:

        def reconciled() -> bool:
            body = httpx.get(f"{url}/healthz").json()
            return body["controller"]["last_reconcile_age_s"] is not None

        wait_until(reconciled, 20, "a reconcile pass reported in /healthz")
        response = httpx.get(f"{url}/healthz")
        assert response.status_code == 200
        body = response.json()
        assert body["ok"] is True and body["database"]["ok"] is True
        loop = body["controller"]
        assert loop["running"] and loop["leader"] and loop["replica"] == "controller"
        assert loop["broker"]["connected"] and loop["broker"]["connected_for_s"] >= 0
        assert 0 <= loop["last_reconcile_age_s"] < 10

        # `edgefleet status` finds the URL `up --http` recorded and prints the same facts.
        result = CliRunner().invoke(cli_app, ["status", "--home", str(home)])
        assert result.exit_code == 0, result.output
        lines = dict(tuple(line.split(None, 1)) for line in result.stdout.splitlines())
        assert lines["controller"] == f"{url}: ok"
        assert lines["broker"].startswith("connected for ")
        assert lines["leader"] == "yes (replica controller)"
        assert lines["reconcile"].endswith(" ago")
        as_json = CliRunner().invoke(cli_app, ["status", "--home", str(home), "--json"])
        assert json.loads(as_json.stdout)["controller"]["leader"] is True


def test_an_unreachable_broker_is_503_and_status_exits_1(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with up_with_http(home, f"mqtt://127.0.0.1:{free_port()}") as url:
        response = httpx.get(f"{url}/healthz")
        assert response.status_code == 503
        body = response.json()
        assert body["ok"] is False and body["database"]["ok"] is True
        assert body["controller"]["broker"] == {"connected": False, "connected_for_s": None}
        result = CliRunner().invoke(cli_app, ["status", "--url", url])
        assert result.exit_code == 1
        assert "DISCONNECTED" in result.stdout and f"{url}: NOT OK" in result.stdout


def test_status_without_an_address_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["status", "--home", str(tmp_path)])
    assert result.exit_code == 2
    assert "no controller HTTP address recorded" in result.output
    bad = CliRunner().invoke(cli_app, ["status", "--url", "ftp://x"])
    assert bad.exit_code == 2 and "expected http://HOST:PORT" in bad.output

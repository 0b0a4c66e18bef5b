"""GET /api/v1/devices: server-side search, filters and paging, and 400s for bad parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi")  # controller-only (not in the slim device env)
pytest.importorskip("httpx")  # controller-only (not in the slim device env)

from controller.fleet.registry import Fleet
from tests.fleet_rows import insert_devices
from tests.integration.http_api import Api, api_server  # noqa: F401  (is api)


def _fill(home: Path, count: int) -> list[str]:
    """Insert `count` simulated devices into the served fleet."""
    fleet = Fleet(home)
    try:
        return insert_devices(fleet, count)
    finally:
        fleet.close()


def test_paging_returns_pages_by_id_with_the_total(api: Api) -> None:
    ids = _fill(api.home, 250)
    first = api.read.get("/api/v1/devices", params={"limit": 100}).json()
    assert first["total"] == 250 and first["limit"] == 100 and first["offset"] == 0
    assert [d["id"] for d in first["items"]] == ids[:100]
    last = api.read.get("/api/v1/devices", params={"limit": 100, "offset": 200}).json()
    assert [d["id"] for d in last["items"]] == ids[200:]
    beyond = api.read.get("/api/v1/devices", params={"offset": 1000}).json()
    assert beyond["items"] == [] and beyond["total"] == 250
    summary = first["summary"]
    assert summary["devices"] == 250 and summary["online"] == 250 - 63  # every fourth offline
    assert summary["by_profile"]["rpi4"] == {"total": 84, "online": 84 - 21}
    assert sum(summary["by_state"].values()) == 250


def test_search_and_filters_combine(api: Api) -> None:
    _fill(api.home, 300)
    found = api.read.get("/api/v1/devices", params={"q": "SIM-0012"}).json()
    assert [d["id"] for d in found["items"]] == [f"sim-0012{i}" for i in range(10)]
    assert found["total"] == 10
    # LIKE wildcards in the search are literal characters.
    assert api.read.get("/api/v1/devices", params={"q": "%"}).json()["total"] == 0
    assert api.read.get("/api/v1/devices", params={"q": "sim_0"}).json()["total"] == 0
    rpi = api.read.get("/api/v1/devices", params={"profile": "rpi4", "online": "true"}).json()
    assert rpi["total"] == 75 and all(d["profile"] == "rpi4" and d["online"] for d in rpi["items"])
    offline = api.read.get("/api/v1/devices", params={"online": "false", "limit": 1000}).json()
    assert offline["total"] == 75 and not any(d["online"] for d in offline["items"])
    failed = api.read.get("/api/v1/devices", params={"state": "failed", "q": "sim-002"}).json()
    assert {d["state"] for d in failed["items"]} == {"failed"}
    assert failed["total"] == 34  # 200, 203, ..., 299
    # Filters narrow the page but not the fleet-wide summary.
    assert failed["summary"]["devices"] == 300


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": "0"}, "limit: must be 1..1000, got 0"),
        ({"limit": "5000"}, "limit: must be 1..1000, got 5000"),
        ({"limit": "ten"}, "limit: expected an integer, got 'ten'"),
        ({"offset": "-1"}, "offset: must be >= 0, got -1"),
        ({"online": "maybe"}, "online: expected true or false, got 'maybe'"),
        ({"q": "x" * 65}, "q: at most 64 characters"),
        ({"page": "2"}, "unknown query parameter 'page'"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(
    api: Api,
    params: dict[str, str],
    message: str,
) -> None:
    response = api.read.get("/api/v1/devices", params=params)
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(message)

"""HTTP API for the dashboard's charts and badges: a rollout's `outcome` and the fleet series."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")  # controller-only (not in the slim device env)
pytest.importorskip("httpx")
import httpx

from agent.protocol import Event, Telemetry
from controller.fleet.registry import Fleet
from controller.fleet.rollout.policy import Policy, parse_threshold, parse_waves
from controller.http.auth import ensure_local_token
from controller.http.server import HttpServer
from tests.integration.test_http_api import MODEL, activate
from tests.unit.controller.fleet.telemetry.test_store import record

DEVICES = ["h-0", "h-1", "h-2", "h-3"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[httpx.Client, str]]:
    """A fleet with a completed rollout where 1 of 4 devices failed, 10 minutes of telemetry
    from the 3 others, and an API client on it; the rollout id."""
    home = tmp_path / "home"
    fleet = Fleet(home)
    try:
        fleet.add_model(MODEL, name="tiny", version="1")
        for device in DEVICES:
            fleet.register_device(device, "rpi4")
        policy = Policy(waves=parse_waves("100"), max_failures=parse_threshold("5"), retries=0)
        rollout: str = fleet.start_rollout("tiny:1", "all", policy)["id"]
        for device in DEVICES[:3]:
            activate(fleet, rollout, device)
        row = next(d for d in fleet.deployment(rollout)["devices"] if d["device_id"] == "h-3")
        fleet.record_event(
            Event(
                device_id="h-3", event_id=uuid.uuid4().hex, kind="error", message="boom",
                stage="self-testing", deployment_id=rollout, generation=row["generation"],
            )
        )  # fmt: skip
        fleet.rollouts.tick()
        sha = row["artifact_sha256"]
        now = time.time()
        fleet.telemetry.ingest_many(
            [
                Telemetry(d, tuple(record(s, ts=now - 610 + 10 * s, sha=sha) for s in range(1, 60)))
                for d in DEVICES[:3]
            ],
            now,
        )
    finally:
        fleet.close()
    server = HttpServer(home, "127.0.0.1", 0).start()
    token = ensure_local_token(home)
    client = httpx.Client(
        base_url=f"{server.url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    try:
        yield client, rollout
    finally:
        client.close()
        server.stop()


def test_a_partial_rollout_carries_its_outcome_in_show_and_list(
    served: tuple[httpx.Client, str],
) -> None:
    client, rollout = served
    shown = client.get(f"/rollouts/{rollout}").json()
    assert shown["state"] == "completed"
    assert shown["outcome"] == {
        "result": "partial",
        "label": "completed with 1 failed",
        "devices": 4,
        "done": 4,
        "updated": 3,
        "failed": 1,
        "skipped": 0,
        "rolled_back": 0,
    }
    (listed,) = client.get("/rollouts").json()
    assert listed["outcome"] == shown["outcome"]


def test_series_per_profile_and_model_in_bounded_buckets(served: tuple[httpx.Client, str]) -> None:
    client, _ = served
    got = client.get("/report/series", params={"since": "1h"}).json()
    assert got["bucket_s"] == 60 and got["by"] == "profile_model"
    (line,) = got["series"]
    assert (line["key"], line["profile"], line["model"]) == ("rpi4 tiny:1", "rpi4", "tiny:1")
    report = client.get("/report", params={"since": "1h"}).json()["rows"][0]
    assert line["served"] == report["inferences"] == 3 * 59 * 3
    assert 9 <= len(line["points"]) <= 61
    assert all(p["p95_ms"] >= p["p50_ms"] > 0 and p["power_w"] > 0 for p in line["points"])
    assert max(p["devices"] for p in line["points"]) == 3
    week = client.get("/report/series", params={"since": "7d", "points": "10"}).json()
    # The range drawn starts at the oldest row of the window (600 s before the data was stored,
    # so it touches 11 minute buckets whatever the clock reads): 2 min buckets.
    assert week["bucket_s"] == 120 and 5 <= len(week["series"][0]["points"]) <= 10
    per_model = client.get("/report/series", params={"by": "model", "since": "all"}).json()
    assert [s["key"] for s in per_model["series"]] == ["tiny:1"]


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"by": "device"}, "by must be one of profile, model, profile_model, got 'device'"),
        ({"points": "5"}, "points must be 10..1000, got 5"),
        ({"points": "many"}, "points: expected an integer, got 'many'"),
        ({"since": "yesterday"}, "--since 'yesterday': expected a duration"),
        ({"model": "nope:1"}, "unknown model"),
        ({"bucket": "60"}, "unknown query parameter 'bucket'"),
    ],
)
def test_series_refuses_bad_parameters_with_400(
    served: tuple[httpx.Client, str], params: dict[str, str], detail: str
) -> None:
    client, _ = served
    answer = client.get("/report/series", params=params)
    assert answer.status_code == 400 and detail in answer.json()["detail"]


@pytest.mark.parametrize("path", ["/report", "/report/series", "/devices"])
def test_a_nul_in_a_query_parameter_is_a_400_naming_it(
    served: tuple[httpx.Client, str], path: str
) -> None:
    client, _ = served
    got = client.get(path, params={"model": "tiny\x00:1"})
    assert got.status_code == 400
    assert got.json() == {"detail": "query parameter 'model': contains a NUL character"}
    assert got.headers["X-Content-Type-Options"] == "nosniff"

"""HTTP API on a real uvicorn server over a real fleet home: auth, devices, models, rollouts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")  # controller-only (not in the slim device env)
pytest.importorskip("httpx")  # controller-only (not in the slim device env)
from typer.testing import CliRunner

from controller.cli.main import app as cli_app
from controller.errors import FleetError
from controller.fleet.registry import Fleet
from controller.http.auth import TOKEN_FILE, create_token, ensure_local_token
from tests.fleet_rows import activate
from tests.integration.http_api import Api, api_server, bearer  # noqa: F401  (is api)

DATA = Path(__file__).resolve().parent.parent / "data"
MODEL = DATA / "tiny_int8.tflite"


def cli(home: Path, *args: str, exit_code: int = 0) -> Any:
    """Run an `edgefleet ... --json` command in-process on `home`; its parsed output."""
    result = CliRunner().invoke(cli_app, [*args, "--home", str(home), "--json"])
    assert result.exit_code == exit_code, result.output
    return json.loads(result.stdout)


def test_every_api_route_needs_a_known_token_and_writes_need_admin(api: Api) -> None:
    health = api.anonymous.get("/healthz").json()
    # A standalone HTTP server: the database answers, no controller loop in this process.
    assert health["ok"] is True and health["database"]["ok"] is True
    assert health["controller"] is None
    assert api.anonymous.get("/api/v1/openapi.json").status_code == 200
    missing = api.anonymous.get("/api/v1/devices")
    assert missing.status_code == 401 and missing.json() == {"detail": "missing bearer token"}
    assert missing.headers["www-authenticate"] == "Bearer"
    bad = api.anonymous.get("/api/v1/devices", headers=bearer("not-a-token"))
    assert bad.status_code == 401 and bad.json() == {"detail": "unknown token"}
    assert (
        api.anonymous.get("/api/v1/models", headers={"Authorization": "Basic x"}).status_code == 401
    )
    assert api.read.get("/api/v1/devices").json()["items"] == []
    assert api.admin.get("/api/v1/devices").json()["total"] == 0
    denied = api.read.post("/api/v1/devices", json={"id": "cam-1", "profile": "rpi4"})
    assert denied.status_code == 403 and "read-only" in denied.json()["detail"]
    assert api.read.delete("/api/v1/devices/cam-1").status_code == 403
    assert api.read.post("/api/v1/rollouts/ro-x/pause").status_code == 403
    # A revoked token is refused from the next request on.
    CliRunner().invoke(cli_app, ["tokens", "revoke", "viewer", "--home", str(api.home)])
    assert api.read.get("/api/v1/devices").status_code == 401
    made = cli(api.home, "tokens", "create", "ci", "--role", "admin")
    assert api.anonymous.get("/api/v1/models", headers=bearer(made["token"])).status_code == 200
    listed = cli(api.home, "tokens", "list")
    assert [(t["name"], t["role"]) for t in listed] == [("ci", "admin"), ("local", "admin")]
    assert "token" not in listed[0] and "sha256" not in listed[0]
    listed = [t for t in listed if t["name"] == "local"]
    assert listed[0]["last_used"] is not None


def test_local_token_file_is_private_and_stable_across_restarts(tmp_path: Path) -> None:
    home = tmp_path / "home"
    token = ensure_local_token(home)
    path = home / TOKEN_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ensure_local_token(home) == token, "a second `up` keeps the same token"
    path.unlink()
    fresh = ensure_local_token(home)
    assert fresh != token and path.read_text().strip() == fresh
    fleet = Fleet(home)
    rows = fleet.db.query("SELECT name, role, sha256 FROM api_tokens")
    fleet.close()
    assert [(r["name"], r["role"]) for r in rows] == [("local", "admin")]
    assert token not in json.dumps(rows) and fresh not in json.dumps(rows), "only hashes stored"
    os.chmod(path, 0o644)  # widened by someone: the next `up` narrows it again
    assert ensure_local_token(home) == fresh
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    fleet = Fleet(home)
    try:
        with pytest.raises(FleetError, match="reserved"):
            create_token(fleet.db, "local", "read")
    finally:
        fleet.close()


def test_devices_models_and_a_rollout_through_the_api(api: Api) -> None:
    created = api.admin.post("/api/v1/devices", json={"id": "cam-1", "profile": "rpi4"})
    assert created.status_code == 201 and created.json()["profile"] == "rpi4"
    fleet = Fleet(api.home)
    fleet.register_device("cam-2", "rpi4")
    fleet.add_model(MODEL, name="tiny", version="1")
    # The CLI and the API read the same state.
    assert [d["id"] for d in api.read.get("/api/v1/devices").json()["items"]] == ["cam-1", "cam-2"]
    assert [d["id"] for d in cli(api.home, "devices", "list")] == ["cam-1", "cam-2"]
    device = api.read.get("/api/v1/devices/cam-2").json()
    assert device["id"] == "cam-2" and device["events"] == [] and device["benchmarks"] == []
    missing = api.read.get("/api/v1/devices/nope")
    assert missing.status_code == 404 and "unknown device 'nope'" in missing.json()["detail"]
    assert api.admin.delete("/api/v1/devices/nope").status_code == 404
    bad_profile = api.admin.post("/api/v1/devices", json={"id": "cam-3", "profile": "toaster"})
    assert bad_profile.status_code == 400 and "toaster" in bad_profile.json()["detail"]
    assert (
        api.admin.post("/api/v1/devices", json={"id": "../x", "profile": "rpi4"}).status_code == 400
    )

    profiles = api.read.get("/api/v1/profiles").json()
    assert "rpi4" in {p["id"] for p in profiles}
    assert [(m["name"], m["version"]) for m in api.read.get("/api/v1/models").json()] == [
        ("tiny", "1")
    ]
    model = api.read.get("/api/v1/models/tiny:1").json()
    assert model["artifacts"][0]["profile"] is None and model["candidates"] == []
    assert api.read.get("/api/v1/models/tiny:9").status_code == 404
    explained = api.read.get("/api/v1/models/tiny/explain").json()
    assert explained["model"] == "tiny:1" and explained["rollout"] is None
    assert api.read.get("/api/v1/models/nope/explain").status_code == 404

    bad_waves = api.admin.post("/api/v1/rollouts", json={"model": "tiny:1", "waves": "50,10"})
    assert bad_waves.status_code == 400 and "--waves" in bad_waves.json()["detail"]
    bad_model = api.admin.post("/api/v1/rollouts", json={"model": "other:1"})
    assert bad_model.status_code == 400 and "unknown model" in bad_model.json()["detail"]
    started = api.admin.post(
        "/api/v1/rollouts",
        json={"model": "tiny:1", "to": "device:cam-1", "waves": "100", "gates": ["p95_ms<=50"]},
    )
    assert started.status_code == 201, started.text
    rollout = started.json()
    rid = rollout["id"]
    assert rollout["state"] == "running" and rollout["policy"]["gates"] == ["p95_ms<=50"]
    assert [d["device_id"] for d in rollout["devices"]] == ["cam-1"]

    assert api.admin.post(f"/api/v1/rollouts/{rid}/pause").json()["state"] == "paused"
    # docs/cli.md: `rollout status` of a paused rollout exits 4.
    assert cli(api.home, "rollout", "status", rid, exit_code=4)["state"] == "paused"
    again = api.admin.post(f"/api/v1/rollouts/{rid}/pause")
    assert again.status_code == 409 and "is paused, not running" in again.json()["detail"]
    # The CLI resumes it; the API sees it running.
    cli(api.home, "rollout", "resume", rid)
    assert api.read.get(f"/api/v1/rollouts/{rid}").json()["state"] == "running"
    # The agent side completes it; pausing a completed rollout is a conflict.
    activate(fleet, rid, "cam-1")
    fleet.rollouts.tick()
    assert api.read.get(f"/api/v1/rollouts/{rid}").json()["state"] == "completed"
    done = api.admin.post(f"/api/v1/rollouts/{rid}/pause")
    assert done.status_code == 409 and "is completed" in done.json()["detail"]
    assert api.admin.post(f"/api/v1/rollouts/{rid}/abort").status_code == 409
    assert api.admin.post("/api/v1/rollouts/ro-nope/abort").status_code == 404
    assert api.admin.post(f"/api/v1/rollouts/{rid}/explode").status_code == 422
    assert api.read.get("/api/v1/rollouts/ro-nope").status_code == 404
    back = api.admin.post(f"/api/v1/rollouts/{rid}/rollback")
    assert back.status_code == 200 and back.json()["state"] == "rolled_back"
    listed = api.read.get("/api/v1/rollouts").json()
    assert [(r["id"], r["state"]) for r in listed] == [(rid, "rolled_back")]

    second = api.admin.post("/api/v1/rollouts", json={"model": "tiny", "to": "cam-*"}).json()
    aborted = api.admin.post(f"/api/v1/rollouts/{second['id']}/abort").json()
    assert aborted["state"] == "aborted"
    assert [r["id"] for r in api.read.get("/api/v1/rollouts").json()] == [second["id"], rid]

    # Telemetry and the report read what the service stored (the benchmark of cam-1 here).
    telemetry = api.read.get("/api/v1/devices/cam-1/telemetry", params={"since": "1h"}).json()
    assert telemetry["device_id"] == "cam-1" and telemetry["records"] == []
    assert api.read.get("/api/v1/devices/nope/telemetry").status_code == 404
    bad_since = api.read.get("/api/v1/devices/cam-1/telemetry", params={"since": "soon"})
    assert bad_since.status_code == 400 and "--since" in bad_since.json()["detail"]
    assert api.read.get("/api/v1/report", params={"model": "tiny"}).json() == {"rows": []}
    twice = api.read.get("/api/v1/report", params=[("by", "device"), ("by", "profile")])
    assert twice.status_code == 400 and "'by' given more than once" in twice.json()["detail"]
    typo = api.read.get("/api/v1/report", params={"modle": "tiny"})
    assert typo.status_code == 400 and "unknown query parameter 'modle'" in typo.json()["detail"]
    unknown = api.read.get("/api/v1/report", params={"model": "nope:1"})
    assert unknown.status_code == 400 and "unknown model" in unknown.json()["detail"]
    assert api.read.get("/api/v1/devices/cam-1").json()["benchmarks"][0]["p95_ms"] == 5.0

    assert api.admin.delete("/api/v1/devices/cam-2").status_code == 204
    assert cli(api.home, "devices", "list")[0]["id"] == "cam-1"
    fleet.close()


def test_event_stream_reports_a_change(api: Api) -> None:
    with api.read.stream("GET", "/api/v1/events/stream") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = (line for line in stream.iter_lines() if line)
        assert next(lines) == ": connected"
        created = api.admin.post("/api/v1/devices", json={"id": "cam-9", "profile": "rpi4"})
        assert created.status_code == 201
        assert next(lines) == "event: change", "a registration is a change"
        assert next(lines).startswith("data: [1,")
    assert api.anonymous.get("/api/v1/events/stream").status_code == 401

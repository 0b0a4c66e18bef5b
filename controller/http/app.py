"""The JSON API under /api/v1 (docs/http-api.md): thin endpoints over the Fleet service layer.

Each endpoint parses, calls what the CLI calls, and serializes. FleetError is 400, an unknown
id in the path 404, a state change the rollout's state forbids 409, a missing or unknown token
401 and a read token on a write 403; every error body is `{"detail": "..."}`.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime,
# and some of them (FleetDep) are local to create_app.
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

import firmware_profiles
from controller.errors import FleetError
from controller.fleet.candidates import explain, model_candidates
from controller.fleet.device_search import DEFAULT_PAGE, MAX_PAGE, DeviceQuery, search_devices
from controller.fleet.registry import Fleet
from controller.fleet.rollout.policy import Policy, PolicyError, policy_from_options
from controller.fleet.telemetry.queries import (
    check_telemetry_device,
    device_telemetry,
    fleet_report,
    fleet_series_query,
    parse_since,
    parse_window,
)
from controller.http.auth import authenticate
from controller.http.dashboard import STATIC_DIR
from controller.http.events import event_routes
from controller.http.health import health_report
from controller.http.params import query_bool, query_int
from controller.storage.db import database_target
from controller.storage.queries import metrics as fleet_queries

API_PREFIX = "/api/v1"
# A sanity bound on integer fields of a request (SQLite integers are 64-bit; no fleet needs more).
MAX_INT = 1_000_000
# Most telemetry records one request returns (the CLI's --limit has no cap; a browser needs one).
MAX_TELEMETRY_LIMIT = 10_000

_T = TypeVar("_T")


class Problem(BaseModel):
    """Every error body: what went wrong, as the CLI would print it."""

    detail: str


_DESCRIPTIONS = {
    400: "bad input: the service layer's message, an unknown or repeated query parameter, or "
    "a malformed HTTP request (refused by the server before the route)",
    401: "missing or unknown bearer token",
    403: "a read token on a write",
    404: "unknown id",
    409: "the rollout's state does not allow this action",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error codes, and the 400 and 401 every API route can answer
    (a strict query check and the bearer token run on every route)."""
    every = {400, 401, *codes}
    return {c: {"model": Problem, "description": _DESCRIPTIONS[c]} for c in sorted(every)}


class DeviceIn(BaseModel):
    """POST /devices: register a device with an explicit profile (no broker credentials)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="device id ([A-Za-z0-9._-]{1,64})", examples=["cam-01"])
    profile: str = Field(description="profile id (GET /profiles)", examples=["rpi4"])


class RolloutIn(BaseModel):
    """POST /rollouts: the options of `edgefleet rollout start`, with its defaults."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="NAME[:VERSION] (default: newest version)")
    to: str = Field("all", description="all | profile:P | device:ID | id glob; comma = union")
    waves: str = Field("10,50,100", description="cumulative waves: 10,50,100 or 1d,10d")
    max_failures: str = Field("5%", description="abort past this: 5% of executed, or a count")
    min_executed: int = Field(1, ge=1, le=MAX_INT)
    gates: list[str] = Field(default_factory=list, description="p95_ms<=X, p95_regression<=10%")
    device_timeout: str = Field("10m", description="per device and attempt: 90s, 10m")
    retries: int = Field(2, ge=0, le=MAX_INT)
    benchmark_runs: int = Field(50, ge=1, le=MAX_INT)
    candidates: int = Field(0, ge=0, le=MAX_INT, description="top K candidates on canaries")
    canaries: int = Field(1, ge=1, le=MAX_INT)
    objective: str = Field("latency", description="latency | energy | memory | accuracy")
    fallback: bool = False
    fallback_window: str = "60s"
    max_accuracy_drop: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)

    def policy(self) -> Policy:
        """The Policy, parsed by the same function as the CLI's options (PolicyError if bad)."""
        return policy_from_options(**self.model_dump(exclude={"model", "to"}))


class SafeJSONResponse(JSONResponse):
    """JSON with non-finite floats as null and anything else unusual as its str (like --json)."""

    def render(self, content: Any) -> bytes:
        """Encode `content` as strict JSON."""
        return json.dumps(
            _finite(content), default=str, allow_nan=False, separators=(",", ":")
        ).encode()


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class FleetPerThread:
    """One Fleet per worker thread: SQLite connections must stay in the thread that made them."""

    def __init__(self, home: Path, db: str | None = None) -> None:
        """Open fleets under `home` lazily, all on the database resolved now (--db, env, HOME)."""
        self.home = home
        self.db = database_target(home, db)
        self._local = threading.local()

    def __call__(self) -> Fleet:
        """This thread's Fleet."""
        fleet = getattr(self._local, "fleet", None)
        if fleet is None:
            fleet = self._local.fleet = Fleet(self.home, db=self.db)
        return fleet

    def proxy(self) -> Fleet:
        """A Fleet stand-in for dependency injection that resolves in the thread that uses it.

        FastAPI runs a sync dependency and its sync endpoint in different worker threads, so a
        Fleet made in the dependency would be used from another thread (sqlite3 refuses that
        under concurrent requests, as a browser makes them).
        """
        return cast(Fleet, _ThreadFleet(self))


class _ThreadFleet:
    """Every attribute is read from the calling thread's Fleet."""

    def __init__(self, fleets: FleetPerThread) -> None:
        """Resolve through `fleets`."""
        self._fleets = fleets

    def __getattr__(self, name: str) -> Any:
        """This thread's Fleet's attribute."""
        return getattr(self._fleets(), name)


def fleet_version(fleet: Fleet) -> list[Any]:
    """What changes when the fleet does: device, rollout and event counters and timestamps."""
    return fleet_queries.fleet_version(fleet.db.conn)


def _found(call: Callable[[], _T]) -> _T:
    """Run a lookup by path id; its FleetError (unknown id) becomes 404."""
    try:
        return call()
    except FleetError as exc:
        raise HTTPException(404, str(exc)) from None


def _query_names(dependant: Dependant) -> set[str]:
    """Query parameters an endpoint and its dependencies declare."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _strict_query(request: Request) -> None:
    """400 for a query parameter the route does not take (a typo would be silently ignored) or
    one given twice (`?by=a&by=b`: which one was meant is a guess)."""
    route = request.scope.get("route")
    known = _query_names(route.dependant) if isinstance(route, APIRoute) else set()
    seen: set[str] = set()
    for key, _ in request.query_params.multi_items():
        if key not in known:
            raise HTTPException(400, f"unknown query parameter {key!r}")
        if key in seen:
            raise HTTPException(400, f"query parameter {key!r} given more than once")
        seen.add(key)


def create_app(home: Path, db: str | None = None) -> FastAPI:
    """The API (and, mounted last, the dashboard) over the fleet in `home` (database `db`)."""
    fleets = FleetPerThread(home, db)
    # Set by HttpServer.stop(): open event streams end at once instead of being cancelled.
    stopping = threading.Event()
    bearer = HTTPBearer(auto_error=False, description="a token from `edgefleet tokens create`")

    def caller(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> dict[str, Any]:
        """The token's name and role; 401 without a known bearer token."""
        if credentials is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        found = authenticate(fleets().db, credentials.credentials)
        if found is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return found

    def admin(who: Annotated[dict[str, Any], Depends(caller)]) -> dict[str, Any]:
        """403 unless the token is an admin token."""
        if who["role"] != "admin":
            raise HTTPException(403, f"token {who['name']!r} is read-only; this needs admin")
        return who

    FleetDep = Annotated[Fleet, Depends(fleets.proxy)]
    Admin = [Depends(admin)]
    api = APIRouter(prefix=API_PREFIX, dependencies=[Depends(caller), Depends(_strict_query)])

    _device_routes(api, FleetDep, Admin)
    _model_routes(api, FleetDep, Admin)
    _rollout_routes(api, FleetDep, Admin)
    _report_routes(api, FleetDep, Admin)
    event_routes(api, fleets, stopping, _errors(), fleet_version)

    app = FastAPI(
        title="edgefleet",
        summary="Fleet, models and rollouts of an edgefleet controller (docs/http-api.md).",
        version="1",
        openapi_url=f"{API_PREFIX}/openapi.json",
        # No Swagger UI: it loads its script from a CDN into the dashboard's origin, where the
        # admin token lives in localStorage. /api/v1/docs renders the JSON with our own page.
        docs_url=None,
        redoc_url=None,
        default_response_class=SafeJSONResponse,
    )

    @app.exception_handler(FleetError)
    def fleet_error(_request: Request, exc: FleetError) -> JSONResponse:
        """Any service-layer input error not mapped by its endpoint: 400 with its message."""
        return SafeJSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        """Health without auth: database, and the controller loop of this process if any.

        503 when the database does not answer, or the controller loop stopped or has no broker
        connection; the body says which. No URLs, names of devices or credentials.
        """
        status = app.state.status
        report = health_report(fleets, status() if status is not None else None)
        return SafeJSONResponse(report, status_code=200 if report["ok"] else 503)

    @app.get(f"{API_PREFIX}/docs", include_in_schema=False)
    def api_docs() -> FileResponse:
        """The API reference page: our own renderer of openapi.json (no CDN script)."""
        return FileResponse(STATIC_DIR / "api-docs.html", media_type="text/html")

    @app.middleware("http")
    async def refuse_nul_in_query(request: Request, call_next: Any) -> Response:
        """A NUL in a query parameter is a 400 naming it: PostgreSQL text cannot hold one, and
        no name, version, profile or search term of ours contains one."""
        if request.url.path.startswith(API_PREFIX):
            for name, value in request.query_params.multi_items():
                if "\x00" in value or "\x00" in name:
                    detail = f"query parameter {name!r}: contains a NUL character"
                    return SafeJSONResponse({"detail": detail}, status_code=400)
        response: Response = await call_next(request)
        return response

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        """No framing of the dashboard (clickjacking) and no content-type sniffing."""
        response: Response = await call_next(request)
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'none'")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    app.include_router(api)
    app.state.fleets = fleets
    app.state.stopping = stopping
    # Set by HttpServer.set_status(): the controller loop's health() when it runs in-process.
    app.state.status = None
    _mount_dashboard(app)
    return app


def _mount_dashboard(app: FastAPI) -> None:
    """The static dashboard at "/", after the API routes so that /api always wins."""
    from controller.http.dashboard import mount_dashboard

    mount_dashboard(app)


def _device_routes(api: APIRouter, FleetDep: Any, Admin: list[Any]) -> None:
    """Devices: list, show, register, remove, their telemetry."""
    @api.get("/devices", responses=_errors(400))
    def list_devices(
        fleet: FleetDep,
        q: Annotated[str, Query(description="substring of the device id, any case")] = "",
        profile: Annotated[str | None, Query(description="profile id; (none) = no profile")] = None,
        state: Annotated[str | None, Query(description="device state, e.g. running")] = None,
        online: Annotated[str | None, Query(description="true | false")] = None,
        limit: Annotated[str, Query(description=f"page size, 1..{MAX_PAGE}")] = str(DEFAULT_PAGE),
        offset: Annotated[str, Query(description="rows to skip, >= 0")] = "0",
    ) -> dict[str, Any]:
        """One page of devices by id: `{items, total, limit, offset, summary}` (`devices list`).

        Numbers and booleans are parsed here so that a bad one is a 400 naming the parameter.
        """
        query = DeviceQuery(
            q=q,
            profile=profile,
            state=state,
            online=query_bool("online", online),
            limit=query_int("limit", limit),
            offset=query_int("offset", offset),
        )
        return search_devices(fleet.db, query)

    @api.get("/devices/{device_id}", responses=_errors(404))
    def show_device(device_id: str, fleet: FleetDep) -> dict[str, Any]:
        """One device: facts, profile match, latest benchmarks and events (`devices show`)."""
        return _found(lambda: fleet.device_detail(device_id))

    @api.post("/devices", status_code=201, dependencies=Admin, responses=_errors(400, 403))
    def register_device(body: DeviceIn, fleet: FleetDep) -> dict[str, Any]:
        """Register a device with an explicit profile (`devices register --auth none`)."""
        return fleet.register_device(body.id, body.profile)

    @api.delete(
        "/devices/{device_id}", status_code=204, dependencies=Admin, responses=_errors(403, 404)
    )
    def remove_device(device_id: str, fleet: FleetDep) -> Response:
        """Forget a device; its events and benchmarks are kept (`devices remove`)."""
        _found(lambda: fleet.remove_device(device_id))
        return Response(status_code=204)

    @api.get("/devices/{device_id}/telemetry", responses=_errors(400, 404))
    def device_telemetry_records(
        device_id: str,
        fleet: FleetDep,
        since: Annotated[str | None, Query(description="30m, 1h, 2d; ISO 8601; epoch")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_TELEMETRY_LIMIT)] = 50,
    ) -> dict[str, Any]:
        """Stored telemetry: raw records, then per-minute aggregates (`telemetry`)."""
        _found(lambda: check_telemetry_device(fleet, device_id))
        return device_telemetry(fleet, device_id, since=parse_since(since), limit=limit)


def _model_routes(api: APIRouter, FleetDep: Any, Admin: list[Any]) -> None:
    """Profiles and models: list, show, explain the selection."""
    @api.get("/profiles", responses=_errors())
    def list_profiles() -> list[dict[str, Any]]:
        """Device profiles (`profiles list --json`)."""
        return [p.to_dict() for p in firmware_profiles.load_all().values()]

    @api.get("/models", responses=_errors())
    def list_models(fleet: FleetDep) -> list[dict[str, Any]]:
        """Model versions with the profiles they have artifacts for (`models list`)."""
        return fleet.models()

    @api.get("/models/{ref}", responses=_errors(404))
    def show_model(ref: str, fleet: FleetDep) -> dict[str, Any]:
        """One version (NAME:VERSION, or NAME = newest) with artifacts and ranked candidates."""
        model = _found(lambda: fleet.model(ref))
        return {**model, "candidates": model_candidates(fleet, model["id"])}

    @api.get("/models/{ref}/explain", responses=_errors(400, 404))
    def explain_model(
        ref: str,
        fleet: FleetDep,
        rollout: Annotated[str | None, Query(description="a rollout that measured it")] = None,
    ) -> dict[str, Any]:
        """Candidates with host and device numbers and why each won or lost (`models explain`)."""
        _found(lambda: fleet.model(ref))
        return explain(fleet, ref, rollout)


def _rollout_routes(api: APIRouter, FleetDep: Any, Admin: list[Any]) -> None:
    """Rollouts: list, start, show, pause/resume/abort/rollback."""
    @api.get("/rollouts", responses=_errors())
    def list_rollouts(fleet: FleetDep) -> list[dict[str, Any]]:
        """Rollouts and deployments, newest first, with device counts (`rollout status`)."""
        return fleet.rollouts.list()

    @api.post("/rollouts", status_code=201, dependencies=Admin, responses=_errors(400, 403))
    def start_rollout(body: RolloutIn, fleet: FleetDep) -> dict[str, Any]:
        """Start a staged rollout; a running `edgefleet up` drives it (`rollout start`)."""
        return fleet.start_rollout(body.model, body.to, body.policy())

    @api.get("/rollouts/{rollout_id}", responses=_errors(404))
    def show_rollout(rollout_id: str, fleet: FleetDep) -> dict[str, Any]:
        """One rollout: policy, waves, devices, trials and decisions (`rollout status ID`)."""
        return _found(lambda: fleet.deployment(rollout_id))

    @api.post(
        "/rollouts/{rollout_id}/{action}",
        dependencies=Admin,
        responses=_errors(403, 404, 409),
    )
    def act_on_rollout(
        rollout_id: str,
        action: Literal["pause", "resume", "abort", "rollback"],
        fleet: FleetDep,
    ) -> dict[str, Any]:
        """pause, resume, abort or rollback (`rollout pause|resume|abort|rollback ID`)."""
        _found(lambda: fleet.deployment(rollout_id))
        try:
            result: dict[str, Any] = getattr(fleet.rollouts, action)(rollout_id)
        except PolicyError as exc:
            raise HTTPException(409, str(exc)) from None
        return result


def _report_routes(api: APIRouter, FleetDep: Any, Admin: list[Any]) -> None:
    """The fleet report (inference cost per profile or device × model)."""
    @api.get("/report", responses=_errors(400))
    def fleet_report_rows(
        fleet: FleetDep,
        model: Annotated[str | None, Query(description="NAME, NAME:VERSION or sha prefix")] = None,
        by: Annotated[Literal["profile", "device"], Query()] = "profile",
        profile: Annotated[str | None, Query(description="only devices of this profile")] = None,
        since: Annotated[str | None, Query(description="30m, 1h, 2d; ISO 8601; epoch")] = None,
    ) -> dict[str, Any]:
        """Inference cost per profile (or device) × model beside benchmarks (`report`)."""
        # A duration starts at a whole minute: the report then reads only the fleet rollup.
        rows = fleet_report(fleet, model=model, by=by, since=parse_window(since), profile=profile)
        return {"rows": rows}

    @api.get("/report/series", responses=_errors(400))
    def fleet_report_series(
        fleet: FleetDep,
        by: Annotated[
            str, Query(description="one line per profile, model or profile_model")
        ] = "profile_model",
        since: Annotated[
            str | None, Query(description="30m, 1h, 2d; ISO 8601; epoch; all = everything stored")
        ] = "24h",
        profile: Annotated[str | None, Query(description="only devices of this profile")] = None,
        model: Annotated[str | None, Query(description="NAME, NAME:VERSION or sha prefix")] = None,
        points: Annotated[str, Query(description="most buckets per series, 10..1000")] = "120",
    ) -> dict[str, Any]:
        """Latency p50/p95, power and energy per inference over time, in time buckets.

        `{since, until, bucket_s, by, series: [{key, profile, model, served, points}], omitted}`:
        the bucket grows with the range so a series has at most `points` buckets, and at most
        12 series (the most served) are returned, whatever the fleet's size.
        """
        return fleet_series_query(
            fleet,
            by=by,
            since=None if since in (None, "", "all") else parse_since(since),
            profile=profile,
            model=model,
            points=query_int("points", points),
        )

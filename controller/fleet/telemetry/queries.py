"""Telemetry and report queries shared by the CLI and the HTTP API (argument checks included)."""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from controller.errors import FleetError

if TYPE_CHECKING:
    from controller.fleet.registry import Fleet

# Seconds per unit of a relative --since ("30m", "1.5h", "2d"), and the pattern it matches.
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")


def parse_since(value: str | None, now: float | None = None) -> float | None:
    """`1h`-style durations ago, ISO 8601 (naive = UTC) or epoch seconds → epoch seconds."""
    if value is None:
        return None
    text = value.strip()
    now = time.time() if now is None else now
    match = _RELATIVE.match(text)
    if match:
        return now - float(match.group(1)) * _UNITS_S[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise FleetError(
            f"--since {value!r}: expected a duration (30m, 1h, 2d), ISO 8601 time or epoch seconds"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def parse_window(value: str | None, now: float | None = None) -> float | None:
    """parse_since, except that a duration (`1h`) starts at a whole minute: the fleet
    rollup's grain, so a dashboard's report reads no raw records (docs/telemetry.md)."""
    since = parse_since(value, now)
    if since is not None and value is not None and _RELATIVE.match(value.strip()):
        return math.floor(since / 60) * 60
    return since


def check_telemetry_device(fleet: Fleet, device_id: str) -> None:
    """Refuse a device that is neither registered nor has stored telemetry (FleetError)."""
    if fleet.telemetry.cursor(device_id) is None and not fleet.has_device(device_id):
        raise FleetError(f"unknown device {device_id!r} (see `edgefleet devices list`)")


def device_telemetry(
    fleet: Fleet, device_id: str, *, since: float | None = None, limit: int = 50
) -> dict[str, Any]:
    """A device's newest telemetry records (model labelled), its seq cursor and gaps."""
    from controller.fleet.telemetry.reports import model_label, model_names

    if limit < 1:
        raise FleetError(f"--limit must be >= 1, got {limit}")
    check_telemetry_device(fleet, device_id)
    rows = fleet.telemetry.records(device_id, since=since, limit=limit)
    labels = model_names(fleet.db)
    for r in rows:
        r["model"] = model_label(r["model_sha256"], labels)
    return {
        "device_id": device_id,
        "cursor": fleet.telemetry.cursor(device_id),
        "gaps": fleet.telemetry.gaps(device_id),
        "records": rows,
    }


def fleet_report(
    fleet: Fleet,
    *,
    model: str | None = None,
    by: str = "profile",
    since: float | None = None,
    profile: str | None = None,
) -> list[dict[str, Any]]:
    """The report rows (per profile or device × model) after checking --model and --by."""
    from controller.fleet.telemetry.reports import report as build_report

    if model is not None:
        _check_model(fleet, model)
    if by not in ("profile", "device"):
        raise FleetError(f"--by must be 'profile' or 'device', got {by!r}")
    return build_report(
        fleet.db,
        model=model,
        by="device" if by == "device" else "profile",
        since=since,
        profile=profile,
    )


def _check_model(fleet: Fleet, model: str) -> None:
    """Refuse a --model that names no registered model (a sha prefix is let through)."""
    name = model.split(":", 1)[0]
    if ":" not in model and re.fullmatch(r"[0-9a-f]{6,64}", model):
        return
    fleet.model(model if ":" in model else name)


def fleet_series_query(
    fleet: Fleet,
    *,
    by: str = "profile_model",
    since: float | None = None,
    profile: str | None = None,
    model: str | None = None,
    points: int | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The fleet's series per profile and/or model after checking by, --model and points."""
    from controller.fleet.telemetry.series import (
        DEFAULT_POINTS,
        MAX_POINTS,
        MIN_POINTS,
        SERIES_BY,
        SeriesBy,
        fleet_series,
    )

    if by not in SERIES_BY:
        raise FleetError(f"by must be one of {', '.join(SERIES_BY)}, got {by!r}")
    points = DEFAULT_POINTS if points is None else points
    if not MIN_POINTS <= points <= MAX_POINTS:
        raise FleetError(f"points must be {MIN_POINTS}..{MAX_POINTS}, got {points}")
    if model is not None:
        _check_model(fleet, model)
    until = time.time() if now is None else now
    if since is not None and since >= until:
        raise FleetError("since must be in the past")
    return fleet_series(
        fleet.db,
        since=since,
        until=until,
        by=cast(SeriesBy, by),  # checked against SERIES_BY above
        profile=profile,
        model=model,
        points=points,
    )

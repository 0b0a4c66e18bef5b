"""What the Prometheus collector and the dashboard read at once (controller/runtime/prometheus.py,
controller/http/app.py): small GROUP BYs and index lookups, never a telemetry scan."""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, literal, select

from controller.storage.db import Connection
from controller.storage.queries import dicts
from controller.storage.tables import (
    artifacts,
    deployment_devices,
    deployments,
    devices,
    events,
    models,
    telemetry_cursor,
    telemetry_gaps,
    telemetry_latency_totals,
)


def device_counts(conn: Connection) -> list[dict[str, Any]]:
    """profile ('' for none), state, online, n: devices counted by the three."""
    profile = func.coalesce(devices.c.profile, literal(""))
    return dicts(
        conn,
        select(profile.label("profile"), devices.c.state, devices.c.online,
               func.count().label("n"))
        .group_by(profile, devices.c.state, devices.c.online)
        .order_by(profile, devices.c.state, devices.c.online),
    )  # fmt: skip


def rollout_counts(conn: Connection) -> list[dict[str, Any]]:
    """kind, state, n: deployments counted by kind and state."""
    d = deployments
    return dicts(
        conn,
        select(d.c.kind, d.c.state, func.count().label("n"))
        .group_by(d.c.kind, d.c.state)
        .order_by(d.c.kind, d.c.state),
    )


def artifact_names(conn: Connection) -> list[dict[str, Any]]:
    """sha256, name, version of every artifact's model."""
    return dicts(
        conn,
        select(artifacts.c.sha256, models.c.name, models.c.version).join(
            models, models.c.id == artifacts.c.model_id
        ),
    )


def latency_totals(conn: Connection) -> list[dict[str, Any]]:
    """Every telemetry_latency_totals row."""
    return dicts(conn, select(telemetry_latency_totals))


def gap_totals(conn: Connection) -> dict[str, int]:
    """open (missing ranges), missing and lost (records) over every device's gaps."""
    g = telemetry_gaps
    width = g.c.seq_last - g.c.seq_first + 1
    missing = g.c.state == "missing"

    def total(expr: Any, name: str) -> Any:
        return func.coalesce(func.sum(expr), 0).label(name)

    row = conn.sa.execute(
        select(
            total(case((missing, 1), else_=0), "open"),
            total(case((missing, width), else_=0), "missing"),
            total(case((g.c.state == "lost", width), else_=0), "lost"),
        )
    ).one()
    return {"open": int(row.open), "missing": int(row.missing), "lost": int(row.lost)}


def dropped_total(conn: Connection) -> int:
    """Records devices reported dropped from their spool, over every device."""
    return int(
        conn.sa.execute(
            select(func.coalesce(func.sum(telemetry_cursor.c.dropped_total), 0))
        ).scalar_one()
    )


def fleet_version(conn: Connection) -> list[Any]:
    """What changes when the fleet does: device, rollout and event counters and timestamps."""
    sub = [
        select(func.count()).select_from(devices),
        select(func.max(devices.c.last_seen)),
        select(func.sum(devices.c.online)),
        select(func.count()).select_from(deployments),
        select(func.max(deployments.c.updated)),
        select(func.max(deployment_devices.c.updated)),
        select(func.max(events.c.received)),
        select(func.max(models.c.id)),
    ]
    return list(conn.sa.execute(select(*(s.scalar_subquery() for s in sub))).one())

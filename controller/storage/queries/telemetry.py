"""Telemetry reads outside ingest (controller/fleet/telemetry/, cli/demo.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from controller.storage.db import Connection
from controller.storage.queries import dicts
from controller.storage.tables import telemetry


def served_by_device(conn: Connection) -> list[dict[str, Any]]:
    """device_id, n: inferences served per device over its stored telemetry."""
    return dicts(
        conn,
        select(telemetry.c.device_id, func.sum(telemetry.c.served).label("n")).group_by(
            telemetry.c.device_id
        ),
    )

"""/healthz: the database answers, and the facts of the controller loop running in-process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from controller.fleet.registry import Fleet


def health_report(
    fleets: Callable[[], Fleet], controller: dict[str, Any] | None
) -> dict[str, Any]:
    """/healthz's body: ok, the database check, and the controller loop's facts (or None)."""
    started = time.perf_counter()
    try:
        fleets().db.query_one("SELECT 1 AS one")
        database: dict[str, Any] = {
            "ok": True,
            "latency_ms": round((time.perf_counter() - started) * 1000, 2),
        }
    except Exception as exc:  # any driver error is a failed health check, named
        database = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    ok = database["ok"]
    if controller is not None:
        ok = ok and controller["running"] and controller["broker"]["connected"]
    return {"ok": bool(ok), "database": database, "controller": controller}

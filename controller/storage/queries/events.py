"""Device events, benchmark reports and device commands (controller/fleet/ingest.py and the
command queue)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, update

from controller.storage.db import Connection
from controller.storage.queries import Prepared, dialect_insert
from controller.storage.tables import benchmarks, commands, events

_EVENT_COLUMNS = ("device_id", "event_id", "kind", "deployment_id", "generation", "state",
                  "message", "ts", "received")  # fmt: skip
_EVENT = Prepared(
    lambda dialect: dialect_insert(dialect, events)
    .values({c: bindparam(c) for c in _EVENT_COLUMNS})
    .on_conflict_do_nothing(),
    _EVENT_COLUMNS,
)
_BENCH_COLUMNS = ("event_id", "device_id", "model_sha256", "deployment_id", "p50_ms", "p90_ms",
                  "p99_ms", "peak_rss_mb", "power_w", "energy_mj_per_inference", "power_source",
                  "report", "ts")  # fmt: skip
_BENCH = Prepared(
    lambda dialect: dialect_insert(dialect, benchmarks)
    .values({c: bindparam(c) for c in _BENCH_COLUMNS})
    .on_conflict_do_nothing(),
    _BENCH_COLUMNS,
)


def add_event(conn: Connection, row: dict[str, Any]) -> bool:
    """Store an event once per (device_id, event_id); False when it was stored already."""
    return bool(_EVENT.execute(conn, row).rowcount)


def add_benchmark(conn: Connection, row: dict[str, Any]) -> None:
    """Store a benchmark report once per (device_id, event_id)."""
    _BENCH.execute(conn, row)


def resend_unanswered_commands(conn: Connection, device_id: str) -> None:
    """Commands published to a device but never answered: publish them again."""
    c = commands.c
    conn.sa.execute(
        update(commands)
        .where(c.device_id == device_id, c.published.is_not(None), c.completed.is_(None))
        .values(published=None)
    )


def complete_command(conn: Connection, command_id: str, device_id: str, result: str,
                     at: float) -> None:  # fmt: skip
    """A device answered a command."""
    c = commands.c
    conn.sa.execute(
        update(commands)
        .where(c.id == command_id, c.device_id == device_id)
        .values(completed=at, result=result)
    )

"""Leases and replica heartbeats (controller/runtime/lease.py, adopt.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select, update

from controller.storage.db import Connection
from controller.storage.queries import dicts, first, prepared_upsert
from controller.storage.tables import leases, replicas


def lease(conn: Connection, name: str) -> tuple[str, int, float] | None:
    """(holder, epoch, expires) of a lease, or None before anyone took it."""
    row = conn.sa.execute(
        select(leases.c.holder, leases.c.epoch, leases.c.expires).where(leases.c.name == name)
    ).first()
    return None if row is None else (row[0], int(row[1]), float(row[2]))


def lease_row(conn: Connection, name: str) -> dict[str, Any] | None:
    """The whole lease row, or None."""
    return first(conn, select(leases).where(leases.c.name == name))


def create_lease(conn: Connection, name: str, holder: str, now: float, expires: float) -> None:
    """The first term of a lease."""
    conn.sa.execute(
        leases.insert().values(
            name=name, holder=holder, epoch=1, acquired=now, renewed=now, expires=expires
        )
    )


def renew_lease(conn: Connection, name: str, now: float, expires: float) -> None:
    """Extend the holder's term."""
    conn.sa.execute(
        update(leases).where(leases.c.name == name).values(renewed=now, expires=expires)
    )


def take_lease(
    conn: Connection, name: str, holder: str, epoch: int, now: float, expires: float
) -> None:
    """A new term for `holder`."""
    conn.sa.execute(
        update(leases)
        .where(leases.c.name == name)
        .values(holder=holder, epoch=epoch, acquired=now, renewed=now, expires=expires)
    )


def expire_lease(conn: Connection, name: str, holder: str, epoch: int, now: float) -> None:
    """End `holder`'s term `epoch` now (if it is still the current one)."""
    conn.sa.execute(
        update(leases)
        .where(leases.c.name == name, leases.c.holder == holder, leases.c.epoch == epoch)
        .values(expires=now)
    )


_BEAT_COLUMNS = ("name", "host", "pid", "started", "last_seen", "leader", "stats", "client_id",
                 "shared")  # fmt: skip
_HEARTBEAT = prepared_upsert(replicas, ["name"], _BEAT_COLUMNS, _BEAT_COLUMNS[1:])


def heartbeat(conn: Connection, row: dict[str, Any]) -> None:
    """Insert or refresh a replica's heartbeat row (name, host, pid, started, last_seen,
    leader, stats, client_id, shared); compiled once, it runs every second."""
    _HEARTBEAT.execute(conn, row)


def all_replicas(conn: Connection) -> list[dict[str, Any]]:
    """Every replica row, newest heartbeat first."""
    return dicts(
        conn, select(replicas).order_by(replicas.c.last_seen.desc(), replicas.c.name)
    )


def presence(conn: Connection, name: str) -> dict[str, Any] | None:
    """host, pid and last_seen of replica `name`, or None."""
    return first(
        conn,
        select(replicas.c.host, replicas.c.pid, replicas.c.last_seen).where(
            replicas.c.name == name
        ),
    )


def dead_unadopted(conn: Connection, me: str, seen_before: float) -> list[dict[str, Any]]:
    """name, client_id of shared replicas other than `me` silent since `seen_before` whose
    death nobody adopted yet."""
    return dicts(
        conn,
        select(replicas.c.name, replicas.c.client_id).where(
            replicas.c.shared == 1,
            replicas.c.name != me,
            replicas.c.last_seen < seen_before,
            or_(replicas.c.adopted.is_(None), replicas.c.adopted < replicas.c.last_seen),
        ),
    )


def mark_adopted(conn: Connection, name: str, by: str, now: float) -> None:
    """Record that `by` adopted replica `name`'s session (for this death)."""
    conn.sa.execute(
        update(replicas).where(replicas.c.name == name).values(adopted=now, adopted_by=by)
    )



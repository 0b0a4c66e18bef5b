"""The device registry (controller/fleet/core.py, registry.py, device_search.py)."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import ColumnElement, bindparam, delete, func, select, update

from controller.storage.db import Connection
from controller.storage.queries import Prepared, dicts, first, prepared_upsert
from controller.storage.tables import benchmarks, devices, events

d = devices.c


def all_devices(conn: Connection) -> list[dict[str, Any]]:
    """Every device row, by id."""
    return dicts(conn, select(devices).order_by(d.id))


def device(conn: Connection, device_id: str) -> dict[str, Any] | None:
    """One device's row, or None."""
    return first(conn, select(devices).where(d.id == device_id))


def exists(conn: Connection, device_id: str) -> bool:
    """Whether the device is registered."""
    return conn.sa.execute(select(d.id).where(d.id == device_id)).first() is not None


_REGISTER = prepared_upsert(
    devices,
    ["id"],
    ("id", "profile", "profile_reason", "registered_by", "registered_at"),
    ("profile", "profile_reason"),
)


def register(conn: Connection, device_id: str, profile: str, reason: str, by: str,
             at: float) -> None:  # fmt: skip
    """Add a device, or set the profile (and why) of a registered one."""
    _REGISTER.execute(conn, {"id": device_id, "profile": profile, "profile_reason": reason,
                             "registered_by": by, "registered_at": at})  # fmt: skip


def remove(conn: Connection, device_id: str) -> None:
    """Forget a device (its events and benchmarks stay)."""
    conn.sa.execute(delete(devices).where(d.id == device_id))


def recent_events(conn: Connection, device_id: str, limit: int) -> list[dict[str, Any]]:
    """kind, deployment_id, generation, state, message, ts of a device's newest events."""
    e = events.c
    return dicts(
        conn,
        select(e.kind, e.deployment_id, e.generation, e.state, e.message, e.ts)
        .where(e.device_id == device_id)
        .order_by(e.ts.desc())
        .limit(limit),
    )


def recent_benchmarks(conn: Connection, device_id: str, limit: int) -> list[dict[str, Any]]:
    """report (JSON text), deployment_id, ts of a device's newest benchmarks."""
    b = benchmarks.c
    return dicts(
        conn,
        select(b.report, b.deployment_id, b.ts)
        .where(b.device_id == device_id)
        .order_by(b.ts.desc())
        .limit(limit),
    )


def search_filter(
    q: str | None, profile: str | None, state: str | None, online: bool | None
) -> list[ColumnElement[bool]]:
    """WHERE terms: id containing `q` (any case), the profile ("(none)": none), state, online."""
    terms: list[ColumnElement[bool]] = []
    if q:
        pattern = "%" + q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        terms.append(func.lower(d.id).like(pattern + "%", escape="\\"))
    if profile is not None:
        terms.append(d.profile.is_(None) if profile == "(none)" else d.profile == profile)
    if state is not None:
        terms.append(d.state == state)
    if online is not None:
        terms.append(d.online == (1 if online else 0))
    return terms


def count(conn: Connection, where: list[ColumnElement[bool]]) -> int:
    """How many devices match."""
    query = select(func.count()).select_from(devices).where(*where)
    return int(conn.sa.execute(query).scalar_one())


def page(
    conn: Connection, where: list[ColumnElement[bool]], limit: int, offset: int
) -> list[dict[str, Any]]:
    """One page of the matching device rows, by id."""
    return dicts(conn, select(devices).where(*where).order_by(d.id).limit(limit).offset(offset))


def profile_state_counts(conn: Connection) -> list[dict[str, Any]]:
    """profile, state, online (how many), n per profile × state over the fleet."""
    return dicts(
        conn,
        select(d.profile, d.state, func.sum(d.online).label("online"),
               func.count().label("n")).group_by(d.profile, d.state),
    )  # fmt: skip


_HELLO_COLUMNS = ("id", "profile", "profile_reason", "declared_profile", "facts",
                  "agent_version", "runtime", "runtime_version", "online", "registered_by",
                  "registered_at", "last_seen")  # fmt: skip
_HELLO = prepared_upsert(
    devices,
    ["id"],
    _HELLO_COLUMNS,
    ("profile", "profile_reason", "declared_profile", "facts", "agent_version", "runtime",
     "runtime_version", "online", "last_seen"),
)  # fmt: skip


def registration(conn: Connection, device_id: str) -> dict[str, Any] | None:
    """profile and registered_by of a device, or None."""
    return first(conn, select(d.profile, d.registered_by).where(d.id == device_id))


def hello(conn: Connection, row: dict[str, Any]) -> None:
    """Register a device from its hello, or refresh what its hello says (online, facts, the
    profile it matched); registered_by and registered_at stay the first registration's."""
    _HELLO.execute(conn, {**row, "online": 1, "registered_by": "hello"})


def set_offline(conn: Connection, device_id: str) -> None:
    """The device's last will: offline."""
    conn.sa.execute(update(devices).where(d.id == device_id).values(online=0))


@functools.lru_cache(maxsize=16)
def _set_status(columns: tuple[str, ...]) -> Prepared:
    """UPDATE of a device to online with `columns`, compiled once per column set."""
    unknown = [c for c in columns if c not in d]
    if unknown:
        raise ValueError(f"not a column of devices: {', '.join(unknown)}")
    values: dict[str, Any] = {"online": bindparam("online")}
    values |= {c: bindparam(f"v_{c}") for c in columns}
    stmt = update(devices).where(d.id == bindparam("device_id")).values(values)
    return Prepared(lambda dialect: stmt)


def set_status(conn: Connection, device_id: str, row: dict[str, Any]) -> None:
    """Online, with what its retained status says (state, detail, model, generation, seen).

    Every status of every device lands here (at 1,000 devices in a rollout, a quarter of the
    service loop's CPU went to building this UPDATE afresh per call): compiled once."""
    params = {"device_id": device_id, "online": 1} | {f"v_{c}": v for c, v in row.items()}
    _set_status(tuple(row)).execute(conn, params)


_TOUCH = Prepared(
    lambda dialect: update(devices).where(d.id == bindparam("device_id"))
    .values(last_seen=bindparam("seen")),
    ("seen", "device_id"),
)  # fmt: skip


def touch(conn: Connection, device_id: str, seen: float) -> None:
    """last_seen = `seen` (every event: compiled once)."""
    _TOUCH.execute_row(conn, (seen, device_id))

"""The fleet rollup (telemetry_fleet_minute, telemetry_device_models): written at ingest,
backfilled by alembic revision 0002, read by the fleet report and series (docs/telemetry.md);
its hours (telemetry_fleet_hour, revision 0004) are folded from whole minutes.

Reads cost O(minutes × profiles × models) and O(devices × models), never O(records); a long
series O(hours × profiles × models) plus the minutes at its edges.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy
from sqlalchemy import (
    ColumnElement,
    and_,
    bindparam,
    case,
    delete,
    func,
    literal_column,
    or_,
    select,
)

from controller.storage.db import Connection
from controller.storage.queries import Prepared, dialect_insert, prepared_upsert
from controller.storage.queries.telemetry import (
    AGG_FIELDS,
    MAX_FIELDS,
    MIN_FIELDS,
    SUM_FIELDS,
    aggregate,
    raw_sums,
)
from controller.storage.tables import devices
from controller.storage.tables import telemetry as t
from controller.storage.tables import telemetry_device_models as dm
from controller.storage.tables import telemetry_fleet_hour as fh
from controller.storage.tables import telemetry_fleet_minute as fm
from controller.storage.tables import telemetry_minute as tm

FLEET_KEY = ("minute", "profile", "model_sha256")
# A rollup row's columns, in the order of the tuples add_fleet_minutes takes; the statement
# takes them in the table's order.
FLEET_COLUMNS: tuple[str, ...] = (*FLEET_KEY, "devices", *AGG_FIELDS)
_TABLE_ORDER = operator.itemgetter(*(FLEET_COLUMNS.index(c.name) for c in fm.columns))
HOUR_S = 3600
# An hour row's columns: the minute's, `hour` for `minute` (the same order in both tables).
HOUR_COLUMNS: tuple[str, ...] = ("hour", *FLEET_COLUMNS[1:])
assert [c.name for c in fh.columns] == ["hour", *[c.name for c in fm.columns][1:]]
DEVICE_MODEL_KEY = ("device_id", "model_sha256")
DEVICE_MODEL_COLUMNS = (*DEVICE_MODEL_KEY, "profile", "minute_first", "minute_last", "power_source")
# Device-minute ranges per presence statement (three parameters each, padded to a power of 2).
_PRESENCE_STEP = 256


def _pick(table: Any, excluded: Any, column: str, wins: str) -> Any:
    """The stored or the inserted value, whichever wins (NULL-aware): '>' larger, '<' smaller."""
    old, new = table.c[column], excluded[column]
    better = new > old if wins == ">" else new < old
    return case((or_(old.is_(None), better), new), else_=old)


_ADD = prepared_upsert(
    fm,
    FLEET_KEY,
    [c.name for c in fm.columns],
    lambda ex: {
        "devices": fm.c.devices + ex.devices,
        **{f: fm.c[f] + ex[f] for f in SUM_FIELDS},
        **{f: _pick(fm, ex, f, ">") for f in MAX_FIELDS},
        **{f: _pick(fm, ex, f, "<") for f in MIN_FIELDS},
    },
)


def add_fleet_minutes(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Merge rows (FLEET_COLUMNS order) into the rollup. Callers sort them by key, so two
    replicas upserting the same keys take their row locks in one order and never deadlock."""
    _ADD.executemany(conn, [_TABLE_ORDER(r) for r in rows])


_ADD_HOUR = prepared_upsert(
    fh,
    ("hour", "profile", "model_sha256"),
    [c.name for c in fh.columns],
    lambda ex: {
        "devices": _pick(fh, ex, "devices", ">"),
        **{f: fh.c[f] + ex[f] for f in SUM_FIELDS},
        **{f: _pick(fh, ex, f, ">") for f in MAX_FIELDS},
        **{f: _pick(fh, ex, f, "<") for f in MIN_FIELDS},
    },
)


def add_fleet_hours(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Merge late minutes into folded hours (HOUR_COLUMNS order, sorted by key): sums add,
    `devices` is the larger (callers pass the most devices of the minutes as stored now)."""
    _ADD_HOUR.executemany(conn, [_TABLE_ORDER(r) for r in rows])


_DEVICES_OF = Prepared(
    lambda dialect: select(fm.c.minute, fm.c.profile, fm.c.model_sha256, fm.c.devices).where(
        fm.c.minute.in_(bindparam("ids", expanding=True))
    )
)


def minute_devices(conn: Connection, minutes: Sequence[int]) -> dict[tuple[int, str, str], int]:
    """(minute, profile, model) → devices stored, for the given minutes (late ones: few)."""
    out: dict[tuple[int, str, str], int] = {}
    for i in range(0, len(minutes), 512):
        for m, p, s, n in _DEVICES_OF.execute_in(conn, minutes[i : i + 512]):
            out[(int(m), p, s)] = int(n)
    return out


# Read by every ingest batch: compiled once, straight to the driver.
_MARK = Prepared(lambda dialect: select(func.max(fh.c.hour)))


def fold_mark(conn: Connection) -> int | None:
    """The first minute not folded into hours (max(hour) + 1 h), None before any fold."""
    found = _MARK.execute(conn).fetchone()[0]
    return None if found is None else int(found) + HOUR_S


def fold_hours(conn: sqlalchemy.Connection, lo: int | None, hi: int) -> None:
    """Insert the hours of rollup minutes in [lo, hi) (whole hours without hour rows yet):
    sums added, `devices` the most of one minute, so hours bucket as their minutes do."""
    hour = (fm.c.minute - fm.c.minute % literal_column(str(HOUR_S))).label("hour")
    where = [fm.c.minute < hi] if lo is None else [fm.c.minute >= lo, fm.c.minute < hi]
    per_hour = (
        select(hour, fm.c.profile, fm.c.model_sha256,
               func.max(fm.c.devices).label("devices"), *aggregate(fm.c))
        .where(*where)
        .group_by(hour, fm.c.profile, fm.c.model_sha256)
    )  # fmt: skip
    conn.execute(dialect_insert(conn.dialect.name, fh).from_select(list(HOUR_COLUMNS), per_hour))


_SEEN = prepared_upsert(
    dm,
    DEVICE_MODEL_KEY,
    DEVICE_MODEL_COLUMNS,
    lambda ex: {
        "profile": ex.profile,
        "minute_first": _pick(dm, ex, "minute_first", "<"),
        "minute_last": _pick(dm, ex, "minute_last", ">"),
        "power_source": _pick(dm, ex, "power_source", ">"),
    },
)


def add_device_models(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Widen each (device, model)'s [minute_first, minute_last], set its profile and keep its
    largest power source (DEVICE_MODEL_COLUMNS order, sorted by key like add_fleet_minutes)."""
    _SEEN.executemany(conn, rows)


_SPANS_OF = Prepared(
    lambda dialect: select(
        dm.c.device_id, dm.c.model_sha256, dm.c.profile, dm.c.minute_first, dm.c.minute_last,
        dm.c.power_source,
    ).where(dm.c.device_id.in_(bindparam("ids", expanding=True)))
)  # fmt: skip


def device_model_spans(
    conn: Connection, device_ids: Sequence[str]
) -> dict[tuple[str, str], tuple[str, int, int, str]]:
    """(device, model) → (profile, first minute, last minute, largest power source) stored."""
    out: dict[tuple[str, str], tuple[str, int, int, str]] = {}
    for i in range(0, len(device_ids), 512):
        for d, m, profile, first, last, source in _SPANS_OF.execute_in(
            conn, device_ids[i : i + 512]
        ):
            out[(d, m)] = (profile, int(first), int(last), source)
    return out


@functools.lru_cache(maxsize=32)
def _present_in(n: int) -> Prepared:
    """(device_id, minute, model) stored in raw or per-minute rows, for n (device, lo, hi)
    minute ranges; raw rows are selected by ts so the (device_id, ts) index serves."""
    ranges: list[tuple[Any, Any, Any]] = [
        (bindparam(f"d{i}"), bindparam(f"lo{i}"), bindparam(f"hi{i}")) for i in range(n)
    ]
    raw = select(t.c.device_id, t.c.minute, func.coalesce(t.c.model_sha256, "")).where(
        or_(*(and_(t.c.device_id == d, t.c.ts >= lo, t.c.ts < hi + 60) for d, lo, hi in ranges))
    )
    minutes = select(tm.c.device_id, tm.c.minute, tm.c.model_sha256).where(
        or_(*(and_(tm.c.device_id == d, tm.c.minute.between(lo, hi)) for d, lo, hi in ranges))
    )
    stmt = raw.union(minutes)
    return Prepared(lambda dialect: stmt)


def present_minutes(
    conn: Connection, ranges: Iterable[tuple[str, int, int]]
) -> set[tuple[str, int, str]]:
    """(device_id, minute, model_sha256 or '') already stored (raw or compacted) within the
    (device, first minute, last minute) ranges: whether a device already counts in a minute."""
    terms = list(ranges)
    found: set[tuple[str, int, str]] = set()
    if not terms:
        return found
    for i in range(0, len(terms), _PRESENCE_STEP):
        part = terms[i : i + _PRESENCE_STEP]
        width = 1 << max(len(part) - 1, 0).bit_length()
        padded = [*part, *[part[-1]] * (width - len(part))]
        params = {f"{n}{j}": v for j, triple in enumerate(padded)
                  for n, v in zip(("d", "lo", "hi"), triple, strict=True)}  # fmt: skip
        rows = _present_in(width).execute(conn, params)
        found.update((d, int(m), s) for d, m, s in rows)
    return found


# ---------------------------------------------------------------------------- reads
def fleet_sums(
    conn: Connection, since: float | None, until: float | None = None
) -> list[dict[str, Any]]:
    """Sum-form totals per profile ('' for none) × model ('' for none), minutes overlapping
    [since, until) (the old report's rule: a per-minute row overlapping `since` counts)."""
    where = _window(since, until)
    return _dicts(
        conn,
        select(fm.c.profile, fm.c.model_sha256, *aggregate(fm.c))
        .where(*where)
        .group_by(fm.c.profile, fm.c.model_sha256),
    )


def _window(since: float | None, until: float | None) -> list[ColumnElement[bool]]:
    """WHERE terms for rollup minutes from `since` (overlapping) to `until` (exclusive)."""
    where: list[ColumnElement[bool]] = []
    if since is not None:
        where.append(fm.c.minute + 60 > since)
    if until is not None:
        where.append(fm.c.minute < until)
    return where


def fleet_devices(conn: Connection, minute: float | None) -> list[dict[str, Any]]:
    """profile, model_sha256, device_id, power_source of each (device, model) pair with a
    record in `minute` or later: O(devices × models) rows."""
    d = dm.c
    where = [] if minute is None else [d.minute_last >= minute]
    return _dicts(
        conn,
        select(d.profile, d.model_sha256, d.device_id, d.power_source).where(*where),
    )


def fleet_span(conn: Connection, since: float, until: float) -> float | None:
    """The first rollup minute overlapping [since, until), or None."""
    found = conn.sa.execute(select(func.min(fm.c.minute)).where(*_window(since, until))).scalar()
    return None if found is None else float(found)


def fleet_series(
    conn: Connection, start: float, until: float, bucket: int, *, hours: bool = True
) -> list[dict[str, Any]]:
    """Sum-form totals per bucket × profile × model from minute `start` to `until`, with
    `devices` the most devices reporting in one minute of the bucket, oldest first. Buckets of
    whole hours read the folded hours below the fold mark, minutes for the rest (hours=False:
    minutes only, the reference)."""
    edge = start
    parts: list[Any] = []
    if hours and bucket % HOUR_S == 0:
        mark = fold_mark(conn)
        edge = max(start, min(mark or start, until - until % HOUR_S))
        if edge > start:  # start is a whole bucket, so a whole hour
            parts.append(
                select(fh.c.hour.label("at"), *(fh.c[c] for c in HOUR_COLUMNS[1:]))
                .where(fh.c.hour >= start, fh.c.hour < edge)
            )  # fmt: skip
    parts.append(
        select(fm.c.minute.label("at"), *(fm.c[c] for c in FLEET_COLUMNS[1:]))
        .where(fm.c.minute >= edge, fm.c.minute < until)
    )  # fmt: skip
    rows = parts[0] if len(parts) == 1 else parts[0].union_all(parts[1])
    u = rows.subquery("u")
    width: ColumnElement[Any] = literal_column(str(int(bucket)))
    bucket_ = (u.c.at - (u.c.at % width)).label("bucket")
    return _dicts(
        conn,
        select(bucket_, u.c.profile, u.c.model_sha256,
               func.max(u.c.devices).label("devices"), *aggregate(u.c))
        .group_by(bucket_, u.c.profile, u.c.model_sha256)
        .order_by(bucket_),
    )  # fmt: skip


def _dicts(conn: Connection, stmt: Any) -> list[dict[str, Any]]:
    """Rows of a query as dicts."""
    return [dict(r._mapping) for r in conn.sa.execute(stmt)]


# ---------------------------------------------------------------------------- retention
def delete_fleet_before(conn: Connection, minute: float) -> None:
    """Drop rollup minutes older than `minute`, and the (device, model) pairs last seen then;
    hours before it, and the hour it cuts is folded again from the minutes left (callers hold
    the fold lock alone)."""
    mark = fold_mark(conn)
    conn.sa.execute(delete(fm).where(fm.c.minute < minute))
    conn.sa.execute(delete(dm).where(dm.c.minute_last < minute))
    cut = -int(-minute // 60) * 60  # the first minute kept (rows are whole minutes)
    hour = cut - cut % HOUR_S
    conn.sa.execute(delete(fh).where(fh.c.hour < hour + (HOUR_S if cut > hour else 0)))
    if cut > hour and mark is not None and hour + HOUR_S <= mark:
        fold_hours(conn.sa, cut, hour + HOUR_S)


# ---------------------------------------------------------------------------- backfill
def backfill(conn: sqlalchemy.Connection) -> None:
    """Fill both rollup tables from the stored raw and per-minute rows (revision 0002), with
    each device's profile as registered now."""
    raw = raw_sums([]).subquery("raw")
    keys = (raw.c.device_id, raw.c.minute, raw.c.model_sha256)
    raw_minutes = select(*keys, *aggregate(raw.c)).group_by(*keys)
    minute_rows = select(tm.c.device_id, tm.c.minute, tm.c.model_sha256,
                         *(tm.c[f] for f in AGG_FIELDS))  # fmt: skip
    u = raw_minutes.union_all(minute_rows).subquery("u")
    profile = func.coalesce(devices.c.profile, "").label("profile")
    joined = u.outerjoin(devices, devices.c.id == u.c.device_id)
    per_minute = (
        select(u.c.minute, profile, u.c.model_sha256,
               func.count(u.c.device_id.distinct()).label("devices"), *aggregate(u.c))
        .select_from(joined)
        .group_by(u.c.minute, profile, u.c.model_sha256)
    )  # fmt: skip
    dialect = conn.dialect.name
    conn.execute(dialect_insert(dialect, fm).from_select(list(FLEET_COLUMNS), per_minute))
    pairs = (
        select(u.c.device_id, u.c.model_sha256, profile,
               func.min(u.c.minute), func.max(u.c.minute), func.max(u.c.power_source))
        .select_from(joined)
        .group_by(u.c.device_id, u.c.model_sha256, profile)
    )  # fmt: skip
    conn.execute(dialect_insert(dialect, dm).from_select(list(DEVICE_MODEL_COLUMNS), pairs))

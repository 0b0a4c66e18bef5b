"""Telemetry reads, reports and compaction (controller/fleet/telemetry/, cli/demo.py).

The "sum form" (docs/telemetry.md) is defined here once, as SQL: every weighted mean becomes
a sum and its weight, so raw rows, per-minute aggregates and whole fleets merge exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    case,
    delete,
    func,
    literal_column,
    or_,
    select,
    union_all,
)

from controller.storage.db import Connection
from controller.storage.queries import dicts, first, per_dialect, upsert
from controller.storage.tables import BUCKET_NAMES, benchmarks, devices, telemetry
from controller.storage.tables import telemetry_cursor as tc
from controller.storage.tables import telemetry_gaps as g
from controller.storage.tables import telemetry_minute as tm


def column_names(spaced: str) -> tuple[str, ...]:
    """Column names written as one space-separated string."""
    return tuple(spaced.split())


# The columns of the sum form, and how two of its rows merge: sums add, maxima take the larger,
# first/last take the smaller/larger.
SUM_FIELDS = (
    *column_names("records interval_s served latency_sum_ms"),
    *BUCKET_NAMES,
    *column_names(
        "invocations throughput_sum rss_sum cpu_sum temperature_sum temperature_n power_sum "
        "power_interval_s energy_sum energy_served cache_hits errors"
    ),
)
MAX_FIELDS = column_names(
    "max_ms peak_rss_mb temperature_max power_source power_estimated dropped_total seq_last ts_last"
)
MIN_FIELDS = column_names("seq_first ts_first")
AGG_FIELDS: tuple[str, ...] = (*SUM_FIELDS, *MAX_FIELDS, *MIN_FIELDS)

_ZERO: ColumnElement[Any] = literal_column("0")
_ONE: ColumnElement[Any] = literal_column("1")


def _raw_as_sums() -> dict[str, ColumnElement[Any]]:
    """The raw table's columns in sum form, by sum-form name."""
    t = telemetry.c

    def weight_if(column: ColumnElement[Any], weight: ColumnElement[Any]) -> Any:
        return case((column.is_(None), _ZERO), else_=weight)

    return {
        "records": _ONE,
        "interval_s": t.interval_s,
        "served": t.served,
        "latency_sum_ms": t.served * func.coalesce(t.mean_ms, _ZERO),
        **{b: t[b] for b in BUCKET_NAMES},
        "invocations": t.invocations,
        "throughput_sum": t.throughput_ips * t.interval_s,
        "rss_sum": t.rss_mb * t.interval_s,
        "cpu_sum": t.cpu_percent * t.interval_s,
        "temperature_sum": func.coalesce(t.temperature_c, _ZERO),
        "temperature_n": weight_if(t.temperature_c, _ONE),
        "power_sum": func.coalesce(t.power_w, _ZERO) * t.interval_s,
        "power_interval_s": weight_if(t.power_w, t.interval_s),
        "energy_sum": func.coalesce(t.energy_mj_per_inference, _ZERO) * t.served,
        "energy_served": weight_if(t.energy_mj_per_inference, t.served),
        "cache_hits": t.cache_hits,
        "errors": t.errors,
        "max_ms": t.max_ms,
        "peak_rss_mb": t.peak_rss_mb,
        "temperature_max": t.temperature_c,
        "power_source": t.power_source,
        "power_estimated": t.power_estimated,
        "dropped_total": t.dropped_total,
        "seq_last": t.seq,
        "ts_last": t.ts,
        "seq_first": t.seq,
        "ts_first": t.ts,
    }


def raw_sums(where: Sequence[ColumnElement[bool]]) -> Select[Any]:
    """Raw telemetry rows matching `where`, in sum form (device_id, minute, model_sha256, …)."""
    t = telemetry.c
    columns = [expr.label(name) for name, expr in _raw_as_sums().items()]
    model = func.coalesce(t.model_sha256, literal_column("''")).label("model_sha256")
    return select(t.device_id, t.minute, model, *columns).where(*where)


def sums_union(
    raw_where: Sequence[ColumnElement[bool]], minute_where: Sequence[ColumnElement[bool]]
) -> Any:
    """Raw and per-minute rows in one sum-form row set, as a subquery `u`."""
    minutes = select(
        tm.c.device_id, tm.c.minute, tm.c.model_sha256, *(tm.c[f] for f in _raw_as_sums())
    ).where(*minute_where)
    return union_all(raw_sums(raw_where), minutes).subquery("u")


def aggregate(columns: Any) -> list[ColumnElement[Any]]:
    """The SELECT list merging sum-form rows of `columns`: SUM, MAX or MIN per field."""
    out: list[ColumnElement[Any]] = [func.sum(columns[f]).label(f) for f in SUM_FIELDS]
    out += [func.max(columns[f]).label(f) for f in MAX_FIELDS]
    out += [func.min(columns[f]).label(f) for f in MIN_FIELDS]
    return out


# A filter on the device_id column of either table (both halves of the union get it).
DeviceFilter = Callable[[Any], ColumnElement[bool]]


def one_device(device_id: str) -> DeviceFilter:
    """Rows of one device."""
    return lambda column: column == device_id


def of_profile(profile: str) -> DeviceFilter:
    """Rows of the devices registered with this profile."""
    return lambda column: column.in_(select(devices.c.id).where(devices.c.profile == profile))


def _since(since: float | None, devs: DeviceFilter | None) -> tuple[list[Any], list[Any]]:
    """WHERE terms for raw and minute rows from `since` (a minute row overlapping it counts)."""
    raw: list[Any] = [] if since is None else [telemetry.c.ts >= since]
    minute: list[Any] = [] if since is None else [tm.c.minute + 60 > since]
    if devs is not None:
        raw.append(devs(telemetry.c.device_id))
        minute.append(devs(tm.c.device_id))
    return raw, minute


def report_sums(
    conn: Connection, since: float | None, until: float | None = None
) -> list[dict[str, Any]]:
    """Sum-form totals per device × model (model '' for none) from `since` (to `until`)."""
    raw, minute = _since(since, None)
    if until is not None:
        raw.append(telemetry.c.ts < until)
        minute.append(tm.c.minute < until)
    u = sums_union(raw, minute)
    return dicts(
        conn,
        select(u.c.device_id, u.c.model_sha256, *aggregate(u.c)).group_by(
            u.c.device_id, u.c.model_sha256
        ),
    )


def series_span(conn: Connection, devs: DeviceFilter, since: float | None) -> tuple[Any, Any]:
    """The first and last minute with data for these devices from `since`."""
    u = sums_union(*_since(since, devs))
    row = conn.sa.execute(select(func.min(u.c.minute), func.max(u.c.minute))).one()
    return row[0], row[1]


def series(
    conn: Connection, devs: DeviceFilter, since: float | None, bin_s: int
) -> list[dict[str, Any]]:
    """Sum-form totals per time bin × model, with the number of devices, oldest first."""
    u = sums_union(*_since(since, devs))
    width: ColumnElement[Any] = literal_column(str(int(bin_s)))
    bin_ = (u.c.minute - (u.c.minute % width)).label("bin")
    return dicts(
        conn,
        select(bin_, u.c.model_sha256, func.count(u.c.device_id.distinct()).label("devices"),
               *aggregate(u.c))
        .group_by(bin_, u.c.model_sha256)
        .order_by(bin_, u.c.model_sha256),
    )  # fmt: skip


def device_profiles(conn: Connection) -> dict[str, str | None]:
    """Every registered device's profile."""
    return dict(conn.sa.execute(select(devices.c.id, devices.c.profile)).tuples().all())


def benchmarks_of(conn: Connection, shas: set[str]) -> list[dict[str, Any]]:
    """Benchmark rows of these artifacts (report still JSON text), oldest first."""
    b = benchmarks.c
    return dicts(
        conn,
        select(b.device_id, b.model_sha256, b.p50_ms, b.p90_ms, b.p99_ms, b.peak_rss_mb,
               b.energy_mj_per_inference, b.report, b.ts)
        .where(b.model_sha256.in_(sorted(shas)))
        .order_by(b.ts),
    )  # fmt: skip


def served_by_device(conn: Connection) -> list[dict[str, Any]]:
    """device_id, n: inferences served per device over its stored raw telemetry."""
    t = telemetry.c
    return dicts(conn, select(t.device_id, func.sum(t.served).label("n")).group_by(t.device_id))


# ---------------------------------------------------------------------------- history
def gaps(conn: Connection, device_id: str | None) -> list[dict[str, Any]]:
    """Gap rows (missing and lost), of one device or all, by device and seq."""
    query = select(g).order_by(g.c.device_id, g.c.seq_first)
    if device_id:
        query = query.where(g.c.device_id == device_id)
    return dicts(conn, query)


def cursor(conn: Connection, device_id: str) -> dict[str, Any] | None:
    """A device's cursor row, or None."""
    return first(conn, select(tc).where(tc.c.device_id == device_id))


def raw_records(
    conn: Connection, device_id: str, lo: float, hi: float, limit: int
) -> list[dict[str, Any]]:
    """A device's newest `limit` raw rows with lo <= ts < hi, newest first."""
    t = telemetry.c
    return dicts(
        conn,
        select(telemetry)
        .where(t.device_id == device_id, t.ts >= lo, t.ts < hi)
        .order_by(t.ts.desc())
        .limit(limit),
    )


def minute_records(
    conn: Connection, device_id: str, lo: float, hi: float, limit: int
) -> list[dict[str, Any]]:
    """A device's newest `limit` per-minute rows overlapping [lo, hi), newest first."""
    m = tm.c
    return dicts(
        conn,
        select(tm)
        .where(m.device_id == device_id, m.minute + 60 > lo, m.minute < hi)
        .order_by(m.minute.desc())
        .limit(limit),
    )


def summary(conn: Connection) -> dict[str, int]:
    """stored, duplicates, lost, devices (cursors), gaps_open and missing (seqs) in all."""
    zero = _ZERO
    totals = conn.sa.execute(
        select(
            func.coalesce(func.sum(tc.c.stored), zero).label("stored"),
            func.coalesce(func.sum(tc.c.duplicates), zero).label("duplicates"),
            func.coalesce(func.sum(tc.c.lost), zero).label("lost"),
            func.count().label("devices"),
        ).select_from(tc)
    ).one()
    missing = conn.sa.execute(
        select(
            func.count().label("gaps_open"),
            func.coalesce(func.sum(g.c.seq_last - g.c.seq_first + 1), zero).label("missing"),
        ).where(g.c.state == "missing")
    ).one()
    return {k: int(v) for k, v in {**totals._mapping, **missing._mapping}.items()}


# ---------------------------------------------------------------------------- compaction
def delete_minutes_before(conn: Connection, minute: float) -> None:
    """Drop per-minute rows older than `minute`."""
    conn.sa.execute(delete(tm).where(tm.c.minute < minute))


def oldest_raw(conn: Connection) -> float | None:
    """The oldest raw record's ts, or None."""
    found = conn.sa.execute(select(func.min(telemetry.c.ts))).scalar()
    return None if found is None else float(found)


def nth_raw_before(conn: Connection, cutoff: float, offset: int) -> float | None:
    """The ts of the (offset+1)-th oldest raw record before `cutoff`, or None."""
    t = telemetry.c
    found = conn.sa.execute(
        select(t.ts).where(t.ts < cutoff).order_by(t.ts).limit(1).offset(offset)
    ).scalar()
    return None if found is None else float(found)


def _greatest(excluded: Any, column: str, wins: str = ">") -> Any:
    """The stored or the inserted value, whichever wins (NULL-aware)."""
    old, new = tm.c[column], excluded[column]
    better = new > old if wins == ">" else new < old
    return case((or_(old.is_(None), better), new), else_=old)


_FOLD = per_dialect(
    lambda dialect: upsert(
        dialect,
        tm,
        ["device_id", "minute", "model_sha256"],
        lambda ex: {
            **{f: tm.c[f] + ex[f] for f in SUM_FIELDS},
            **{f: _greatest(ex, f) for f in MAX_FIELDS},
            **{f: _greatest(ex, f, "<") for f in MIN_FIELDS},
        },
    )
)


def fold_into_minutes(conn: Connection, lo: float, hi: float, hi_closed: bool) -> int:
    """Add the raw records with lo <= ts <= hi (< hi unless `hi_closed`) to their per-minute
    rows, then delete them; the number deleted. A range closed on both sides lets the planner
    take the ts index (one-sided, it may scan the table in device order for the GROUP BY)."""
    t = telemetry.c
    where = [t.ts >= lo, t.ts <= hi if hi_closed else t.ts < hi]
    raw = raw_sums(where).subquery("raw")
    keys = (raw.c.device_id, raw.c.minute, raw.c.model_sha256)
    folded = select(*keys, *aggregate(raw.c)).group_by(*keys)
    conn.sa.execute(
        _FOLD(conn).from_select(["device_id", "minute", "model_sha256", *AGG_FIELDS], folded)
    )
    return int(conn.sa.execute(delete(telemetry).where(*where)).rowcount)


# ---------------------------------------------------------------------------- fleet series
def fleet_oldest(conn: Connection, lo: float, until: float) -> float | None:
    """The oldest raw ts or per-minute row overlapping [lo, until), or None: the series'
    range from the records (the reference the rollup is checked against)."""
    raw = select(func.min(telemetry.c.ts).label("m")).where(
        telemetry.c.ts >= lo, telemetry.c.ts < until
    )
    minutes = select(func.min(tm.c.minute).label("m")).where(tm.c.minute + 60 > lo,
                                                             tm.c.minute < until)  # fmt: skip
    u = union_all(raw, minutes).subquery("o")
    found = conn.sa.execute(select(func.min(u.c.m))).scalar()
    return None if found is None else float(found)


def fleet_series_from_records(
    conn: Connection, start: float, until: float, bucket: int
) -> list[dict[str, Any]]:
    """Sum-form totals per bucket × registered profile × model from every stored record in
    [start, until), with distinct devices: O(records), the reference for the rollup."""
    u = sums_union(
        [telemetry.c.ts >= start, telemetry.c.ts < until],
        [tm.c.minute >= start, tm.c.minute < until],
    )
    width: ColumnElement[Any] = literal_column(str(int(bucket)))
    bucket_ = (u.c.minute - (u.c.minute % width)).label("bucket")
    profile = func.coalesce(devices.c.profile, literal_column("''")).label("profile")
    return dicts(
        conn,
        select(bucket_, profile, u.c.model_sha256,
               func.count(u.c.device_id.distinct()).label("devices"), *aggregate(u.c))
        .select_from(u.outerjoin(devices, devices.c.id == u.c.device_id))
        .group_by(bucket_, profile, u.c.model_sha256)
        .order_by(bucket_),
    )  # fmt: skip

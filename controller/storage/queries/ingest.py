"""Telemetry ingest, gaps and resend bookkeeping (controller/fleet/telemetry/store.py).

The batch paths read and write a whole drained batch in a handful of statements; the raw
record insert, one row per record, is compiled once per dialect and run with plain tuples.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)

from controller.storage.db import Connection
from controller.storage.queries import MAX_SQL_PARAMS, Prepared, dialect_insert, per_dialect, upsert
from controller.storage.tables import BUCKET_NAMES, devices
from controller.storage.tables import telemetry as t
from controller.storage.tables import telemetry_cursor as tc
from controller.storage.tables import telemetry_gaps as g
from controller.storage.tables import telemetry_latency_totals as lt

# A telemetry row's columns, in the order of the tuples insert_records takes.
RECORD_COLUMNS: tuple[str, ...] = (
    "device_id", "seq", "ts", "minute", "received", "model_sha256", "interval_s", "served",
    "p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms", *BUCKET_NAMES, "invocations",
    "throughput_ips", "rss_mb", "peak_rss_mb", "cpu_percent", "temperature_c", "power_w",
    "energy_mj_per_inference", "power_source", "power_estimated", "cache_hits", "errors",
    "dropped_total",
)  # fmt: skip
# A gap row's columns after device_id, in the order gaps_overlapping returns and insert_gaps
# takes them.
GAP_COLUMNS = ("seq_first", "seq_last", "state", "first_seen", "last_requested", "requests",
               "reason")  # fmt: skip

_RECORDS = Prepared(
    lambda dialect: dialect_insert(dialect, t)
    .values({c: bindparam(c) for c in RECORD_COLUMNS})
    .on_conflict_do_nothing(),
    RECORD_COLUMNS,
)


def insert_records(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Store raw records (tuples in RECORD_COLUMNS order); a (device, seq) stored already is
    left as it is."""
    _RECORDS.executemany(conn, rows)


def cursor_highest(conn: Connection, device_ids: Sequence[str]) -> dict[str, int]:
    """The highest seq stored per device, for the devices that have a cursor."""
    out: dict[str, int] = {}
    for i in range(0, len(device_ids), MAX_SQL_PARAMS):
        part = device_ids[i : i + MAX_SQL_PARAMS]
        rows = conn.sa.execute(
            select(tc.c.device_id, tc.c.highest).where(tc.c.device_id.in_(part))
        )
        out.update((d, int(h)) for d, h in rows)
    return out


def _any_range(ranges: Iterable[tuple[str, int, int]]) -> list[list[tuple[str, int, int]]]:
    """`ranges` deduplicated, in parts of MAX_SQL_PARAMS parameters (three a range)."""
    terms = list(dict.fromkeys(ranges))
    step = MAX_SQL_PARAMS // 3
    return [terms[i : i + step] for i in range(0, len(terms), step)]


def gaps_overlapping(
    conn: Connection, windows: Iterable[tuple[str, int, int]]
) -> list[tuple[Any, ...]]:
    """(device_id, *GAP_COLUMNS) of the gaps overlapping any (device, lo, hi) window."""
    columns = [g.c.device_id, *(g.c[c] for c in GAP_COLUMNS)]
    rows: list[tuple[Any, ...]] = []
    for part in _any_range(windows):
        where = or_(
            *(and_(g.c.device_id == d, g.c.seq_last >= lo, g.c.seq_first <= hi)
              for d, lo, hi in part)
        )  # fmt: skip
        rows += map(tuple, conn.sa.execute(select(*columns).where(where)))
    return rows


def stored_seqs(conn: Connection, ranges: Iterable[tuple[str, int, int]]) -> set[tuple[str, int]]:
    """(device_id, seq) of the stored records within any (device, lo, hi) range."""
    found: set[tuple[str, int]] = set()
    for part in _any_range(ranges):
        where = or_(*(and_(t.c.device_id == d, t.c.seq.between(lo, hi)) for d, lo, hi in part))
        found.update((d, int(s)) for d, s in conn.sa.execute(select(t.c.device_id, t.c.seq)
                                                              .where(where)))  # fmt: skip
    return found


def delete_gaps(conn: Connection, keys: Sequence[tuple[str, int]]) -> None:
    """Delete the gaps (device_id, seq_first)."""
    if keys:
        conn.sa.execute(
            delete(g).where(g.c.device_id == bindparam("d"), g.c.seq_first == bindparam("s")),
            [{"d": d, "s": s} for d, s in keys],
        )


def insert_gaps(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert gaps: tuples of device_id and GAP_COLUMNS."""
    if rows:
        names = ("device_id", *GAP_COLUMNS)
        conn.sa.execute(insert(g), [dict(zip(names, r, strict=True)) for r in rows])


def _greatest(excluded: Any, column: str) -> ColumnElement[Any]:
    """The larger of the stored and the inserted value, NULL-aware."""
    old, new = tc.c[column], excluded[column]
    return case((or_(old.is_(None), new > old), new), else_=old)


_CURSOR = per_dialect(
    lambda dialect: upsert(
        dialect,
        tc,
        ["device_id"],
        lambda ex: {
            "highest": ex.highest,
            "contiguous": ex.contiguous,
            "stored": tc.c.stored + ex.stored,
            "duplicates": tc.c.duplicates + ex.duplicates,
            "lost": tc.c.lost + ex.lost,
            "dropped_total": _greatest(ex, "dropped_total"),
            "last_ts": _greatest(ex, "last_ts"),
            "updated": ex.updated,
        },
    ).values(
        device_id=bindparam("device_id"),
        highest=bindparam("highest"),
        # One below the lowest missing seq, else the highest.
        contiguous=func.coalesce(
            select(func.min(g.c.seq_first) - 1)
            .where(g.c.device_id == bindparam("device_id"), g.c.state == "missing")
            .scalar_subquery(),
            bindparam("highest"),
        ),
        stored=bindparam("stored"),
        duplicates=bindparam("duplicates"),
        lost=bindparam("lost"),
        dropped_total=bindparam("dropped_total"),
        last_ts=bindparam("last_ts"),
        updated=bindparam("updated"),
    )
)


def upsert_cursors(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert or advance device cursors: highest, the batch's stored/duplicates/lost counts
    (added), dropped_total and last_ts (kept at their maximum), updated."""
    if rows:
        conn.sa.execute(_CURSOR(conn), list(rows))


def device_profiles(conn: Connection, device_ids: Sequence[str]) -> dict[str, str | None]:
    """The profile of each registered device among `device_ids`."""
    out: dict[str, str | None] = {}
    for i in range(0, len(device_ids), MAX_SQL_PARAMS):
        part = device_ids[i : i + MAX_SQL_PARAMS]
        out.update(
            conn.sa.execute(select(devices.c.id, devices.c.profile).where(devices.c.id.in_(part)))
            .tuples()
            .all()
        )
    return out


_TOTALS = per_dialect(
    lambda dialect: upsert(
        dialect,
        lt,
        ["profile", "model_sha256"],
        lambda ex: {c: lt.c[c] + ex[c] for c in ("served", "latency_sum_ms", *BUCKET_NAMES)},
    )
)


def add_latency_totals(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Add to the profile × model totals: tuples (profile, model_sha256, served,
    latency_sum_ms, *buckets), summed into existing rows. Callers sort them by key, so two
    replicas upserting the same keys never deadlock."""
    if rows:
        names = ("profile", "model_sha256", "served", "latency_sum_ms", *BUCKET_NAMES)
        conn.sa.execute(_TOTALS(conn), [dict(zip(names, r, strict=True)) for r in rows])


def add_latency_sums(conn: Connection, key: tuple[str, str], sums: Sequence[float]) -> None:
    """latency_sum_ms + s1 + s2 + …, added in this order, so the float total rounds as if
    each were added by a statement of its own (MAX_SQL_PARAMS // 2 terms a statement, which
    also keeps the chain under SQLite's expression depth limit of 1000)."""
    step = MAX_SQL_PARAMS // 2
    for i in range(0, len(sums), step):
        total: ColumnElement[Any] = lt.c.latency_sum_ms
        for s in sums[i : i + step]:
            total = total + s
        conn.sa.execute(
            update(lt)
            .where(lt.c.profile == key[0], lt.c.model_sha256 == key[1])
            .values(latency_sum_ms=total)
        )


def touch_devices(conn: Connection, device_ids: Sequence[str], seen: float) -> None:
    """last_seen = `seen` for these devices, never moving it backwards."""
    if device_ids:
        conn.sa.execute(
            update(devices)
            .where(
                devices.c.id == bindparam("d"),
                or_(devices.c.last_seen.is_(None), devices.c.last_seen < bindparam("seen")),
            )
            .values(last_seen=bindparam("seen")),
            [{"d": d, "seen": seen} for d in device_ids],
        )


def devices_with_missing_gaps(conn: Connection) -> list[str]:
    """Every device that has a missing range."""
    return list(
        conn.sa.execute(select(g.c.device_id).where(g.c.state == "missing").distinct()).scalars()
    )


def due_gaps(
    conn: Connection, seen_before: float, requested_before: float, max_requests: int
) -> list[tuple[str, int, int]]:
    """(device_id, seq_first, seq_last) of missing ranges of online devices first seen by
    `seen_before`, not asked since `requested_before`, asked fewer than max_requests times;
    by device and seq."""
    rows = conn.sa.execute(
        select(g.c.device_id, g.c.seq_first, g.c.seq_last)
        .join(devices, and_(devices.c.id == g.c.device_id, devices.c.online == 1))
        .where(
            g.c.state == "missing",
            g.c.first_seen <= seen_before,
            or_(g.c.last_requested.is_(None), g.c.last_requested <= requested_before),
            g.c.requests < max_requests,
        )
        .order_by(g.c.device_id, g.c.seq_first)
    )
    return [(d, int(a), int(b)) for d, a, b in rows]


def expired_gaps(
    conn: Connection, max_requests: int, requested_before: float
) -> list[tuple[str, int, int, int]]:
    """(device_id, seq_first, seq_last, requests) of missing ranges asked max_requests times,
    the last time by `requested_before`."""
    rows = conn.sa.execute(
        select(g.c.device_id, g.c.seq_first, g.c.seq_last, g.c.requests).where(
            g.c.state == "missing",
            g.c.requests >= max_requests,
            g.c.last_requested <= requested_before,
        )
    )
    return [(d, int(a), int(b), int(n)) for d, a, b, n in rows]


def mark_gap_lost(conn: Connection, device_id: str, seq_first: int, reason: str) -> None:
    """Give a missing range up as lost, saying why."""
    conn.sa.execute(
        update(g)
        .where(g.c.device_id == device_id, g.c.seq_first == seq_first)
        .values(state="lost", reason=reason)
    )


def add_lost(conn: Connection, device_id: str, count: int) -> None:
    """Count `count` more records of a device lost."""
    conn.sa.execute(
        update(tc).where(tc.c.device_id == device_id).values(lost=tc.c.lost + count)
    )


def refresh_contiguous(conn: Connection, device_id: str) -> None:
    """contiguous = one below the lowest missing seq, or highest when nothing is missing."""
    lowest = (
        select(func.min(g.c.seq_first) - 1)
        .where(g.c.device_id == device_id, g.c.state == "missing")
        .scalar_subquery()
    )
    conn.sa.execute(
        update(tc)
        .where(tc.c.device_id == device_id)
        .values(contiguous=func.coalesce(lowest, tc.c.highest))
    )


def mark_requested(
    conn: Connection, device_id: str, ranges: Iterable[tuple[int, int]], now: float
) -> None:
    """The missing gaps of a device overlapping any (first, last) range were asked for now."""
    params = [{"lo": first, "hi": last} for first, last in ranges]
    if params:
        conn.sa.execute(
            update(g)
            .where(
                g.c.device_id == device_id,
                g.c.state == "missing",
                g.c.seq_first <= bindparam("hi"),
                g.c.seq_last >= bindparam("lo"),
            )
            .values(last_requested=now, requests=g.c.requests + 1),
            params,
        )

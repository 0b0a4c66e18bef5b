"""Telemetry ingest, gaps and resend bookkeeping (controller/fleet/telemetry/store.py).

The batch paths read and write a whole drained batch in a handful of statements; the raw
record insert, one row per record, is compiled once per dialect and run with plain tuples.
"""

from __future__ import annotations

import functools
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
from controller.storage.queries import (
    MAX_SQL_PARAMS,
    Prepared,
    dialect_insert,
    prepared_upsert,
    upsert,
)
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


_CURSORS_OF = Prepared(
    lambda dialect: select(tc.c.device_id, tc.c.highest).where(
        tc.c.device_id.in_(bindparam("keys", expanding=True))
    )
)


def _floor2(n: int) -> int:
    """The largest power of two <= n (at least 1): a part that, padded, stays within n."""
    return 1 << max(n.bit_length() - 1, 0)


def _width(n: int) -> int:
    """The statement width for n values: the next power of two, so a batch of any size uses
    one of ~10 compiled statements (each width is compiled once; repeats change nothing in an
    IN list or an OR)."""
    return 1 << max(n - 1, 0).bit_length()


def cursor_highest(conn: Connection, device_ids: Sequence[str]) -> dict[str, int]:
    """The highest seq stored per device, for the devices that have a cursor."""
    out: dict[str, int] = {}
    step = _floor2(MAX_SQL_PARAMS)
    for i in range(0, len(device_ids), step):
        part = device_ids[i : i + step]
        rows = _CURSORS_OF.execute_in(conn, part)
        out.update((d, int(h)) for d, h in rows)
    return out


def _any_range(ranges: Iterable[tuple[str, int, int]]) -> list[list[tuple[str, int, int]]]:
    """`ranges` deduplicated, in parts of at most MAX_SQL_PARAMS parameters (three a range,
    padded to a power of two)."""
    terms = list(dict.fromkeys(ranges))
    step = _floor2(MAX_SQL_PARAMS // 3)
    return [terms[i : i + step] for i in range(0, len(terms), step)]


def _ranges(n: int) -> list[tuple[Any, Any, Any]]:
    """n (device, lo, hi) triples of bound parameters, for an OR compiled once per length."""
    return [(bindparam(f"d{i}"), bindparam(f"lo{i}"), bindparam(f"hi{i}")) for i in range(n)]


@functools.lru_cache(maxsize=256)
def _gaps_in(n: int) -> Prepared:
    """(device_id, *GAP_COLUMNS) of the gaps overlapping any of n (device, lo, hi)."""
    columns = [g.c.device_id, *(g.c[c] for c in GAP_COLUMNS)]
    where = or_(
        *(and_(g.c.device_id == d, g.c.seq_last >= lo, g.c.seq_first <= hi)
          for d, lo, hi in _ranges(n))
    )  # fmt: skip
    stmt = select(*columns).where(where)
    return Prepared(lambda dialect: stmt)


@functools.lru_cache(maxsize=256)
def _seqs_in(n: int) -> Prepared:
    """(device_id, seq) of stored records within any of n (device, lo, hi)."""
    where = or_(*(and_(t.c.device_id == d, t.c.seq.between(lo, hi)) for d, lo, hi in _ranges(n)))
    stmt = select(t.c.device_id, t.c.seq).where(where)
    return Prepared(lambda dialect: stmt)


def _flat(part: Sequence[tuple[str, int, int]]) -> tuple[Any, ...]:
    """(device, lo, hi) triples padded to their width (repeating the last) as the positional
    row of _ranges."""
    padded = [*part, *[part[-1]] * (_width(len(part)) - len(part))]
    return tuple(x for triple in padded for x in triple)


def gaps_overlapping(
    conn: Connection, windows: Iterable[tuple[str, int, int]]
) -> list[tuple[Any, ...]]:
    """(device_id, *GAP_COLUMNS) of the gaps overlapping any (device, lo, hi) window."""
    rows: list[tuple[Any, ...]] = []
    for part in _any_range(windows):
        rows += map(tuple, _gaps_in(_width(len(part))).execute_row(conn, _flat(part)))
    return rows


def stored_seqs(conn: Connection, ranges: Iterable[tuple[str, int, int]]) -> set[tuple[str, int]]:
    """(device_id, seq) of the stored records within any (device, lo, hi) range."""
    found: set[tuple[str, int]] = set()
    for part in _any_range(ranges):
        rows = _seqs_in(_width(len(part))).execute_row(conn, _flat(part))
        found.update((d, int(s)) for d, s in rows)
    return found


_DELETE_GAP = Prepared(
    lambda dialect: delete(g).where(
        g.c.device_id == bindparam("d"), g.c.seq_first == bindparam("s")
    ),
    ("d", "s"),
)
_INSERT_GAP = Prepared(
    lambda dialect: insert(g).values({c: bindparam(c) for c in ("device_id", *GAP_COLUMNS)}),
    ("device_id", *GAP_COLUMNS),
)


def delete_gaps(conn: Connection, keys: Sequence[tuple[str, int]]) -> None:
    """Delete the gaps (device_id, seq_first)."""
    _DELETE_GAP.executemany(conn, keys)


def insert_gaps(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert gaps: tuples of device_id and GAP_COLUMNS."""
    _INSERT_GAP.executemany(conn, rows)


def _greatest(excluded: Any, column: str) -> ColumnElement[Any]:
    """The larger of the stored and the inserted value, NULL-aware."""
    old, new = tc.c[column], excluded[column]
    return case((or_(old.is_(None), new > old), new), else_=old)


_CURSOR = Prepared(
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
        _CURSOR.executemany(conn, rows)


_PROFILES_OF = Prepared(
    lambda dialect: select(devices.c.id, devices.c.profile).where(
        devices.c.id.in_(bindparam("keys", expanding=True))
    )
)


def device_profiles(conn: Connection, device_ids: Sequence[str]) -> dict[str, str | None]:
    """The profile of each registered device among `device_ids`."""
    out: dict[str, str | None] = {}
    step = _floor2(MAX_SQL_PARAMS)
    for i in range(0, len(device_ids), step):
        part = device_ids[i : i + step]
        out.update(tuple(r) for r in _PROFILES_OF.execute_in(conn, part))
    return out


_TOTAL_COLUMNS = ("profile", "model_sha256", "served", "latency_sum_ms", *BUCKET_NAMES)
_TOTALS = prepared_upsert(
    lt,
    ["profile", "model_sha256"],
    _TOTAL_COLUMNS,
    lambda ex: {c: lt.c[c] + ex[c] for c in _TOTAL_COLUMNS[2:]},
)


def add_latency_totals(conn: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Add to the profile × model totals: tuples (profile, model_sha256, served,
    latency_sum_ms, *buckets), summed into existing rows. Callers sort them by key, so two
    replicas upserting the same keys never deadlock."""
    _TOTALS.executemany(conn, rows)


def add_latency_sums(conn: Connection, key: tuple[str, str], sums: Sequence[float]) -> None:
    """latency_sum_ms + s1, then + s2, …: one UPDATE per term in one executemany, in this
    order, so the float total rounds exactly as message-by-message ingest would."""
    _ADD_SUM.executemany(conn, [(s, key[0], key[1]) for s in sums])


_ADD_SUM = Prepared(
    lambda dialect: update(lt)
    .where(lt.c.profile == bindparam("p"), lt.c.model_sha256 == bindparam("m"))
    .values(latency_sum_ms=lt.c.latency_sum_ms + bindparam("s", type_=lt.c.latency_sum_ms.type)),
    ("s", "p", "m"),
)


_TOUCH = Prepared(
    lambda dialect: update(devices)
    .where(
        devices.c.id == bindparam("d"),
        or_(devices.c.last_seen.is_(None), devices.c.last_seen < bindparam("seen")),
    )
    .values(last_seen=bindparam("seen")),
)


def touch_devices(conn: Connection, device_ids: Sequence[str], seen: float) -> None:
    """last_seen = `seen` for these devices, never moving it backwards."""
    _TOUCH.executemany(conn, [{"d": d, "seen": seen} for d in device_ids])


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

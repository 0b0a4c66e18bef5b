"""The fleet rollup's rows for a batch of new records: the sum form per minute × profile ×
model, and first/last seen per device × model (docs/telemetry.md, "Fleet rollup").

Ingest writes them in the records' transaction, so the rollup always equals what the records
say; the fleet report and series then read minutes × series rows instead of every record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.protocol import BUCKET_COUNT, TelemetryRecord
from controller.storage.db import Connection
from controller.storage.queries import fleet as q
from controller.storage.queries.telemetry import AGG_FIELDS, MAX_FIELDS, MIN_FIELDS, SUM_FIELDS

_N_SUM, _N_MAX = len(SUM_FIELDS), len(MAX_FIELDS)
_N_MIN = len(MIN_FIELDS)
_NO_BUCKETS = (0,) * BUCKET_COUNT
# Where each kind of field sits in a sum-form tuple (AGG_FIELDS order).
_MAX_AT = range(_N_SUM, _N_SUM + _N_MAX)
_MIN_AT = range(_N_SUM + _N_MAX, _N_SUM + _N_MAX + _N_MIN)
assert (*SUM_FIELDS, *MAX_FIELDS, *MIN_FIELDS) == AGG_FIELDS
assert SUM_FIELDS[4 + BUCKET_COUNT :] == (
    "invocations", "throughput_sum", "rss_sum", "cpu_sum", "temperature_sum", "temperature_n",
    "power_sum", "power_interval_s", "energy_sum", "energy_served", "cache_hits", "errors",
)  # fmt: skip
assert MAX_FIELDS + MIN_FIELDS == (
    "max_ms", "peak_rss_mb", "temperature_max", "power_source", "power_estimated",
    "dropped_total", "seq_last", "ts_last", "seq_first", "ts_first",
)  # fmt: skip


def record_sums(r: TelemetryRecord) -> list[Any]:
    """One record in sum form, AGG_FIELDS order: what raw_sums() computes in SQL."""
    s = r.served
    served = s.count if s else 0
    mean = (s.mean_ms if s else None) or 0.0
    interval = r.interval_s
    temp, power, energy = r.temperature_c, r.power_w, r.energy_mj_per_inference
    return [
        1, interval, served, served * mean, *(s.buckets if s else _NO_BUCKETS),
        r.invocations, r.throughput_ips * interval, r.rss_mb * interval,
        r.cpu_percent * interval, temp or 0.0, 0 if temp is None else 1,
        (power or 0.0) * interval, 0.0 if power is None else interval,
        (energy or 0.0) * served, 0 if energy is None else served, r.cache_hits, r.errors,
        s.max_ms if s else None, r.peak_rss_mb, temp, r.power_source,
        1 if r.power_estimated else 0, r.dropped_total, r.seq, r.ts, r.seq, r.ts,
    ]  # fmt: skip


def _fold(rows: list[list[Any]]) -> list[Any]:
    """Merge sum-form rows column by column: sums add, maxima and minima skip NULLs."""
    if len(rows) == 1:
        return rows[0]
    columns = list(zip(*rows, strict=True))
    out: list[Any] = [sum(c) for c in columns[:_N_SUM]]
    for c in columns[_N_SUM : _N_SUM + _N_MAX]:
        present = [v for v in c if v is not None]
        out.append(max(present) if present else None)
    out += [min(c) for c in columns[_N_SUM + _N_MAX :]]  # seq and ts: never NULL
    return out


def _minute(ts: float) -> int:
    """The whole minute a ts falls in (as the telemetry table's `minute` column)."""
    return int(ts // 60) * 60


def add_batch(
    tx: Connection,
    new: Sequence[tuple[str, Sequence[TelemetryRecord]]],
    profiles: dict[str, str | None],
) -> None:
    """Add the batch's new records (device, records; before they are inserted) to the rollup.

    A device counts in a minute × model the first time a record of it arrives for it. The
    stored first and last minute per device × model decide that for records outside that span
    or in its end minutes (every live record); only a record strictly inside it (a resend) is
    looked up among the stored rows. A device × model row is written only when it changes (a
    new minute, profile or power source): about once a minute per device, not per record.
    """
    devices = [d for d, records in new if records]
    if not devices:
        return
    spans = q.device_model_spans(tx, list(dict.fromkeys(devices)))
    unsure: dict[str, tuple[int, int]] = {}
    for device, records in new:
        for r in records:
            span = spans.get((device, r.model_sha256 or ""))
            if span is not None and span[1] < (m := _minute(r.ts)) < span[2]:
                lo, hi = unsure.get(device, (m, m))
                unsure[device] = (min(lo, m), max(hi, m))
    stored = q.present_minutes(tx, sorted((d, lo, hi) for d, (lo, hi) in unsure.items()))
    seen: set[tuple[str, int, str]] = set()
    minutes: dict[tuple[int, str, str], list[list[Any]]] = {}
    counts: dict[tuple[int, str, str], int] = {}
    pairs: dict[tuple[str, str], tuple[str, int, int, str]] = {}
    for device, records in new:
        profile = profiles.get(device) or ""
        for r in records:
            minute, model = _minute(r.ts), r.model_sha256 or ""
            key = (minute, profile, model)
            mark = (device, minute, model)
            # Stored before the batch (what `stored` was looked up for); earlier in it: `seen`.
            before = spans.get((device, model))
            first = mark not in seen and (
                before is None
                or not before[1] <= minute <= before[2]
                or (minute != before[1] and minute != before[2] and mark not in stored)
            )
            span = pairs.get((device, model)) or before
            seen.add(mark)
            rows = minutes.get(key)
            if rows is None:
                minutes[key] = [record_sums(r)]
                counts[key] = int(first)
            else:
                rows.append(record_sums(r))
                counts[key] += int(first)
            if span is None:
                pairs[(device, model)] = (profile, minute, minute, r.power_source)
            elif (
                minute < span[1] or minute > span[2] or profile != span[0]
                or r.power_source > span[3]
            ):  # fmt: skip
                pairs[(device, model)] = (
                    profile, min(span[1], minute), max(span[2], minute),
                    max(span[3], r.power_source),
                )  # fmt: skip
    # In key order: replicas upserting the same keys take row locks in one order.
    merged = [(*k, counts[k], *_fold(rows)) for k, rows in sorted(minutes.items())]
    q.add_fleet_minutes(tx, merged)
    q.add_device_models(tx, [(*k, *v) for k, v in sorted(pairs.items())])
    _add_late_hours(tx, merged)


def _add_late_hours(tx: Connection, merged: list[tuple[Any, ...]]) -> None:
    """Add the batch's minutes below the fold mark (late: resends, a spool drained after an
    outage) to their folded hours, with `devices` the most of one minute as stored now (the
    minute rows are this batch's, locked until commit). Callers hold the fold lock shared."""
    mark = q.fold_mark(tx)
    late = [row for row in merged if mark is not None and row[0] < mark]
    if not late:
        return
    stored = q.minute_devices(tx, sorted({row[0] for row in late}))
    hours: dict[tuple[int, str, str], list[list[Any]]] = {}
    most: dict[tuple[int, str, str], int] = {}
    for minute, profile, model, _count, *sums in late:
        key = (minute - minute % q.HOUR_S, profile, model)
        hours.setdefault(key, []).append(sums)
        most[key] = max(most.get(key, 0), stored[(minute, profile, model)])
    q.add_fleet_hours(tx, [(*k, most[k], *_fold(rows)) for k, rows in sorted(hours.items())])

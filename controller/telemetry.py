"""Telemetry store: exactly-once ingest, gap tracking and resend requests, per-minute compaction."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from agent.protocol import BUCKET_COUNT, SeqRange, Telemetry, TelemetryRecord
from controller.db import Database
from controller.reports import (
    AGG_FIELDS,
    BUCKET_COLUMNS,
    MAX_FIELDS,
    MIN_FIELDS,
    SUM_FIELDS,
    aggregate_sql,
    column_names,
    percentile_from_buckets,
    raw_sums_sql,
    summarize,
)

# Raw rows folded into per-minute aggregates per compact() call: compaction measured 15-40 us per
# row here, so 5,000 rows hold the writer lock 0.1-0.2 s: short enough beside live ingest.
COMPACT_BATCH_ROWS = 5_000
# Most ranges one resend_telemetry command may carry (agent/protocol/messages.py, Command).
MAX_RESEND_RANGES = 200
# Seconds per day, for retention given in days.
DAY_S = 86_400.0

# Reason stored with gaps the device declared unavailable (dropped from its spool).
LOST_UNAVAILABLE = "unavailable on the device"


@dataclass(frozen=True)
class IngestResult:
    """What one Telemetry message changed: counts for the service's stats and metrics."""

    stored: int
    duplicates: int
    gaps_opened: int
    gaps_closed: int
    lost: int
    # Sequence numbers counted lost earlier (no answer to resends) that arrived after all.
    recovered: int = 0


@dataclass
class _Gap:
    """A range of sequence numbers the controller has not got: missing (ask) or lost (don't)."""

    seq_first: int
    seq_last: int
    state: str
    first_seen: float
    last_requested: float | None = None
    requests: int = 0
    reason: str = ""

    def row(self) -> tuple[Any, ...]:
        """The columns after device_id, as stored (the field order is the column order)."""
        return dataclasses.astuple(self)


def _take(gaps: list[_Gap], first: int, last: int, states: set[str]) -> list[tuple[_Gap, int, int]]:
    """Cut [first, last] out of the gaps in `states`; return (gap, lo, hi) for each overlap."""
    taken: list[tuple[_Gap, int, int]] = []
    kept: list[_Gap] = []
    for g in gaps:
        if g.state not in states or g.seq_last < first or g.seq_first > last:
            kept.append(g)
            continue
        lo, hi = max(first, g.seq_first), min(last, g.seq_last)
        taken.append((g, lo, hi))
        if g.seq_first < lo:
            kept.append(dataclasses.replace(g, seq_last=lo - 1))
        if hi < g.seq_last:
            kept.append(dataclasses.replace(g, seq_first=hi + 1))
    gaps[:] = sorted(kept, key=lambda g: g.seq_first)
    return taken


def _coalesce_lost(gaps: list[_Gap]) -> None:
    """Join adjacent lost ranges with the same reason, so lost rows do not pile up."""
    out: list[_Gap] = []
    for g in sorted(gaps, key=lambda g: g.seq_first):
        prev = out[-1] if out else None
        if (
            prev is not None
            and prev.state == g.state == "lost"
            and prev.reason == g.reason
            and prev.seq_last + 1 == g.seq_first
        ):
            prev.seq_last = g.seq_last
        else:
            out.append(g)
    gaps[:] = out


_INSERT_COLUMNS = (
    "device_id, seq, ts, minute, received, model_sha256, interval_s, served, p50_ms, p90_ms, "
    f"p99_ms, mean_ms, max_ms, {', '.join(BUCKET_COLUMNS)}, invocations, throughput_ips, rss_mb, "
    "peak_rss_mb, cpu_percent, temperature_c, power_w, energy_mj_per_inference, power_source, "
    "power_estimated, cache_hits, errors, dropped_total"
)
_INSERT_SQL = (
    f"INSERT INTO telemetry ({_INSERT_COLUMNS}) "
    f"VALUES ({', '.join('?' * len(_INSERT_COLUMNS.split(',')))}) ON CONFLICT DO NOTHING"
)
_TOTALS_SQL = (
    "INSERT INTO telemetry_latency_totals (profile, model_sha256, served, latency_sum_ms, "
    f"{', '.join(BUCKET_COLUMNS)}) VALUES ({', '.join('?' * (4 + BUCKET_COUNT))}) "
    "ON CONFLICT (profile, model_sha256) DO UPDATE SET "
    + ", ".join(
        f"{c} = telemetry_latency_totals.{c} + excluded.{c}"
        for c in ("served", "latency_sum_ms", *BUCKET_COLUMNS)
    )
)


def _max_sql(table: str, column: str, wins: str = ">") -> str:
    """GREATEST (LEAST with wins="<") in SQL both SQLite and PostgreSQL run, NULL-aware."""
    return (
        f"CASE WHEN {table}.{column} IS NULL OR excluded.{column} {wins} {table}.{column} "
        f"THEN excluded.{column} ELSE {table}.{column} END"
    )


_MINUTE_COLUMNS = ("device_id", "minute", "model_sha256", *AGG_FIELDS)
_COMPACT_SQL = (
    f"INSERT INTO telemetry_minute ({', '.join(_MINUTE_COLUMNS)}) "
    f"SELECT device_id, minute, model_sha256, {aggregate_sql()} FROM ("
    + raw_sums_sql("{where}")
    + ") AS raw GROUP BY device_id, minute, model_sha256 "
    "ON CONFLICT (device_id, minute, model_sha256) DO UPDATE SET "
    + ", ".join(
        [f"{f} = telemetry_minute.{f} + excluded.{f}" for f in SUM_FIELDS]
        + [f"{f} = {_max_sql('telemetry_minute', f)}" for f in MAX_FIELDS]
        + [f"{f} = {_max_sql('telemetry_minute', f, '<')}" for f in MIN_FIELDS]
    )
)


# TelemetryRecord fields stored as they are, in _INSERT_COLUMNS order after the histogram.
_RECORD_TAIL = column_names(
    "invocations throughput_ips rss_mb peak_rss_mb cpu_percent temperature_c power_w "
    "energy_mj_per_inference power_source power_estimated cache_hits errors dropped_total"
)


def _record_row(device_id: str, r: TelemetryRecord, received: float) -> tuple[Any, ...]:
    """One telemetry table row for a record, columns in _INSERT_COLUMNS order."""
    s = r.served
    latency = (
        (s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.mean_ms, s.max_ms, *s.buckets)
        if s
        else (0, None, None, None, None, None, *(0,) * BUCKET_COUNT)
    )
    head = (device_id, r.seq, r.ts, int(r.ts // 60) * 60, received, r.model_sha256, r.interval_s)
    tail = tuple(getattr(r, name) for name in _RECORD_TAIL)
    return (*head, *latency, *tail[:-4], 1 if r.power_estimated else 0, *tail[-3:])


class TelemetryStore:
    """Stores device telemetry exactly once and knows which sequence numbers are still missing."""

    def __init__(self, db: Database) -> None:
        """Use the caller's connection (and its transactions)."""
        self.db = db
        # Gaps marked lost by the last due_resends() call (no answer after max_requests).
        self.last_expired = 0

    # ------------------------------------------------------------------ ingest
    def ingest(self, message: Telemetry, received: float) -> IngestResult:
        """Store new records once, update gaps and cursor; runs in (or as) a transaction."""
        device = message.device_id
        with self.db.transaction() as tx:
            cur = tx.execute(
                "SELECT highest FROM telemetry_cursor WHERE device_id = ?", (device,)
            ).fetchone()
            highest = int(cur[0]) if cur else 0
            old_highest = highest
            items: list[tuple[int, int, TelemetryRecord | None]] = [
                (r.seq, r.seq, r) for r in message.records
            ] + [(u.first, u.last, None) for u in message.unavailable]
            items.sort(key=lambda item: (item[0], item[2] is None))
            lo = items[0][0]
            hi = min(max(item[1] for item in items), highest)
            original: list[_Gap] = []
            if lo <= hi:
                original = [
                    _Gap(*row)
                    for row in tx.execute(
                        "SELECT seq_first, seq_last, state, first_seen, last_requested, "
                        "requests, reason FROM telemetry_gaps WHERE device_id = ? "
                        "AND seq_last >= ? AND seq_first <= ? ORDER BY seq_first",
                        (device, lo, hi),
                    )
                ]
            gaps = [dataclasses.replace(g) for g in original]
            new: list[TelemetryRecord] = []
            opened = closed = lost = recovered = 0
            for first, last, record in items:
                if record is not None:
                    if first > highest:
                        if first > highest + 1:
                            gaps.append(_Gap(highest + 1, first - 1, "missing", received))
                            opened += 1
                        highest = first
                        new.append(record)
                        continue
                    taken = _take(gaps, first, first, {"missing", "lost"})
                    if taken:
                        g = taken[0][0]
                        new.append(record)
                        if g.state == "lost":
                            recovered += 1
                        elif g.seq_first == g.seq_last:
                            closed += 1
                    continue
                # unavailable [first, last]: missing seqs below `highest` become lost...
                for g, a, b in _take(gaps, first, min(last, highest), {"missing"}):
                    gaps.append(
                        _Gap(a, b, "lost", g.first_seen, g.last_requested, g.requests,
                             LOST_UNAVAILABLE)
                    )  # fmt: skip
                    lost += b - a + 1
                # ...and seqs the controller never heard of are lost from the start.
                if last > highest:
                    start = max(first, highest + 1)
                    if start > highest + 1:
                        gaps.append(_Gap(highest + 1, start - 1, "missing", received))
                        opened += 1
                    gaps.append(_Gap(start, last, "lost", received, reason=LOST_UNAVAILABLE))
                    lost += last - start + 1
                    highest = last
                gaps.sort(key=lambda g: g.seq_first)
            _coalesce_lost(gaps)
            stored = self._insert(tx, device, new, old_highest, received)
            self._write_gaps(tx, device, original, gaps)
            missing_low = tx.execute(
                "SELECT MIN(seq_first) FROM telemetry_gaps WHERE device_id = ? "
                "AND state = 'missing'",
                (device,),
            ).fetchone()[0]
            contiguous = highest if missing_low is None else int(missing_low) - 1
            duplicates = len(message.records) - stored
            tx.execute(
                "INSERT INTO telemetry_cursor (device_id, highest, contiguous, stored, duplicates, "
                "lost, dropped_total, last_ts, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET highest = excluded.highest, "
                "contiguous = excluded.contiguous, "
                "stored = telemetry_cursor.stored + excluded.stored, "
                "duplicates = telemetry_cursor.duplicates + excluded.duplicates, "
                "lost = telemetry_cursor.lost + excluded.lost, "
                f"dropped_total = {_max_sql('telemetry_cursor', 'dropped_total')}, "
                f"last_ts = {_max_sql('telemetry_cursor', 'last_ts')}, "
                "updated = excluded.updated",
                (
                    device,
                    highest,
                    contiguous,
                    stored,
                    duplicates,
                    lost - recovered,
                    max((r.dropped_total for r in message.records), default=0),
                    max((r.ts for r in message.records), default=None),
                    received,
                ),
            )
        return IngestResult(stored, duplicates, opened, closed, lost, recovered)

    def _insert(
        self, tx: Any, device: str, new: list[TelemetryRecord], old_highest: int, received: float
    ) -> int:
        """Insert the new records (executemany) and add their latencies to the running totals."""
        if not new:
            return 0
        refills = [r.seq for r in new if r.seq <= old_highest]
        if refills:  # belt and braces: a refill that is somehow already stored is not re-counted
            present = {
                seq
                for (seq,) in tx.execute(
                    "SELECT seq FROM telemetry WHERE device_id = ? AND seq BETWEEN ? AND ?",
                    (device, min(refills), max(refills)),
                )
            }
            new = [r for r in new if r.seq not in present]
        tx.executemany(_INSERT_SQL, [_record_row(device, r, received) for r in new])
        profile_row = tx.execute("SELECT profile FROM devices WHERE id = ?", (device,)).fetchone()
        profile = (profile_row[0] if profile_row else None) or ""
        totals: dict[str, list[float]] = {}
        for r in new:
            if r.served is None or r.served.count == 0:
                continue
            acc = totals.setdefault(r.model_sha256 or "", [0, 0.0] + [0] * BUCKET_COUNT)
            acc[0] += r.served.count
            acc[1] += r.served.count * r.served.mean_ms
            for i, n in enumerate(r.served.buckets):
                acc[2 + i] += n
        tx.executemany(_TOTALS_SQL, [(profile, sha, *acc) for sha, acc in totals.items()])
        return len(new)

    @staticmethod
    def _write_gaps(tx: Any, device: str, before: list[_Gap], after: list[_Gap]) -> None:
        """Write only the gap rows that changed (delete removed ones first, then insert)."""
        old = {g.row() for g in before}
        now_rows = {g.row() for g in after}
        gone = [(device, row[0]) for row in old - now_rows]
        added = [(device, *row) for row in now_rows - old]
        tx.executemany("DELETE FROM telemetry_gaps WHERE device_id = ? AND seq_first = ?", gone)
        tx.executemany(
            "INSERT INTO telemetry_gaps (device_id, seq_first, seq_last, state, first_seen, "
            "last_requested, requests, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            added,
        )

    # ------------------------------------------------------------------ resends
    def due_resends(
        self,
        now: float,
        grace_s: float = 30.0,
        retry_s: float = 60.0,
        max_requests: int = 10,
    ) -> dict[str, list[SeqRange]]:
        """Missing ranges to ask online devices for: older than grace_s, not asked in retry_s.

        Ranges asked max_requests times without an answer are marked lost first (their count is
        left in `last_expired`). Only online devices are asked, so an outage does not use up
        the attempts of a device that will drain its spool when it is back.
        """
        self.last_expired = self._expire(now, retry_s, max_requests)
        due: dict[str, list[SeqRange]] = {}
        for device, first, last in self.db.conn.execute(
            "SELECT g.device_id, g.seq_first, g.seq_last FROM telemetry_gaps g "
            "JOIN devices d ON d.id = g.device_id AND d.online = 1 "
            "WHERE g.state = 'missing' AND g.first_seen <= ? "
            "AND (g.last_requested IS NULL OR g.last_requested <= ?) AND g.requests < ? "
            "ORDER BY g.device_id, g.seq_first",
            (now - grace_s, now - retry_s, max_requests),
        ):
            ranges = due.setdefault(device, [])
            if len(ranges) < MAX_RESEND_RANGES:
                ranges.append(SeqRange(int(first), int(last)))
        return due

    def _expire(self, now: float, retry_s: float, max_requests: int) -> int:
        """Mark lost the missing ranges asked max_requests times, retry_s ago; count seqs."""
        with self.db.transaction() as tx:
            rows = tx.execute(
                "SELECT device_id, seq_first, seq_last, requests FROM telemetry_gaps "
                "WHERE state = 'missing' AND requests >= ? AND last_requested <= ?",
                (max_requests, now - retry_s),
            ).fetchall()
            for device, first, last, requests in rows:
                tx.execute(
                    "UPDATE telemetry_gaps SET state = 'lost', reason = ? "
                    "WHERE device_id = ? AND seq_first = ?",
                    (f"no answer after {requests} resend requests", device, first),
                )
                tx.execute(
                    "UPDATE telemetry_cursor SET lost = lost + ? WHERE device_id = ?",
                    (last - first + 1, device),
                )
            for device in {row[0] for row in rows}:
                self._refresh_contiguous(tx, device)
        return sum(last - first + 1 for _, first, last, _ in rows)

    @staticmethod
    def _refresh_contiguous(tx: Any, device: str) -> None:
        """contiguous = one below the lowest missing seq, or highest when nothing is missing."""
        tx.execute(
            "UPDATE telemetry_cursor SET contiguous = COALESCE((SELECT MIN(seq_first) - 1 FROM "
            "telemetry_gaps WHERE device_id = ? AND state = 'missing'), highest) "
            "WHERE device_id = ?",
            (device, device),
        )

    def mark_requested(self, device_id: str, ranges: Iterable[SeqRange], now: float) -> None:
        """Record that the missing gaps overlapping `ranges` were asked for at `now`."""
        with self.db.transaction() as tx:
            tx.executemany(
                "UPDATE telemetry_gaps SET last_requested = ?, requests = requests + 1 "
                "WHERE device_id = ? AND state = 'missing' AND seq_first <= ? AND seq_last >= ?",
                [(now, device_id, r.last, r.first) for r in ranges],
            )

    def gaps(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """Gap rows (missing and lost), for one device or all."""
        where, params = ("WHERE device_id = ?", (device_id,)) if device_id else ("", ())
        return self.db.query(
            f"SELECT * FROM telemetry_gaps {where} ORDER BY device_id, seq_first", params
        )

    def cursor(self, device_id: str) -> dict[str, Any] | None:
        """The device's cursor row (highest, contiguous, counters), or None."""
        return self.db.query_one("SELECT * FROM telemetry_cursor WHERE device_id = ?", (device_id,))

    # ------------------------------------------------------------------ reading
    def records(
        self,
        device_id: str,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """The newest `limit` rows in [since, until), oldest first, raw and per-minute merged."""
        lo = -math.inf if since is None else since
        hi = math.inf if until is None else until
        raw = self.db.query(
            "SELECT * FROM telemetry WHERE device_id = ? AND ts >= ? AND ts < ? "
            "ORDER BY ts DESC LIMIT ?",
            (device_id, lo, hi, limit),
        )
        minutes = self.db.query(
            "SELECT * FROM telemetry_minute WHERE device_id = ? AND minute + 60 > ? "
            "AND minute < ? ORDER BY minute DESC LIMIT ?",
            (device_id, lo, hi, limit),
        )
        rows = [_raw_record(r) for r in raw] + [_minute_record(m) for m in minutes]
        rows.sort(key=lambda r: (r["ts"], r["seq_first"]))
        return rows[-limit:] if limit > 0 else []

    def summary(self) -> dict[str, int]:
        """Totals for the service stats: stored, duplicates, lost, open gaps and missing seqs."""
        totals = self.db.query_one(
            "SELECT COALESCE(SUM(stored), 0) AS stored, COALESCE(SUM(duplicates), 0) AS "
            "duplicates, COALESCE(SUM(lost), 0) AS lost, COUNT(*) AS devices "
            "FROM telemetry_cursor"
        )
        gaps = self.db.query_one(
            "SELECT COUNT(*) AS gaps_open, COALESCE(SUM(seq_last - seq_first + 1), 0) AS missing "
            "FROM telemetry_gaps WHERE state = 'missing'"
        )
        return {k: int(v) for k, v in {**(totals or {}), **(gaps or {})}.items()}

    # ------------------------------------------------------------------ retention
    def compact(
        self,
        now: float,
        raw_days: float = 7.0,
        batch_rows: int = COMPACT_BATCH_ROWS,
        minute_days: float | None = None,
    ) -> int:
        """Fold up to `batch_rows` raw rows older than raw_days into per-minute rows; delete them.

        Additive merges make it idempotent and safe to repeat: a minute that already has an
        aggregate (a late resend) gets the new rows added. Returns raw rows compacted (call again
        until it returns 0). With minute_days, minute rows older than that are deleted too.
        """
        cutoff = now - raw_days * DAY_S
        with self.db.transaction() as tx:
            if minute_days is not None:
                tx.execute(
                    "DELETE FROM telemetry_minute WHERE minute < ?",
                    (now - minute_days * DAY_S,),
                )
            oldest = tx.execute("SELECT MIN(ts) FROM telemetry").fetchone()[0]
            if oldest is None or oldest >= cutoff:
                return 0
            bound = tx.execute(
                "SELECT ts FROM telemetry WHERE ts < ? ORDER BY ts LIMIT 1 OFFSET ?",
                (cutoff, max(batch_rows, 1) - 1),
            ).fetchone()
            # A range closed on both sides, so the planner takes the ts index (one-sided, it
            # may scan the whole table in device order for the GROUP BY instead).
            where, params = (
                ("ts >= ? AND ts <= ?", (oldest, bound[0]))
                if bound is not None
                else ("ts >= ? AND ts < ?", (oldest, cutoff))
            )
            tx.execute(_COMPACT_SQL.replace("{where}", where), params)
            done = tx.execute(f"DELETE FROM telemetry WHERE {where}", params).rowcount
        return int(done)


def _raw_record(row: dict[str, Any]) -> dict[str, Any]:
    """A raw telemetry row for display: device-exact percentiles, p95 from its buckets."""
    buckets = [int(row.pop(b)) for b in BUCKET_COLUMNS]
    p95 = percentile_from_buckets(buckets, 0.95, row["max_ms"])
    if p95 is not None:  # the exact p90 and p99 bracket p95: clamp the estimate into them
        p95 = min(max(p95, row["p90_ms"]), row["p99_ms"])
    row.update(
        resolution="raw",
        records=1,
        seq_first=row["seq"],
        seq_last=row["seq"],
        p95_ms=p95,
        buckets=buckets,
        mean_rss_mb=row["rss_mb"],
        power_estimated=bool(row["power_estimated"]),
    )
    return row


def _minute_record(row: dict[str, Any]) -> dict[str, Any]:
    """A per-minute aggregate for display: the same keys as a raw row where they exist."""
    out = summarize(row)
    out.update(
        resolution="minute",
        device_id=row["device_id"],
        ts=float(row["minute"]),
        seq=None,
        seq_first=row["seq_first"],
        seq_last=row["seq_last"],
        model_sha256=row["model_sha256"] or None,
        p90_ms=None,
        rss_mb=out["mean_rss_mb"],
    )
    return out

"""Reading stored telemetry back (records, cursors, gaps, summary) and compacting old records."""


from __future__ import annotations

import math
from typing import Any

from controller.fleet.telemetry.reports import (
    AGG_FIELDS,
    BUCKET_COLUMNS,
    MAX_FIELDS,
    MIN_FIELDS,
    SUM_FIELDS,
    aggregate_sql,
    percentile_from_buckets,
    raw_sums_sql,
    summarize,
)
from controller.storage.db import Database


def max_sql(table: str, column: str, wins: str = ">") -> str:
    """GREATEST (LEAST with wins="<") in SQL both SQLite and PostgreSQL run, NULL-aware."""
    return (
        f"CASE WHEN {table}.{column} IS NULL OR excluded.{column} {wins} {table}.{column} "
        f"THEN excluded.{column} ELSE {table}.{column} END"
    )


# Raw rows folded into per-minute aggregates per compact() call: compaction measured 15-40 us per
# row here, so 5,000 rows hold the writer lock 0.1-0.2 s: short enough beside live ingest.
COMPACT_BATCH_ROWS = 5_000


# Seconds per day, for retention given in days.
DAY_S = 86_400.0


_MINUTE_COLUMNS = ("device_id", "minute", "model_sha256", *AGG_FIELDS)


_COMPACT_SQL = (
    f"INSERT INTO telemetry_minute ({', '.join(_MINUTE_COLUMNS)}) "
    f"SELECT device_id, minute, model_sha256, {aggregate_sql()} FROM ("
    + raw_sums_sql("{where}")
    + ") AS raw GROUP BY device_id, minute, model_sha256 "
    "ON CONFLICT (device_id, minute, model_sha256) DO UPDATE SET "
    + ", ".join(
        [f"{f} = telemetry_minute.{f} + excluded.{f}" for f in SUM_FIELDS]
        + [f"{f} = {max_sql('telemetry_minute', f)}" for f in MAX_FIELDS]
        + [f"{f} = {max_sql('telemetry_minute', f, '<')}" for f in MIN_FIELDS]
    )
)


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


class TelemetryHistory:
    """Reads and compacts what ingest stored (mixin of TelemetryStore; uses self.db)."""

    db: Database  # set by TelemetryStore.__init__

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
        # One snapshot for the fold and the delete: a row another replica commits between them
        # (a late spool drain) is neither folded nor deleted, instead of deleted unfolded.
        with self.db.transaction(repeatable=True) as tx:
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

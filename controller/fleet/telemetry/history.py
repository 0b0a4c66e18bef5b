"""Reading stored telemetry back (records, cursors, gaps, summary) and compacting old records."""


from __future__ import annotations

import math
from typing import Any

from controller.fleet.telemetry.reports import (
    BUCKET_COLUMNS,
    percentile_from_buckets,
    summarize,
)
from controller.storage.db import Database
from controller.storage.queries import fleet as fleet_queries
from controller.storage.queries import telemetry as q

# Raw rows folded into per-minute aggregates per compact() call: compaction measured 15-40 us per
# row here, so 5,000 rows hold the writer lock 0.1-0.2 s: short enough beside live ingest.
COMPACT_BATCH_ROWS = 5_000


# Seconds per day, for retention given in days.
DAY_S = 86_400.0
# Hours are folded once they ended this long ago: records of the hour just ended (a batch
# held a few seconds) still go to minutes only, not through the late path.
FOLD_DELAY_S = 600.0


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
        return q.gaps(self.db.conn, device_id)

    def cursor(self, device_id: str) -> dict[str, Any] | None:
        """The device's cursor row (highest, contiguous, counters), or None."""
        return q.cursor(self.db.conn, device_id)

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
        raw = q.raw_records(self.db.conn, device_id, lo, hi, limit)
        minutes = q.minute_records(self.db.conn, device_id, lo, hi, limit)
        rows = [_raw_record(r) for r in raw] + [_minute_record(m) for m in minutes]
        rows.sort(key=lambda r: (r["ts"], r["seq_first"]))
        return rows[-limit:] if limit > 0 else []

    def summary(self) -> dict[str, int]:
        """Totals for the service stats: stored, duplicates, lost, open gaps and missing seqs."""
        return q.summary(self.db.conn)

    # ------------------------------------------------------------------ retention
    def fold_fleet_hours(self, now: float, minute_days: float | None = None) -> None:
        """Prune minutes older than minute_days (per device and fleet rollup), then fold the
        rollup's whole hours ended FOLD_DELAY_S before `now` into telemetry_fleet_hour.

        READ COMMITTED under the fold lock alone: it waits for the ingest batches that read the
        old fold mark, then its statements see their minutes (docs/telemetry.md)."""
        hi = int((now - FOLD_DELAY_S) // fleet_queries.HOUR_S) * fleet_queries.HOUR_S
        if minute_days is None and (fleet_queries.fold_mark(self.db.conn) or -1) >= hi:
            return  # folded already: no lock (compaction runs every minute), ingest goes on
        with self.db.transaction() as tx:
            self.db.lock_fleet_hours(shared=False)
            if minute_days is not None:
                q.delete_minutes_before(tx, now - minute_days * DAY_S)
                fleet_queries.delete_fleet_before(tx, now - minute_days * DAY_S)
            lo = fleet_queries.fold_mark(tx)
            if lo is None or lo < hi:
                fleet_queries.fold_hours(tx.sa, lo, hi)

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
        self.fold_fleet_hours(now, minute_days)
        # One snapshot for the fold and the delete: a row another replica commits between them
        # (a late spool drain) is neither folded nor deleted, instead of deleted unfolded.
        with self.db.transaction(repeatable=True) as tx:
            oldest = q.oldest_raw(tx)
            if oldest is None or oldest >= cutoff:
                return 0
            bound = q.nth_raw_before(tx, cutoff, max(batch_rows, 1) - 1)
            if bound is not None:
                return q.fold_into_minutes(tx, oldest, bound, hi_closed=True)
            return q.fold_into_minutes(tx, oldest, cutoff, hi_closed=False)

"""Telemetry store: exactly-once ingest, gap tracking and resend requests, per-minute compaction."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.protocol import BUCKET_COUNT, SeqRange, Telemetry, TelemetryRecord
from controller.fleet.telemetry.history import TelemetryHistory, max_sql
from controller.fleet.telemetry.plan import (
    Applied,
    DeviceState,
    Gap,
    Plan,
    apply_plan,
    plan_message,
)
from controller.fleet.telemetry.reports import (
    BUCKET_COLUMNS,
    column_names,
)
from controller.storage.db import Database

# Most ranges one resend_telemetry command may carry (agent/protocol/messages.py, Command).
MAX_RESEND_RANGES = 200


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


# TelemetryRecord fields stored as they are, in _INSERT_COLUMNS order after the histogram.
_RECORD_TAIL = column_names(
    "invocations throughput_ips rss_mb peak_rss_mb cpu_percent temperature_c power_w "
    "energy_mj_per_inference power_source power_estimated cache_hits errors dropped_total"
)


# The same fields read in one C call, and the latency columns of a record that served nothing.
_record_tail = operator.attrgetter(*_RECORD_TAIL)
_NO_LATENCY = (0, None, None, None, None, None, *(0,) * BUCKET_COUNT)


def _record_row(device_id: str, r: TelemetryRecord, received: float) -> tuple[Any, ...]:
    """One telemetry table row for a record, columns in _INSERT_COLUMNS order."""
    s = r.served
    latency = (
        (s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.mean_ms, s.max_ms, *s.buckets)
        if s
        else _NO_LATENCY
    )
    head = (device_id, r.seq, r.ts, int(r.ts // 60) * 60, received, r.model_sha256, r.interval_s)
    tail = _record_tail(r)
    return (*head, *latency, *tail[:-4], 1 if r.power_estimated else 0, *tail[-3:])


# Bound parameters per SELECT of a batch: SQLite's limit before 3.32 (newer allow 32,766), so
# the cursors of a whole 500-message drain from 500 devices are one statement, their gaps two.
MAX_SQL_PARAMS = 999

_GAP_COLUMNS = "seq_first, seq_last, state, first_seen, last_requested, requests, reason"
_CURSOR_SQL = (
    "INSERT INTO telemetry_cursor (device_id, highest, contiguous, stored, duplicates, lost, "
    "dropped_total, last_ts, updated) VALUES (?, ?, COALESCE((SELECT MIN(seq_first) - 1 FROM "
    "telemetry_gaps WHERE device_id = ? AND state = 'missing'), ?), ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (device_id) DO UPDATE SET highest = excluded.highest, "
    "contiguous = excluded.contiguous, "
    "stored = telemetry_cursor.stored + excluded.stored, "
    "duplicates = telemetry_cursor.duplicates + excluded.duplicates, "
    "lost = telemetry_cursor.lost + excluded.lost, "
    f"dropped_total = {max_sql('telemetry_cursor', 'dropped_total')}, "
    f"last_ts = {max_sql('telemetry_cursor', 'last_ts')}, "
    "updated = excluded.updated"
)


def _select_in(tx: Any, sql: str, keys: Sequence[str]) -> list[tuple[Any, ...]]:
    """Rows of `sql` with its "{}" made an IN list of `keys`, MAX_SQL_PARAMS keys a statement."""
    rows: list[tuple[Any, ...]] = []
    for i in range(0, len(keys), MAX_SQL_PARAMS):
        part = keys[i : i + MAX_SQL_PARAMS]
        rows += map(tuple, tx.execute(sql.format(", ".join("?" * len(part))), part))
    return rows


def _select_ranges(
    tx: Any, sql: str, test: str, ranges: Iterable[tuple[str, int, int]]
) -> list[tuple[Any, ...]]:
    """Rows of `sql` matching any (device_id, lo, hi) of `ranges` by `test`: an OR of them."""
    terms = list(dict.fromkeys(ranges))
    step = MAX_SQL_PARAMS // 3
    rows: list[tuple[Any, ...]] = []
    for i in range(0, len(terms), step):
        part = terms[i : i + step]
        where = " OR ".join([f"(device_id = ? AND {test})"] * len(part))
        rows += map(tuple, tx.execute(f"{sql} WHERE {where}", [x for t in part for x in t]))
    return rows


class TelemetryStore(TelemetryHistory):
    """Stores device telemetry exactly once and knows which sequence numbers are still missing."""

    def __init__(self, db: Database) -> None:
        """Use the caller's connection (and its transactions)."""
        self.db = db
        # Gaps marked lost by the last due_resends() call (no answer after max_requests).
        self.last_expired = 0

    # ------------------------------------------------------------------ ingest
    def ingest(self, message: Telemetry, received: float) -> IngestResult:
        """Store a message's new records once, update gaps and cursor: ingest_many of one."""
        return self.ingest_many((message,), received)

    def ingest_many(self, messages: Sequence[Telemetry], received: float) -> IngestResult:
        """Ingest a batch of messages set-based: the same as ingest() of each in order.

        The same rows, gaps, cursors, totals and summed counts, with a handful of statements
        per call whatever the number of messages and devices: read the cursors and the gaps
        the batch can touch, decide in Python, write each table with one executemany. Runs in
        a transaction of its own, or as a SAVEPOINT inside the caller's: all or nothing.
        """
        if not messages:
            return IngestResult(0, 0, 0, 0, 0)
        plans = [plan_message(m) for m in messages]
        # Not exclusive: replicas ingest in parallel, each holding only the batch's devices
        # (cursor and gaps are per device; totals are atomic upserts taken in key order).
        with self.db.transaction(exclusive=False) as tx:
            self.db.lock_devices(p.message.device_id for p in plans)
            states = self._read_states(tx, plans)
            applied = [apply_plan(states[p.message.device_id], p, received) for p in plans]
            self._drop_stored_refills(tx, applied)
            rows: list[tuple[Any, ...]] = []
            for a in applied:
                device, records, new = a.message.device_id, a.message.records, a.new
                state = states[device]
                state.stored += len(new)
                state.duplicates += len(records) - len(new)
                state.lost += a.lost - a.recovered
                if records:
                    dropped = max([r.dropped_total for r in records])
                    ts = max([r.ts for r in records])
                    state.dropped_total = max(state.dropped_total, dropped)
                    state.last_ts = ts if state.last_ts is None else max(state.last_ts, ts)
                rows += [_record_row(device, r, received) for r in new]
            tx.executemany(_INSERT_SQL, rows)
            self._write_gaps(tx, states)
            tx.executemany(
                _CURSOR_SQL,
                [
                    (d, s.highest, d, s.highest, s.stored, s.duplicates, s.lost, s.dropped_total,
                     s.last_ts, received)
                    for d, s in states.items()
                ],
            )  # fmt: skip
            self._add_latency_totals(tx, applied)
            # Any message is a sign of life: one statement per batch, never moving backwards.
            tx.executemany(
                "UPDATE devices SET last_seen = ? WHERE id = ? "
                "AND (last_seen IS NULL OR last_seen < ?)",
                [(received, d, received) for d in sorted(states)],
            )
        opened = closed = lost = recovered = 0
        for a in applied:
            opened, closed = opened + a.opened, closed + a.closed
            lost, recovered = lost + a.lost, recovered + a.recovered
        stored = sum(s.stored for s in states.values())
        duplicates = sum(s.duplicates for s in states.values())
        return IngestResult(stored, duplicates, opened, closed, lost, recovered)

    @staticmethod
    def _read_states(tx: Any, plans: list[Plan]) -> dict[str, DeviceState]:
        """The cursors of the batch's devices and the stored gaps it can touch: two SELECTs.

        Stored gaps lie at or below their device's highest seq, so a message can only touch
        those overlapping its window cut at the highest read here; the gaps above are made
        within the batch and kept in memory.
        """
        devices = list(dict.fromkeys(p.message.device_id for p in plans))
        cursors = dict(
            _select_in(
                tx,
                "SELECT device_id, highest FROM telemetry_cursor WHERE device_id IN ({})",
                devices,
            )
        )
        states = {d: DeviceState(int(cursors.get(d, 0))) for d in devices}
        windows = [  # none for live messages: all their seqs are above `highest`
            (p.message.device_id, p.lo, min(p.top, top))
            for p in plans
            if p.lo <= (top := states[p.message.device_id].highest)
        ]
        gaps = {
            (row[0], row[1]): row
            for row in _select_ranges(
                tx,
                f"SELECT device_id, {_GAP_COLUMNS} FROM telemetry_gaps",
                "seq_last >= ? AND seq_first <= ?",
                windows,
            )
        }
        for device, *columns in sorted(gaps.values()):
            gap = Gap(*columns)
            states[device].gaps.append(gap)
            states[device].read.add(gap.row())
        return states

    @staticmethod
    def _drop_stored_refills(tx: Any, applied: list[Applied]) -> None:
        """Belt and braces: a refill that is somehow already stored is not stored or counted.

        Only rows stored before the batch can be hit: a seq stored by an earlier message of the
        batch is a duplicate for the later ones, never a refill.
        """
        ranges = []
        for a in applied:
            refills = [r.seq for r in a.new if r.seq <= a.old_highest]
            if refills:
                ranges.append((a.message.device_id, min(refills), max(refills)))
        if not ranges:
            return
        present = set(
            _select_ranges(
                tx, "SELECT device_id, seq FROM telemetry", "seq BETWEEN ? AND ?", ranges
            )
        )
        for a in applied:
            device = a.message.device_id
            a.new = [r for r in a.new if r.seq > a.old_highest or (device, r.seq) not in present]

    @staticmethod
    def _write_gaps(tx: Any, states: dict[str, DeviceState]) -> None:
        """Write only the gap rows that changed (delete removed ones first, then insert)."""
        gone: list[tuple[Any, ...]] = []
        added: list[tuple[Any, ...]] = []
        for device, state in states.items():
            if state.gaps or state.read:
                now = {g.row() for g in state.gaps}
                gone += [(device, row[0]) for row in state.read - now]
                added += [(device, *row) for row in now - state.read]
        if gone:
            tx.executemany("DELETE FROM telemetry_gaps WHERE device_id = ? AND seq_first = ?", gone)
        if added:
            tx.executemany(
                f"INSERT INTO telemetry_gaps (device_id, {_GAP_COLUMNS}) "
                f"VALUES ({', '.join('?' * 8)})",
                added,
            )

    @staticmethod
    def _add_latency_totals(tx: Any, applied: list[Applied]) -> None:
        """Add the new records' latencies to the profile x model totals, exactly as message by
        message: one upsert per key (the batch's counts, the first message's latency sum), then
        one UPDATE per key adding the other messages' sums in order, `+ ? + ?`, so the float
        total rounds as it would have (summed in Python first, it could differ in the last bit).
        """
        devices = list(dict.fromkeys(a.message.device_id for a in applied if a.new))
        if not devices:
            return
        profiles = dict(_select_in(tx, "SELECT id, profile FROM devices WHERE id IN ({})", devices))
        # Per profile x model: served counts, bucket counts, each message's latency sum.
        keys: dict[tuple[str, str], tuple[list[int], list[tuple[int, ...]], list[float]]] = {}
        for a in applied:
            profile = profiles.get(a.message.device_id) or ""
            sums: dict[tuple[str, str], float] = {}
            for r in a.new:
                s = r.served
                if s is None or s.count == 0:
                    continue
                key = (profile, r.model_sha256 or "")
                if key not in keys:
                    keys[key] = ([], [], [])
                keys[key][0].append(s.count)
                keys[key][1].append(s.buckets)
                sums[key] = sums.get(key, 0.0) + s.count * s.mean_ms  # 0.0 + x, as ingest did
            for key, latency in sums.items():
                keys[key][2].append(latency)
        if not keys:
            return
        rows = [  # in key order: two replicas upserting the same keys never deadlock
            (*key, sum(served), latency[0], *map(sum, zip(*buckets, strict=True)))
            for key, (served, buckets, latency) in sorted(keys.items())
        ]
        tx.executemany(_TOTALS_SQL, rows)
        step = MAX_SQL_PARAMS // 2  # also keeps the `+ ?` chain under SQLite's depth limit (1000)
        for key, (_, _, lat) in keys.items():
            for i in range(1, len(lat), step):
                part = lat[i : i + step]
                tx.execute(
                    "UPDATE telemetry_latency_totals SET latency_sum_ms = latency_sum_ms"
                    + " + ?" * len(part)
                    + " WHERE profile = ? AND model_sha256 = ?",
                    (*part, *key),
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
        due: dict[str, list[SeqRange]] = {}
        with self.db.transaction() as tx:
            # Every device this pass may touch, locked at once in the order ingest uses: one
            # by one (expire, then each mark_requested) could deadlock with a replica's batch.
            self.db.lock_devices(
                row[0]
                for row in tx.execute(
                    "SELECT DISTINCT device_id FROM telemetry_gaps WHERE state = 'missing'"
                )
            )
            self.last_expired = self._expire(now, retry_s, max_requests)
            for device, first, last in tx.execute(
                "SELECT g.device_id, g.seq_first, g.seq_last FROM telemetry_gaps g "
                "JOIN devices d ON d.id = g.device_id AND d.online = 1 "
                "WHERE g.state = 'missing' AND g.first_seen <= ? "
                "AND (g.last_requested IS NULL OR g.last_requested <= ?) AND g.requests < ? "
                "ORDER BY g.device_id, g.seq_first",
                (now - grace_s, now - retry_s, max_requests),
            ).fetchall():
                ranges = due.setdefault(device, [])
                if len(ranges) < MAX_RESEND_RANGES:
                    ranges.append(SeqRange(int(first), int(last)))
        return due

    def _expire(self, now: float, retry_s: float, max_requests: int) -> int:
        """Mark lost the missing ranges asked max_requests times, retry_s ago; count seqs.
        Called inside due_resends' transaction, which holds the locks of these devices."""
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
            self.db.lock_devices([device_id])
            tx.executemany(
                "UPDATE telemetry_gaps SET last_requested = ?, requests = requests + 1 "
                "WHERE device_id = ? AND state = 'missing' AND seq_first <= ? AND seq_last >= ?",
                [(now, device_id, r.last, r.first) for r in ranges],
            )



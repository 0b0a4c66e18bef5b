"""Telemetry store: exactly-once ingest, gap tracking and resend requests, per-minute compaction."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.protocol import BUCKET_COUNT, SeqRange, Telemetry, TelemetryRecord
from controller.fleet.telemetry import rollup
from controller.fleet.telemetry.history import TelemetryHistory
from controller.fleet.telemetry.plan import (
    Applied,
    DeviceState,
    Gap,
    Plan,
    apply_plan,
    plan_message,
)
from controller.storage.db import Connection, Database
from controller.storage.queries import ingest as q
from controller.storage.queries.telemetry import column_names

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


# TelemetryRecord fields stored as they are, in RECORD_COLUMNS order after the histogram.
_RECORD_TAIL = column_names(
    "invocations throughput_ips rss_mb peak_rss_mb cpu_percent temperature_c power_w "
    "energy_mj_per_inference power_source power_estimated cache_hits errors dropped_total"
)


# The same fields read in one C call, and the latency columns of a record that served nothing.
_record_tail = operator.attrgetter(*_RECORD_TAIL)
_NO_LATENCY = (0, None, None, None, None, None, *(0,) * BUCKET_COUNT)


def _record_row(device_id: str, r: TelemetryRecord, received: float) -> tuple[Any, ...]:
    """One telemetry table row for a record, columns in RECORD_COLUMNS order."""
    s = r.served
    latency = (
        (s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.mean_ms, s.max_ms, *s.buckets)
        if s
        else _NO_LATENCY
    )
    head = (device_id, r.seq, r.ts, int(r.ts // 60) * 60, received, r.model_sha256, r.interval_s)
    tail = _record_tail(r)
    return (*head, *latency, *tail[:-4], 1 if r.power_estimated else 0, *tail[-3:])


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
            self.db.lock_fleet_hours(shared=True)  # the fold waits for the batch's minutes
            states = self._read_states(tx, plans)
            applied = [apply_plan(states[p.message.device_id], p, received) for p in plans]
            self._drop_stored_refills(tx, applied)
            with_new = list(dict.fromkeys(a.message.device_id for a in applied if a.new))
            profiles = q.device_profiles(tx, with_new) if with_new else {}
            # Before the insert: the rollup counts a device in a minute it has no row in yet.
            rollup.add_batch(tx, [(a.message.device_id, a.new) for a in applied], profiles)
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
            q.insert_records(tx, rows)
            self._write_gaps(tx, states)
            q.upsert_cursors(tx, [
                {"device_id": d, "highest": s.highest, "stored": s.stored,
                 "duplicates": s.duplicates, "lost": s.lost, "dropped_total": s.dropped_total,
                 "last_ts": s.last_ts, "updated": received}
                for d, s in states.items()
            ])  # fmt: skip
            self._add_latency_totals(tx, applied, profiles)
            # Any message is a sign of life: one statement per batch, never moving backwards.
            q.touch_devices(tx, sorted(states), received)
        opened = closed = lost = recovered = 0
        for a in applied:
            opened, closed = opened + a.opened, closed + a.closed
            lost, recovered = lost + a.lost, recovered + a.recovered
        stored = sum(s.stored for s in states.values())
        duplicates = sum(s.duplicates for s in states.values())
        return IngestResult(stored, duplicates, opened, closed, lost, recovered)

    @staticmethod
    def _read_states(tx: Connection, plans: list[Plan]) -> dict[str, DeviceState]:
        """The cursors of the batch's devices and the stored gaps it can touch: two SELECTs.

        Stored gaps lie at or below their device's highest seq, so a message can only touch
        those overlapping its window cut at the highest read here; the gaps above are made
        within the batch and kept in memory.
        """
        devices = list(dict.fromkeys(p.message.device_id for p in plans))
        cursors = q.cursor_highest(tx, devices)
        states = {d: DeviceState(cursors.get(d, 0)) for d in devices}
        windows = [  # none for live messages: all their seqs are above `highest`
            (p.message.device_id, p.lo, min(p.top, top))
            for p in plans
            if p.lo <= (top := states[p.message.device_id].highest)
        ]
        gaps = {(row[0], row[1]): row for row in q.gaps_overlapping(tx, windows)}
        for device, *columns in sorted(gaps.values()):
            gap = Gap(*columns)
            states[device].gaps.append(gap)
            states[device].read.add(gap.row())
        return states

    @staticmethod
    def _drop_stored_refills(tx: Connection, applied: list[Applied]) -> None:
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
        present = q.stored_seqs(tx, ranges)
        for a in applied:
            device = a.message.device_id
            a.new = [r for r in a.new if r.seq > a.old_highest or (device, r.seq) not in present]

    @staticmethod
    def _write_gaps(tx: Connection, states: dict[str, DeviceState]) -> None:
        """Write only the gap rows that changed (delete removed ones first, then insert)."""
        gone: list[tuple[Any, ...]] = []
        added: list[tuple[Any, ...]] = []
        for device, state in states.items():
            if state.gaps or state.read:
                now = {g.row() for g in state.gaps}
                gone += [(device, row[0]) for row in state.read - now]
                added += [(device, *row) for row in now - state.read]
        q.delete_gaps(tx, gone)
        q.insert_gaps(tx, added)

    @staticmethod
    def _add_latency_totals(
        tx: Connection, applied: list[Applied], profiles: dict[str, str | None]
    ) -> None:
        """Add the new records' latencies to the profile x model totals, exactly as message by
        message: one upsert per key (the batch's counts, the first message's latency sum), then
        one UPDATE per key adding the other messages' sums in order, `+ ? + ?`, so the float
        total rounds as it would have (summed in Python first, it could differ in the last bit).
        """
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
        q.add_latency_totals(tx, rows)
        for key, (_, _, lat) in keys.items():
            q.add_latency_sums(tx, key, lat[1:])

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
            self.db.lock_devices(q.devices_with_missing_gaps(tx))
            self.last_expired = self._expire(now, retry_s, max_requests)
            for device, first, last in q.due_gaps(tx, now - grace_s, now - retry_s, max_requests):
                ranges = due.setdefault(device, [])
                if len(ranges) < MAX_RESEND_RANGES:
                    ranges.append(SeqRange(int(first), int(last)))
        return due

    def _expire(self, now: float, retry_s: float, max_requests: int) -> int:
        """Mark lost the missing ranges asked max_requests times, retry_s ago; count seqs.
        Called inside due_resends' transaction, which holds the locks of these devices."""
        with self.db.transaction() as tx:
            rows = q.expired_gaps(tx, max_requests, now - retry_s)
            for device, first, last, requests in rows:
                q.mark_gap_lost(tx, device, first, f"no answer after {requests} resend requests")
                q.add_lost(tx, device, last - first + 1)
            for device in {row[0] for row in rows}:
                q.refresh_contiguous(tx, device)
        return sum(last - first + 1 for _, first, last, _ in rows)

    def mark_requested(self, device_id: str, ranges: Iterable[SeqRange], now: float) -> None:
        """Record that the missing gaps overlapping `ranges` were asked for at `now`."""
        with self.db.transaction() as tx:
            self.db.lock_devices([device_id])
            q.mark_requested(tx, device_id, [(r.first, r.last) for r in ranges], now)



"""Gap and dedupe bookkeeping of a telemetry batch, in memory: the store reads, this decides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agent.protocol import Telemetry, TelemetryRecord

# Reason stored with gaps the device declared unavailable (dropped from its spool).
LOST_UNAVAILABLE = "unavailable on the device"

# A message item in seq order: (first, last, record) for a record, (first, last, None) for an
# unavailable range.
Item = tuple[int, int, TelemetryRecord | None]


@dataclass
class Gap:
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


def take_range(
    gaps: list[Gap], first: int, last: int, states: set[str]
) -> list[tuple[Gap, int, int]]:
    """Cut [first, last] out of the gaps in `states`; return (gap, lo, hi) for each overlap."""
    taken: list[tuple[Gap, int, int]] = []
    kept: list[Gap] = []
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


def coalesce_lost(gaps: list[Gap]) -> None:
    """Join adjacent lost ranges with the same reason, so lost rows do not pile up."""
    out: list[Gap] = []
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


@dataclass(slots=True)
class DeviceState:
    """One device while a batch is applied: its cursor, every gap read or made, its counters."""

    highest: int
    gaps: list[Gap] = field(default_factory=list)
    # The gap rows as read from the database, so that only the rows that changed are written.
    read: set[tuple[Any, ...]] = field(default_factory=set)
    stored: int = 0
    duplicates: int = 0
    lost: int = 0
    dropped_total: int = 0
    last_ts: float | None = None


@dataclass(slots=True)
class Applied:
    """What one message of a batch did: the records it found new, and its counts."""

    message: Telemetry
    new: list[TelemetryRecord]
    # The device's highest seq before this message: new records at or below it are refills.
    old_highest: int
    opened: int = 0
    closed: int = 0
    lost: int = 0
    recovered: int = 0


class Plan(NamedTuple):
    """A message's records and unavailable ranges in seq order, and the seqs they span."""

    message: Telemetry
    items: list[Item]
    lo: int
    top: int


def plan_message(message: Telemetry) -> Plan:
    """Order a message's items by seq (a record before a range starting at the same seq)."""
    items: list[Item] = [(r.seq, r.seq, r) for r in message.records]
    if not message.unavailable:  # records only: their seqs already increase
        return Plan(message, items, items[0][0], items[-1][0])
    items += [(u.first, u.last, None) for u in message.unavailable]
    items.sort(key=lambda item: (item[0], item[2] is None))
    return Plan(message, items, items[0][0], max(item[1] for item in items))


def apply_plan(state: DeviceState, plan: Plan, received: float) -> Applied:
    """Decide new/duplicate per record and change the device's gaps, as for a lone message.

    A message sees only the gaps overlapping its window (what ingesting it alone reads from the
    database), so lost ranges coalesce among those only and the device's other gaps stay as
    they are.
    """
    highest = state.highest
    out = Applied(plan.message, [], highest)
    lo, hi = plan.lo, min(plan.top, highest)
    gaps: list[Gap] = []
    others = state.gaps
    if lo <= hi and state.gaps:
        gaps = [g for g in state.gaps if g.seq_last >= lo and g.seq_first <= hi]
        others = [g for g in state.gaps if g.seq_last < lo or g.seq_first > hi]
    seen = len(gaps)
    for first, last, record in plan.items:
        if record is not None:
            if first > highest:
                if first > highest + 1:
                    gaps.append(Gap(highest + 1, first - 1, "missing", received))
                    out.opened += 1
                highest = first
                out.new.append(record)
                continue
            taken = take_range(gaps, first, first, {"missing", "lost"})
            if taken:
                g = taken[0][0]
                out.new.append(record)
                if g.state == "lost":
                    out.recovered += 1
                elif g.seq_first == g.seq_last:
                    out.closed += 1
            continue
        # unavailable [first, last]: missing seqs below `highest` become lost...
        for g, a, b in take_range(gaps, first, min(last, highest), {"missing"}):
            gaps.append(
                Gap(a, b, "lost", g.first_seen, g.last_requested, g.requests, LOST_UNAVAILABLE)
            )
            out.lost += b - a + 1
        # ...and seqs the controller never heard of are lost from the start.
        if last > highest:
            start = max(first, highest + 1)
            if start > highest + 1:
                gaps.append(Gap(highest + 1, start - 1, "missing", received))
                out.opened += 1
            gaps.append(Gap(start, last, "lost", received, reason=LOST_UNAVAILABLE))
            out.lost += last - start + 1
            highest = last
        gaps.sort(key=lambda g: g.seq_first)
    if gaps or seen:  # else nothing to coalesce or write back (a live message)
        coalesce_lost(gaps)
        state.gaps = sorted(others + gaps, key=lambda g: g.seq_first)
    state.highest = highest
    return out

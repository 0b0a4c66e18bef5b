"""The fleet rollup's hours against its minutes and the records, on SQLite and PostgreSQL: over
windows of many hours, with late batches into hours already folded (a resend, a device first
seen there, a profile new there) and retention cutting an hour, a series read from hours and edge
minutes equals the minute-only answer (devices too) and the records' (docs/telemetry.md)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from alembic import command

from agent.protocol import MAX_TELEMETRY_RECORDS, Telemetry, TelemetryRecord
from controller.fleet.registry import Fleet
from controller.fleet.telemetry.series import fleet_series
from controller.fleet.telemetry.store import TelemetryStore
from controller.storage import upgrade
from controller.storage.queries import fleet as fleet_queries
from controller.storage.tables import telemetry_fleet_hour
from tests.paths import TEST_DATA
from tests.unit.controller.fleet.telemetry.test_fleet_rollup import assert_same
from tests.unit.controller.fleet.telemetry.test_store import T0, record

PROFILES = ("rpi4", "x86-64-gateway", "jetson-orin-nano-cpu")
DEVICES = 6
HOURS = 7
UNTIL = T0 + HOURS * 3600 + 120  # T0 is a whole minute, 13 minutes into an hour


def _records(rng: random.Random, i: int, shas: list[str]) -> list[TelemetryRecord]:
    """One device's records every 60 s for HOURS, its model changing every 100 minutes."""
    out = []
    for seq in range(1, HOURS * 60 + 1):
        ts = T0 + 60.0 * seq + rng.uniform(0, 50)
        sha: str | None = shas[(i + seq // 100) % 2] if seq % 37 else None
        latencies = [rng.lognormvariate(1.5, 0.6) for _ in range(rng.randint(0, 5))]
        power = None if seq % 11 == 0 else rng.uniform(1, 5)
        out.append(record(seq, ts, latencies, sha=sha, power_w=power, interval_s=60.0))
    return out


def _held(r: TelemetryRecord, i: int) -> bool:
    """Records that arrive only after the first fold: half an hour of every device, the first
    three hours of the last device (unregistered: its profile '' is a key the folded hours do
    not have yet), dev-01's records without a model in its second hour."""
    since = (r.ts - T0) / 3600
    return (
        2 <= since < 2.5
        or (i == DEVICES - 1 and since < 3)
        or (i == 1 and 1 <= since < 2 and r.model_sha256 is None)
    )


@pytest.fixture
def fleet(db_target: str, tmp_path: Path) -> Iterator[tuple[Fleet, TelemetryStore]]:
    """A fleet of DEVICES over HOURS, hours folded at T0 + 5 h, then the held batches stored."""
    fleet = Fleet(tmp_path / "home", db=db_target)
    fleet.add_model(TEST_DATA / "tiny_fp32.tflite", name="tiny", version="1")
    fleet.add_model(TEST_DATA / "tiny_int8.tflite", name="tiny", version="2")
    shas = [fleet.model(f"tiny:{v}")["artifacts"][0]["sha256"] for v in (1, 2)]
    for i in range(DEVICES - 1):  # the last one never registers: profile "?"
        fleet.register_device(f"dev-{i:02d}", PROFILES[i % len(PROFILES)])
    rng = random.Random(11)
    now, later = [], []
    for i in range(DEVICES):
        records = _records(rng, i, shas)
        for part, keep in ((now, False), (later, True)):
            chosen = [r for r in records if _held(r, i) == keep]
            step = MAX_TELEMETRY_RECORDS // 2
            part += [
                Telemetry(f"dev-{i:02d}", tuple(chosen[k : k + step]))
                for k in range(0, len(chosen), step)
            ]
    rng.shuffle(now)
    store = TelemetryStore(fleet.db)
    for k in range(0, len(now), 4):
        store.ingest_many(now[k : k + 4], T0 + 30_000)
    store.fold_fleet_hours(T0 + 5 * 3600)
    mark = fleet_queries.fold_mark(fleet.db.conn)
    assert mark is not None and mark > T0 + 3 * 3600  # the held records are late
    for k in range(0, len(later), 3):
        store.ingest_many(later[k : k + 3], T0 + 30_000)
    yield fleet, store
    fleet.close()


def check(fleet: Fleet) -> int:
    """Series from hours and edge minutes equal minute-only rows and the records' series;
    returns how many of the cases read hour rows."""
    mark = fleet_queries.fold_mark(fleet.db.conn)
    read_hours = 0
    cases: list[dict[str, Any]] = [
        {"by": "profile_model", "points": 10},  # one-hour buckets
        {"by": "profile", "points": 4},  # two-hour buckets
        {"by": "model", "points": 10, "profile": "rpi4"},
        {"by": "profile_model", "points": 1000},  # minutes only
    ]
    for case in cases:
        for since in (None, T0 + 600, T0 + 2 * 3600 + 615):
            new = fleet_series(fleet.db, since=since, until=UNTIL, **case)
            start, bucket = int(new["since"]), new["bucket_s"]
            rows = [
                sorted(
                    fleet_queries.fleet_series(fleet.db.conn, start, UNTIL, bucket, hours=h),
                    key=lambda r: (r["bucket"], r["profile"], r["model_sha256"]),
                )
                for h in (True, False)
            ]
            assert rows[0], case
            assert_same(rows[1], rows[0], f"{case} since={since} rows")
            read_hours += bucket % 3600 == 0 and mark is not None and mark >= start + 3600
            old = fleet_series(fleet.db, since=since, until=UNTIL, source="records", **case)
            if bucket > 60:  # devices differ by definition (peak per minute)
                for s in (*new["series"], *old["series"]):
                    for p in s["points"]:
                        p.pop("devices")
            assert_same(old, new, f"{case} since={since}")
    return read_hours


def test_series_over_hours_equal_minutes_and_records(
    fleet: tuple[Fleet, TelemetryStore],
) -> None:
    db, store = fleet
    assert check(db) >= 4
    store.fold_fleet_hours(T0 + 9 * 3600)  # every hour folded
    assert check(db) >= 6


def test_they_stay_equal_when_retention_cuts_an_hour(
    fleet: tuple[Fleet, TelemetryStore],
) -> None:
    db, store = fleet
    now = T0 + 2.5 * 3600 + 7 * 86_400  # the cut: 43 minutes into a folded hour
    while store.compact(now, raw_days=7, batch_rows=2000):
        pass
    store.compact(now, raw_days=7, minute_days=7)
    assert check(db) >= 3  # the window left is 4.5 h: fewer cases get hour buckets


def test_revision_0004_folds_what_the_controller_folded(
    fleet: tuple[Fleet, TelemetryStore],
) -> None:
    db, store = fleet
    store.fold_fleet_hours(time.time())  # as the upgrade: every hour ended 10 minutes ago

    def rows() -> list[dict[str, Any]]:
        """Every hour row, in key order."""
        t = telemetry_fleet_hour
        query = sqlalchemy.select(t).order_by(*t.primary_key.columns)
        return [dict(r._mapping) for r in db.db.conn.sa.execute(query)]

    built = rows()
    with db.db.transaction() as tx:
        command.downgrade(upgrade.config(tx.sa), "0003")
        assert "telemetry_fleet_hour" not in sqlalchemy.inspect(tx.sa).get_table_names()
        command.upgrade(upgrade.config(tx.sa), "head")
    assert len(built) > HOURS * len(PROFILES)
    assert_same(built, rows())

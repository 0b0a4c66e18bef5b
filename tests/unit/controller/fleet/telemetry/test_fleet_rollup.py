"""The fleet rollup against the records it summarizes, on SQLite and PostgreSQL: on a generated
fleet (out-of-order batches, resends, duplicates, model changes, records without latency or
power), the series and the report read from the rollup equal what reading every record gives,
before and after compaction, and the Alembic backfill builds the same rollup ingest did."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from alembic import command

from agent.protocol import MAX_TELEMETRY_RECORDS, Telemetry, TelemetryRecord
from controller.fleet.registry import Fleet
from controller.fleet.telemetry.queries import parse_window
from controller.fleet.telemetry.reports import report
from controller.fleet.telemetry.series import fleet_series
from controller.fleet.telemetry.store import TelemetryStore
from controller.storage import upgrade
from controller.storage.tables import telemetry_device_models, telemetry_fleet_minute
from tests.paths import TEST_DATA
from tests.unit.controller.fleet.telemetry.test_store import T0, record

PROFILES = ("rpi4", "x86-64-gateway", "jetson-orin-nano-cpu")
DEVICES = 12
MINUTES = 30


def _messages(rng: random.Random, shas: list[str]) -> list[Telemetry]:
    """Every device reports every 10 s for MINUTES; model changes, gaps and noise on top."""
    out: list[Telemetry] = []
    for i in range(DEVICES):
        device = f"dev-{i:02d}"
        records: list[TelemetryRecord] = []
        for seq in range(1, MINUTES * 6 + 1):
            ts = T0 + 10.0 * seq + rng.uniform(0, 9)
            sha: str | None = shas[(i + seq // 50) % 2] if seq % 37 else None  # changes
            latencies = [rng.lognormvariate(1.5, 0.6) for _ in range(rng.randint(0, 6))]
            power = None if seq % 11 == 0 else rng.uniform(1, 5)
            records.append(
                record(seq, ts, latencies, sha=sha, power_w=power, estimated=i % 3 == 0)
            )
        step = MAX_TELEMETRY_RECORDS // 3
        chunks = [records[k : k + step] for k in range(0, len(records), step)]
        # Hold one chunk back: it arrives last, as a resend of a gap (out of order).
        held = chunks.pop(len(chunks) // 2)
        out += [Telemetry(device, tuple(c)) for c in chunks]
        out.append(Telemetry(device, tuple(held)))
        out.append(Telemetry(device, tuple(held[:3])))  # duplicates
    rng.shuffle(out)
    return out


@pytest.fixture
def generated(db_target: str, tmp_path: Path) -> Iterator[Fleet]:
    """A fleet of DEVICES over PROFILES and two models, with MINUTES of telemetry."""
    fleet = Fleet(tmp_path / "home", db=db_target)
    fleet.add_model(TEST_DATA / "tiny_fp32.tflite", name="tiny", version="1")
    fleet.add_model(TEST_DATA / "tiny_int8.tflite", name="tiny", version="2")
    shas = [fleet.model(f"tiny:{v}")["artifacts"][0]["sha256"] for v in (1, 2)]
    for i in range(DEVICES - 1):  # the last one never registers: profile "?"
        fleet.register_device(f"dev-{i:02d}", PROFILES[i % len(PROFILES)])
    messages = _messages(random.Random(7), shas)
    store = TelemetryStore(fleet.db)
    for k in range(0, len(messages), 5):  # batches of 5 messages, several devices each
        store.ingest_many(messages[k : k + 5], T0 + 4000)
    yield fleet
    fleet.close()


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal structures; floats to 1e-9 relative (sums added in another order)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert b == pytest.approx(a, rel=1e-9), where
    else:
        assert a == b, where


def check_series(fleet: Fleet, *, minute_devices: bool = True) -> None:
    """Series from the rollup equal series from the records for every grouping and width."""
    until = T0 + MINUTES * 60 + 120
    cases: list[dict[str, Any]] = [
        {"by": "profile_model", "points": 1000},  # one-minute buckets: devices exact
        {"by": "profile", "points": 10},
        {"by": "model", "points": 10, "profile": "rpi4"},
        {"by": "profile_model", "points": 20, "model": "tiny:2"},
    ]
    for case in cases:
        for since in (None, T0 + 600, T0 + 615):
            new = fleet_series(fleet.db, since=since, until=until, **case)
            old = fleet_series(fleet.db, since=since, until=until, source="records", **case)
            if new["bucket_s"] > 60:  # devices differ by definition (peak per minute)
                for s in (*new["series"], *old["series"]):
                    for p in s["points"]:
                        p.pop("devices")
            assert new["series"], case
            assert_same(old, new, f"{case} since={since}")


def check_report(fleet: Fleet) -> None:
    """The per-profile report from the rollup equals it computed from every record."""
    for since in (None, T0 + 600, T0 + 615.5):  # T0 is a whole minute
        for kw in ({}, {"model": "tiny:1"}, {"profile": "rpi4"}):
            new = report(fleet.db, since=since, **kw)
            old = report(fleet.db, since=since, source="records", **kw)
            assert new
            assert_same(old, new, f"{since} {kw}")


def test_series_and_report_from_the_rollup_equal_reading_every_record(generated: Fleet) -> None:
    check_series(generated)
    check_report(generated)


def test_they_stay_equal_after_compaction(generated: Fleet) -> None:
    store = TelemetryStore(generated.db)
    # Fold half of the raw rows into per-minute rows (a cutoff inside the window).
    while store.compact(T0 + 900 + 7 * 86_400, raw_days=7, batch_rows=500):
        pass
    check_series(generated)
    check_report(generated)
    # Pruning the per-minute rows prunes the rollup at the same horizon.
    store.compact(T0 + 900 + 7 * 86_400, raw_days=7, minute_days=7)
    check_series(generated)


def test_revision_0002_on_a_stored_fleet_builds_what_ingest_built(generated: Fleet) -> None:
    def rows(table: sqlalchemy.Table) -> list[dict[str, Any]]:
        """Every row, in key order."""
        query = sqlalchemy.select(table).order_by(*table.primary_key.columns)
        return [dict(r._mapping) for r in generated.db.conn.sa.execute(query)]

    built = {t.name: rows(t) for t in (telemetry_fleet_minute, telemetry_device_models)}
    with generated.db.transaction() as tx:  # as an upgrade from before the rollup would
        command.downgrade(upgrade.config(tx.sa), "0001")
        assert "telemetry_fleet_minute" not in sqlalchemy.inspect(tx.sa).get_table_names()
        command.upgrade(upgrade.config(tx.sa), "head")
    for t in (telemetry_fleet_minute, telemetry_device_models):
        again = rows(t)
        assert_same(built[t.name], again, t.name)
    assert len(built["telemetry_fleet_minute"]) > MINUTES * len(PROFILES)


def test_a_dashboard_window_starts_at_a_whole_minute() -> None:
    assert parse_window("1h", now=T0 + 30.5) == T0 - 3600
    assert parse_window("1h", now=T0) == T0 - 3600
    assert parse_window(str(T0 + 30.5), now=T0 + 99) == T0 + 30.5  # absolute: as given
    assert parse_window(None) is None

"""TelemetryStore on real SQLite files: exactly-once ingest, gaps, resends, compaction."""

from __future__ import annotations

import math
import random
import sqlite3
from pathlib import Path

import pytest

from agent.protocol import (
    BUCKET_COUNT,
    LATENCY_BUCKETS_MS,
    MAX_TELEMETRY_RECORDS,
    SeqRange,
    Telemetry,
    TelemetryRecord,
)
from controller.fleet.telemetry.reports import BUCKET_COLUMNS, bucket_index, percentile_from_buckets
from controller.fleet.telemetry.store import TelemetryStore
from controller.storage.db import Database
from controller.storage.legacy import HANDED_OVER
from controller.storage.migrations import MIGRATIONS
from controller.storage.sqlite import SqliteDatabase
from controller.storage.upgrade import head
from tests.telemetry_records import SHA_A, SHA_B, T0, message, record, stats


@pytest.fixture
def store(db: Database) -> TelemetryStore:
    """A store on the fresh database."""
    return TelemetryStore(db)


def stored_seqs(db: Database, device: str) -> list[int]:
    """Sequence numbers stored raw for a device."""
    return [
        r["seq"]
        for r in db.query("SELECT seq FROM telemetry WHERE device_id=? ORDER BY seq", (device,))
    ]


def gap_rows(store: TelemetryStore, device: str) -> list[tuple[int, int, str]]:
    """(first, last, state) of a device's gaps."""
    return [(g["seq_first"], g["seq_last"], g["state"]) for g in store.gaps(device)]


def add_online_device(
    db: Database, device: str, profile: str | None = "rpi4", online: int = 1
) -> None:
    """A registry row, as hello/status would leave it."""
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO devices (id, profile, online, registered_by, registered_at) "
            "VALUES (?, ?, ?, 'test', 0)",
            (device, profile, online),
        )


# ---------------------------------------------------------------------------- dedupe
def test_the_same_batch_twice_is_stored_once(store: TelemetryStore, db: Database) -> None:
    first = store.ingest(message("d1", [1, 2, 3]), received=T0)
    again = store.ingest(message("d1", [1, 2, 3]), received=T0 + 1)
    assert (first.stored, first.duplicates) == (3, 0)
    assert (again.stored, again.duplicates) == (0, 3)
    assert stored_seqs(db, "d1") == [1, 2, 3]
    assert store.summary() | {} == {
        "stored": 3,
        "duplicates": 3,
        "lost": 0,
        "devices": 1,
        "gaps_open": 0,
        "missing": 0,
    }


def test_overlapping_batches_store_each_seq_once(store: TelemetryStore, db: Database) -> None:
    results = [
        store.ingest(message("d1", range(1, 6)), T0),
        store.ingest(message("d1", range(4, 9)), T0),
        store.ingest(message("d1", range(2, 12)), T0),
        store.ingest(message("d2", range(4, 9)), T0),  # another device's seqs are its own
    ]
    assert [r.stored for r in results] == [5, 3, 3, 5]
    assert [r.duplicates for r in results] == [0, 2, 7, 0]
    assert stored_seqs(db, "d1") == list(range(1, 12))
    assert stored_seqs(db, "d2") == list(range(4, 9))
    assert gap_rows(store, "d2") == [(1, 3, "missing")]  # first contact at 4: 1..3 are owed


def test_a_duplicate_after_compaction_is_still_a_duplicate(
    store: TelemetryStore, db: Database
) -> None:
    store.ingest(message("d1", [1, 2, 3]), T0)
    assert store.compact(now=T0 + 30 * 86_400, raw_days=7) == 3
    assert stored_seqs(db, "d1") == []
    again = store.ingest(message("d1", [2, 3, 4]), T0 + 30 * 86_400)
    assert (again.stored, again.duplicates) == (1, 2)
    assert stored_seqs(db, "d1") == [4]


def test_a_failing_message_in_the_callers_transaction_leaves_no_trace(
    store: TelemetryStore, db: Database
) -> None:
    with db.transaction():
        store.ingest(message("d1", [1, 2]), T0)
        with pytest.raises(RuntimeError), db.transaction():
            store.ingest(message("d1", [3, 7]), T0)
            raise RuntimeError("the service rejects this message after ingest")
        store.ingest(message("d1", [3]), T0)
    assert stored_seqs(db, "d1") == [1, 2, 3]
    assert gap_rows(store, "d1") == []
    assert store.cursor("d1")["highest"] == 3  # type: ignore[index]


# ---------------------------------------------------------------------------- gaps
def test_gaps_open_split_and_close_out_of_order(store: TelemetryStore, db: Database) -> None:
    opened = store.ingest(message("d1", [1, 2, 10]), T0)
    assert opened.gaps_opened == 1 and gap_rows(store, "d1") == [(3, 9, "missing")]
    assert store.cursor("d1")["contiguous"] == 2  # type: ignore[index]

    split = store.ingest(message("d1", [6, 11]), T0 + 1)  # a drained record among live ones
    assert (split.stored, split.gaps_opened, split.gaps_closed) == (2, 0, 0)
    assert gap_rows(store, "d1") == [(3, 5, "missing"), (7, 9, "missing")]

    for seq in (9, 8):
        store.ingest(message("d1", [seq]), T0 + 2)
    closed = store.ingest(message("d1", [5, 7, 12]), T0 + 3)
    assert closed.gaps_closed == 1
    assert gap_rows(store, "d1") == [(3, 4, "missing")]
    last = store.ingest(message("d1", [3, 4]), T0 + 4)
    assert (last.stored, last.gaps_closed) == (2, 1)
    assert gap_rows(store, "d1") == []
    assert stored_seqs(db, "d1") == list(range(1, 13))
    cursor = store.cursor("d1")
    assert cursor is not None and (cursor["highest"], cursor["contiguous"]) == (12, 12)


def test_a_skip_inside_one_batch_and_a_first_seq_above_one_open_gaps(
    store: TelemetryStore,
) -> None:
    result = store.ingest(message("d1", [3, 4, 8]), T0)
    assert result.gaps_opened == 2
    assert gap_rows(store, "d1") == [(1, 2, "missing"), (5, 7, "missing")]


def test_unavailable_marks_missing_seqs_lost(store: TelemetryStore) -> None:
    store.ingest(message("d1", [1, 10]), T0)
    result = store.ingest(message("d1", [5], unavailable=[(2, 4), (9, 9)]), T0 + 1)
    assert (result.stored, result.lost) == (1, 4)
    assert gap_rows(store, "d1") == [
        (2, 4, "lost"),
        (6, 8, "missing"),
        (9, 9, "lost"),
    ]
    # Already-received or already-lost seqs named unavailable again change nothing.
    again = store.ingest(message("d1", unavailable=[(1, 4)]), T0 + 2)
    assert again.lost == 0
    assert store.summary()["lost"] == 4
    assert store.cursor("d1")["contiguous"] == 5  # type: ignore[index]


def test_unavailable_beyond_the_highest_seq_is_lost_without_asking(
    store: TelemetryStore,
) -> None:
    # A device whose spool dropped 1..100 while offline drains the rest and says so.
    result = store.ingest(message("d1", range(101, 104), unavailable=[(1, 100)]), T0)
    assert (result.stored, result.lost, result.gaps_opened) == (3, 100, 0)
    assert gap_rows(store, "d1") == [(1, 100, "lost")]
    assert store.cursor("d1")["contiguous"] == 103  # type: ignore[index]
    # Adjacent lost ranges coalesce into one row.
    store.ingest(message("d1", [106], unavailable=[(104, 105)]), T0)
    assert gap_rows(store, "d1") == [(1, 100, "lost"), (104, 105, "lost")]


# ---------------------------------------------------------------------------- resends
def test_due_resends_respects_grace_retry_and_the_request_limit(
    store: TelemetryStore, db: Database
) -> None:
    add_online_device(db, "d1")
    add_online_device(db, "away", online=0)
    store.ingest(message("d1", [1, 5, 9]), received=T0)
    store.ingest(message("away", [1, 4]), received=T0)

    assert store.due_resends(T0 + 10, grace_s=30) == {}  # young gaps may still be draining
    due = store.due_resends(T0 + 31, grace_s=30, retry_s=60, max_requests=3)
    assert due == {"d1": [SeqRange(2, 4), SeqRange(6, 8)]}  # `away` is offline: not asked
    store.mark_requested("d1", due["d1"], T0 + 31)
    assert store.due_resends(T0 + 60, grace_s=30, retry_s=60, max_requests=3) == {}
    store.ingest(message("d1", [3]), received=T0 + 70)  # a partial answer splits 2..4
    due = store.due_resends(T0 + 91, grace_s=30, retry_s=60, max_requests=3)
    assert due == {"d1": [SeqRange(2, 2), SeqRange(4, 4), SeqRange(6, 8)]}
    store.mark_requested("d1", due["d1"], T0 + 91)
    store.mark_requested("d1", due["d1"], T0 + 151)
    assert [g["requests"] for g in store.gaps("d1") if g["state"] == "missing"] == [3, 3, 3]
    assert store.due_resends(T0 + 200, grace_s=30, retry_s=60, max_requests=3) == {}
    assert store.last_expired == 0  # asked 3 times, but the last ask is not 60 s old yet
    assert store.due_resends(T0 + 212, grace_s=30, retry_s=60, max_requests=3) == {}
    assert store.last_expired == 5
    assert gap_rows(store, "d1") == [(2, 2, "lost"), (4, 4, "lost"), (6, 8, "lost")]
    assert "no answer after 3 resend requests" in store.gaps("d1")[0]["reason"]
    assert store.summary()["lost"] == 5 and store.summary()["gaps_open"] == 1  # away's 2..3
    assert store.cursor("d1")["contiguous"] == 9  # type: ignore[index]

    late = store.ingest(message("d1", [7]), received=T0 + 300)  # it arrived after all
    assert (late.stored, late.recovered) == (1, 1)
    assert store.summary()["lost"] == 4


def test_due_resends_caps_ranges_per_command(store: TelemetryStore, db: Database) -> None:
    add_online_device(db, "d1")
    step = 2 * MAX_TELEMETRY_RECORDS
    for start in range(2, 1000, step):  # 1, 3, 5, ... missing: 499 single-seq gaps
        store.ingest(message("d1", range(start, min(start + step, 1000), 2)), received=T0)
    due = store.due_resends(T0 + 100)
    assert len(due["d1"]) == 200
    assert due["d1"][0] == SeqRange(1, 1)


# ---------------------------------------------------------------------------- compaction
def _fleet_records(store: TelemetryStore, rng: random.Random) -> None:
    """Two devices, 10 minutes at 10 s, a model change halfway, random latencies."""
    for device in ("d1", "d2"):
        batch: list[TelemetryRecord] = []
        for seq in range(1, 61):
            lat = [rng.lognormvariate(math.log(3.0), 0.6) for _ in range(rng.randint(0, 30))]
            batch.append(
                record(
                    seq,
                    T0 + 10.0 * seq + rng.random(),
                    lat,
                    sha=SHA_A if seq <= 30 else SHA_B,
                    power_w=None if seq % 7 == 0 else 1.0 + rng.random(),
                    interval_s=10.0,
                    rss_mb=40 + rng.random() * 10,
                    dropped_total=seq // 20,
                )
            )
        store.ingest(Telemetry(device, tuple(batch)), received=T0 + 700)


_SUM_COLUMNS = (
    "served",
    "invocations",
    "cache_hits",
    "errors",
    *BUCKET_COLUMNS,
)


def _totals(db: Database) -> dict[str, float]:
    """Fleet-wide sums across raw and per-minute rows (must not change on compaction)."""
    raw = db.query_one(
        f"SELECT COUNT(*) AS records, {', '.join(f'SUM({c}) AS {c}' for c in _SUM_COLUMNS)}, "
        "SUM(served * COALESCE(mean_ms, 0)) AS latency_sum_ms, "
        "SUM(COALESCE(power_w, 0) * interval_s) AS power_sum FROM telemetry"
    )
    minute = db.query_one(
        f"SELECT SUM(records) AS records, {', '.join(f'SUM({c}) AS {c}' for c in _SUM_COLUMNS)}, "
        "SUM(latency_sum_ms) AS latency_sum_ms, SUM(power_sum) AS power_sum FROM telemetry_minute"
    )
    assert raw is not None and minute is not None
    return {k: (raw[k] or 0) + (minute[k] or 0) for k in raw}


def test_compaction_preserves_totals_and_buckets_exactly(
    store: TelemetryStore, db: Database
) -> None:
    _fleet_records(store, random.Random(7))
    before = _totals(db)
    by_minute = db.query(
        f"SELECT device_id, minute, model_sha256, COUNT(*) AS n, "
        f"{', '.join(f'SUM({c}) AS {c}' for c in BUCKET_COLUMNS)}, MAX(max_ms) AS max_ms "
        "FROM telemetry WHERE ts < ? GROUP BY device_id, minute, model_sha256",
        (T0 + 300,),
    )
    now = T0 + 300 + 7 * 86_400  # raw older than T0 + 300 goes
    done = store.compact(now, raw_days=7)
    assert done == db.query_one("SELECT SUM(records) AS n FROM telemetry_minute")["n"]  # type: ignore[index]
    assert done == sum(r["n"] for r in by_minute) > 0
    assert db.query_one("SELECT COUNT(*) AS n FROM telemetry WHERE ts < ?", (T0 + 300,))["n"] == 0  # type: ignore[index]
    for expected in by_minute:
        row = db.query_one(
            "SELECT * FROM telemetry_minute WHERE device_id = ? AND minute = ? "
            "AND model_sha256 = ?",
            (expected["device_id"], expected["minute"], expected["model_sha256"]),
        )
        assert row is not None and row["records"] == expected["n"]
        assert [row[c] for c in BUCKET_COLUMNS] == [expected[c] for c in BUCKET_COLUMNS]
        assert row["max_ms"] == expected["max_ms"]
    after = _totals(db)
    for key, value in before.items():
        assert after[key] == pytest.approx(value, rel=1e-12), key
    assert store.compact(now, raw_days=7) == 0  # idempotent: nothing left to fold
    assert _totals(db) == after


def test_small_compaction_batches_give_the_same_aggregates_as_one(tmp_path: Path) -> None:
    results = []
    for name, batch in (("one", 100_000), ("many", 7)):
        database = SqliteDatabase(tmp_path / f"{name}.db")
        store = TelemetryStore(database)
        _fleet_records(store, random.Random(11))
        passes = 0
        while store.compact(T0 + 800 + 86_400, raw_days=1, batch_rows=batch):
            passes += 1
        rows = database.query(
            "SELECT * FROM telemetry_minute ORDER BY device_id, minute, model_sha256"
        )
        results.append((passes, rows))
        database.close()
    (one_passes, one), (many_passes, many) = results
    assert one_passes == 1 and many_passes == math.ceil(120 / 7)
    assert len(one) == len(many) > 0
    for a, b in zip(one, many, strict=True):
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-12), key
            else:
                assert a[key] == b[key], key


def test_minute_rows_past_their_retention_are_deleted(store: TelemetryStore, db: Database) -> None:
    _fleet_records(store, random.Random(5))
    now = T0 + 700 + 7 * 86_400
    store.compact(now, raw_days=7)
    minutes = {r["minute"] for r in db.query("SELECT minute FROM telemetry_minute")}
    assert len(minutes) == 11  # T0 .. T0 + 600
    assert store.compact(now, raw_days=7, minute_days=7 + 300 / 86_400) == 0
    left = {r["minute"] for r in db.query("SELECT minute FROM telemetry_minute")}
    assert left == {m for m in minutes if m >= now - 7 * 86_400 - 300}
    assert 0 < len(left) < len(minutes)


def test_records_span_raw_and_minute_rows(store: TelemetryStore) -> None:
    _fleet_records(store, random.Random(3))
    store.compact(T0 + 300 + 7 * 86_400, raw_days=7)
    rows = store.records("d1", limit=1000)
    resolutions = [r["resolution"] for r in rows]
    assert resolutions[0] == "minute" and resolutions[-1] == "raw"
    assert resolutions == sorted(resolutions, key=lambda r: r == "raw")  # minutes, then raw
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)
    covered = sum(r["records"] for r in rows)
    assert covered == 60
    minute = rows[0]
    assert minute["p50_ms"] is None or minute["p50_ms"] <= minute["p95_ms"] <= minute["max_ms"]
    raw = rows[-1]
    assert raw["seq"] == 60 and raw["p90_ms"] <= raw["p95_ms"] <= raw["p99_ms"]
    # A window and a limit: the newest `limit` rows of the window, oldest first.
    window = store.records("d1", since=T0 + 200, until=T0 + 500, limit=5)
    assert len(window) == 5 and all(T0 + 140 < r["ts"] < T0 + 500 for r in window)
    assert window[-1]["ts"] == max(r["ts"] for r in rows if r["ts"] < T0 + 500)


# ---------------------------------------------------------------------------- percentiles
def test_percentile_from_buckets_stays_in_the_true_quantiles_bucket() -> None:
    rng = random.Random(5)
    worst = 0.0
    for _ in range(200):
        xs = sorted(
            rng.lognormvariate(math.log(rng.choice([0.3, 3.0, 40.0])), rng.uniform(0.05, 0.8))
            for _ in range(rng.randint(20, 2000))
        )
        counts = stats(xs).buckets
        for q in (0.5, 0.95, 0.99):
            true = xs[max(0, math.ceil(q * len(xs)) - 1)]
            estimate = percentile_from_buckets(counts, q, xs[-1])
            assert estimate is not None
            i = bucket_index(true)
            lower = LATENCY_BUCKETS_MS[i - 1] if i else 0.0
            upper = LATENCY_BUCKETS_MS[i] if i < len(LATENCY_BUCKETS_MS) else xs[-1]
            assert lower <= estimate <= upper + 1e-9
            worst = max(worst, abs(estimate - true) / true)
    assert worst < 0.7  # bounded by the widest bucket, (3, 5]: 67 % of its lower edge


def test_percentile_of_an_empty_histogram_is_none_and_inf_bucket_uses_max() -> None:
    assert percentile_from_buckets([0] * BUCKET_COUNT, 0.5) is None
    only_inf = [0] * (BUCKET_COUNT - 1) + [4]
    assert percentile_from_buckets(only_inf, 0.99, max_ms=9000.0) == pytest.approx(
        7500 + 1500 * 0.99
    )
    assert percentile_from_buckets(only_inf, 0.5) == LATENCY_BUCKETS_MS[-1]


# ---------------------------------------------------------------------------- migration
def test_migration_4_upgrades_a_version_3_database_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:3]:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version=3")
    conn.execute(
        "INSERT INTO devices (id, profile, registered_by, registered_at) "
        "VALUES ('pi-1', 'rpi4', 'cli', 1.0)"
    )
    conn.execute("INSERT INTO models (name, version, created) VALUES ('cnn', '1', 2.0)")
    conn.close()

    db = SqliteDatabase(path)
    try:
        assert db.query_one("PRAGMA user_version") == {"user_version": HANDED_OVER}
        assert db.schema_version() == head()
        assert db.query("SELECT id, profile FROM devices") == [{"id": "pi-1", "profile": "rpi4"}]
        assert db.query("SELECT name, version FROM models") == [{"name": "cnn", "version": "1"}]
        tables = {r["name"] for r in db.query("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {
            "telemetry",
            "telemetry_minute",
            "telemetry_cursor",
            "telemetry_gaps",
            "telemetry_latency_totals",
        } <= tables
        assert TelemetryStore(db).ingest(message("pi-1", [1, 2]), T0).stored == 2
    finally:
        db.close()
    assert SqliteDatabase(path).migrate() == head()  # reopening is a no-op


def test_bucket_columns_match_the_protocols_histogram(db: Database) -> None:
    columns = _columns(db, "telemetry")
    assert len(BUCKET_COLUMNS) == BUCKET_COUNT == len(LATENCY_BUCKETS_MS) + 1
    assert set(BUCKET_COLUMNS) <= columns and f"b{BUCKET_COUNT}" not in columns


def _columns(db: Database, table: str) -> set[str]:
    """A table's column names, on either backend."""
    if db.dialect == "sqlite":
        return {r["name"] for r in db.query(f"PRAGMA table_info({table})")}
    rows = db.query(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = ? AND table_schema = current_schema()",
        (table,),
    )
    return {r["column_name"] for r in rows}

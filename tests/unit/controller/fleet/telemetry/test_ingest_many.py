"""TelemetryStore.ingest_many on real SQLite files: the same as ingest() message by message."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import SeqRange, Telemetry
from controller.fleet.telemetry.store import IngestResult, TelemetryStore
from controller.storage.db import Database, IntegrityError
from controller.storage.queries import ingest as ingest_queries
from controller.storage.sqlite import SqliteDatabase
from tests.telemetry_records import SHA_A, SHA_B, T0, message, record

DEVICES = ("d0", "d1", "d2", "d3", "d4")
# Registry rows: two profiles, one device without a profile; d3 and d4 are not registered.
PROFILES = {"d0": "rpi4", "d1": "jetson", "d2": None}
# Every table ingest writes, with the key its rows are sorted by for comparison.
TABLES = {
    "telemetry": "device_id, seq",
    "telemetry_cursor": "device_id",
    "telemetry_gaps": "device_id, seq_first",
    "telemetry_latency_totals": "profile, model_sha256",
    "telemetry_minute": "device_id, minute, model_sha256",
}


def open_db(path: Path) -> Database:
    """A database file with the registry rows of PROFILES."""
    db = SqliteDatabase(path)
    with db.transaction() as tx:
        tx.executemany(
            "INSERT INTO devices (id, profile, online, registered_by, registered_at) "
            "VALUES (?, ?, 1, 'test', 0)",
            list(PROFILES.items()),
        )
    return db


def contents(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every telemetry table, sorted by key: all columns, floats compared exactly."""
    return {
        table: [tuple(row) for row in db.conn.execute(f"SELECT * FROM {table} ORDER BY {key}")]
        for table, key in TABLES.items()
    }


def total(results: Sequence[IngestResult]) -> tuple[int, ...]:
    """The IngestResults added up field by field."""
    return tuple(map(sum, zip(*(dataclasses.astuple(r) for r in results), strict=True)))


class CountingConnection:
    """The connection, counting the statements (execute and executemany calls) sent to it."""

    def __init__(self, conn: Any) -> None:
        """Wrap `conn`."""
        self.conn = conn
        self.statements: list[str] = []

    def __getattr__(self, name: str) -> Any:
        """Everything else is the connection's."""
        return getattr(self.conn, name)

    def execute(self, sql: str, *args: Any) -> Any:
        """Count, then run."""
        self.statements.append(sql)
        return self.conn.execute(sql, *args)

    def executemany(self, sql: str, rows: Any) -> Any:
        """Count, then run."""
        self.statements.append(sql)
        return self.conn.executemany(sql, rows)


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    """A fresh SQLite file with the registry rows; SQLite only: the tests count its statements."""
    database = open_db(tmp_path / "x.db")
    yield database
    database.close()


# ---------------------------------------------------------------------------- property
@st.composite
def telemetry_messages(draw: st.DrawFn, devices: Sequence[str]) -> Telemetry:
    """A message of random seqs (a scatter or a run) and unavailable ranges, random contents."""
    seqs = draw(
        st.sets(st.integers(1, 30), max_size=6)
        | st.builds(lambda a, n: set(range(a, a + n)), st.integers(1, 30), st.integers(1, 8))
    )
    unavailable = draw(
        st.lists(st.tuples(st.integers(1, 34), st.integers(0, 6)), max_size=2)
        if seqs
        else st.lists(st.tuples(st.integers(1, 34), st.integers(0, 6)), min_size=1, max_size=2)
    )
    records = tuple(
        record(
            seq,
            ts=T0 + 10.0 * seq + draw(st.integers(0, 9)),
            latencies=draw(
                st.lists(st.floats(0.05, 900.0, allow_nan=False, allow_infinity=False), max_size=4)
            ),
            sha=draw(st.sampled_from([SHA_A, SHA_B, None])),
            dropped_total=draw(st.integers(0, 3)),
        )
        for seq in sorted(seqs)
    )
    return Telemetry(
        device_id=draw(st.sampled_from(devices)),
        records=records,
        unavailable=tuple(SeqRange(a, a + n) for a, n in unavailable),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> list[tuple[list[Telemetry], str, bool]]:
    """Chunks of messages from 1-5 devices, each with what follows it (resend bookkeeping) and
    whether the caller wraps it in its own transaction."""
    devices = DEVICES[: draw(st.integers(1, 5))]
    pending = draw(st.lists(telemetry_messages(devices), min_size=1, max_size=40))
    chunks: list[tuple[list[Telemetry], str, bool]] = []
    while pending:
        size = draw(st.integers(1, 12))
        chunk, pending = pending[:size], pending[size:]
        chunks.append((chunk, draw(st.sampled_from(["", "ask", "expire"])), draw(st.booleans())))
    return chunks


def after_chunk(store: TelemetryStore, op: str, now: float) -> None:
    """Resend bookkeeping between chunks: ask for every missing range, or give up on them."""
    if op == "ask":
        for device in DEVICES:
            missing = [g for g in store.gaps(device) if g["state"] == "missing"]
            ranges = [SeqRange(g["seq_first"], g["seq_last"]) for g in missing]
            store.mark_requested(device, ranges, now)
    elif op == "expire":
        store.due_resends(now + 1_000, grace_s=0, retry_s=0, max_requests=1)


@pytest.fixture(scope="module")
def two_dbs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Database, Database]]:
    """Two database files for the property test, emptied of telemetry by each example."""
    tmp = tmp_path_factory.mktemp("ingest-many")
    one, many = open_db(tmp / "one.db"), open_db(tmp / "many.db")
    yield one, many
    one.close()
    many.close()


@settings(max_examples=250, deadline=None)
@given(chunks=scenarios(), small_statements=st.booleans())
def test_ingest_many_in_any_chunking_equals_ingest_one_by_one(
    two_dbs: tuple[Database, Database],
    chunks: list[tuple[list[Telemetry], str, bool]],
    small_statements: bool,
) -> None:
    db_one, db_many = two_dbs
    for db in two_dbs:
        with db.transaction() as tx:
            for table in TABLES:
                tx.execute(f"DELETE FROM {table}")
    one, many = TelemetryStore(db_one), TelemetryStore(db_many)
    results_one: list[IngestResult] = []
    results_many: list[IngestResult] = []
    # A few parameters per SELECT: every IN list and OR of ranges is cut into many statements.
    small = (
        mock.patch.object(ingest_queries, "MAX_SQL_PARAMS", 3)
        if small_statements
        else nullcontext()
    )
    for i, (chunk, op, wrapped) in enumerate(chunks):
        now = T0 + 100.0 * i
        results_one += [one.ingest(m, now) for m in chunk]
        with small, db_many.transaction() if wrapped else nullcontext():
            results_many.append(many.ingest_many(chunk, now))
        after_chunk(one, op, now)
        after_chunk(many, op, now)
    assert contents(db_many) == contents(db_one)
    assert total(results_many) == total(results_one)


# ---------------------------------------------------------------------------- examples
def test_a_drain_with_several_messages_of_one_device_in_one_batch(
    sqlite_db: Database,
) -> None:
    store = TelemetryStore(sqlite_db)
    store.ingest(message("d1", [1, 2, 3]), T0)
    batch = [
        message("d1", [10, 11]),  # live records first: 4..9 missing
        message("d0", [1]),
        message("d1", [5, 6]),  # the drain: splits 4..9 into 4..4 and 7..9
        message("d1", [4]),  # closes 4..4
        message("d1", [7, 8, 9]),  # closes 7..9
        message("d1", [5, 12]),  # 5 again, and the next live record
        message("d1", unavailable=[(13, 14)]),  # dropped on the device: lost, never asked for
    ]
    result = store.ingest_many(batch, T0 + 1)
    assert result == IngestResult(
        stored=10, duplicates=1, gaps_opened=1, gaps_closed=2, lost=2, recovered=0
    )
    rows = sqlite_db.query("SELECT seq FROM telemetry WHERE device_id = 'd1' ORDER BY seq")
    assert [r["seq"] for r in rows] == list(range(1, 13))
    assert [(g["seq_first"], g["seq_last"], g["state"]) for g in store.gaps("d1")] == [
        (13, 14, "lost")
    ]
    cursor = store.cursor("d1")
    assert cursor is not None
    assert (cursor["highest"], cursor["contiguous"], cursor["stored"]) == (14, 14, 12)
    assert (cursor["duplicates"], cursor["lost"]) == (1, 2)


def test_statements_per_batch_do_not_grow_with_messages_or_devices(sqlite_db: Database) -> None:
    store = TelemetryStore(sqlite_db)
    counting = CountingConnection(sqlite_db.conn)
    sqlite_db.conn = counting  # type: ignore[assignment]
    counts = []
    for devices in (5, 500):
        live = [message(f"live{devices}-{i:03d}", [1]) for i in range(devices)]
        counting.statements.clear()
        assert store.ingest_many(live, T0).stored == devices
        counts.append(len(counting.statements))
    # BEGIN, cursors, telemetry, cursors, profiles, totals, latency sums, COMMIT.
    assert counts[0] == counts[1] <= 8
    # A resend answer for each of 500 devices (gaps to read and cut): still a few statements.
    store.ingest_many([message(f"dev-{i:03d}", [1, 4]) for i in range(500)], T0 + 1)
    counting.statements.clear()
    answer = store.ingest_many([message(f"dev-{i:03d}", [2, 3]) for i in range(500)], T0 + 2)
    assert (answer.stored, answer.gaps_closed) == (1000, 500)
    # BEGIN, cursors, gaps (2 x 333 ranges), stored refills (2), telemetry, gap deletes,
    # cursors, profiles, totals, latency sums, COMMIT.
    assert len(counting.statements) <= 13
    assert store.summary()["gaps_open"] == 0


def test_a_refill_already_stored_is_not_stored_or_counted_again(sqlite_db: Database) -> None:
    store = TelemetryStore(sqlite_db)
    store.ingest_many([message("d1", [1, 5]), message("d2", [1, 5])], T0)
    # An inconsistent database: seq 3 of d1 is stored although its gap says it is missing.
    row = sqlite_db.query_one("SELECT * FROM telemetry WHERE device_id = 'd1' AND seq = 5")
    assert row is not None
    row["seq"] = 3
    with sqlite_db.transaction() as tx:
        tx.execute(
            f"INSERT INTO telemetry ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )
    result = store.ingest_many(
        [message("d1", [3]), message("d2", [3]), message("d1", [2, 4]), message("d1", [3])],
        T0 + 1,
    )
    assert (result.stored, result.duplicates, result.gaps_closed) == (3, 2, 2)
    assert store.cursor("d1")["stored"] == 4  # type: ignore[index]
    assert store.gaps("d1") == [] and store.gaps("d2") != []


def test_an_empty_batch_changes_nothing(sqlite_db: Database) -> None:
    store = TelemetryStore(sqlite_db)
    assert store.ingest_many([], T0) == IngestResult(0, 0, 0, 0, 0, 0)
    assert contents(sqlite_db) == {table: [] for table in TABLES}


def test_a_batch_failing_late_in_the_callers_transaction_leaves_no_trace(
    sqlite_db: Database,
) -> None:
    store = TelemetryStore(sqlite_db)
    with sqlite_db.transaction() as tx:  # the database refuses the cursor of one device
        tx.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON telemetry_cursor WHEN NEW.device_id = 'd4' "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    with sqlite_db.transaction():
        store.ingest_many([message("d1", [1, 2])], T0)
        with pytest.raises(IntegrityError, match="refused"):
            store.ingest_many([message("d2", [1]), message("d1", [3, 6]), message("d4", [1])], T0)
        store.ingest_many([message("d1", [3])], T0)
    assert [r["device_id"] for r in sqlite_db.query("SELECT device_id FROM telemetry_cursor")] == [
        "d1"
    ]
    assert [r["seq"] for r in sqlite_db.query("SELECT seq FROM telemetry ORDER BY seq")] == [
        1,
        2,
        3,
    ]
    assert store.gaps() == [] and store.cursor("d1")["highest"] == 3  # type: ignore[index]

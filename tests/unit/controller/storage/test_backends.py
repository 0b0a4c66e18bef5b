"""The storage contract both backends keep (SQLite file, PostgreSQL schema): in-place upgrades,
exclusive transactions across connections, savepoints, leases with fencing (docs/storage.md)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from controller.fleet.registry import Fleet
from controller.fleet.rollout.policy import Policy, parse_waves
from controller.runtime.lease import Lease, heartbeat, replicas
from controller.storage import legacy
from controller.storage.db import Database
from controller.storage.open import open_database
from controller.storage.upgrade import head
from tests.paths import TEST_DATA

DATA = TEST_DATA


def test_migrations_upgrade_an_existing_database_in_place(db_target: str) -> None:
    old = open_database(db_target, migrate=False)
    try:
        assert old.schema_version() is None
        # The schema before replicas (legacy migration 7), built by the legacy code path: a
        # fleet somebody already runs.
        with old.migration_lock() as tx:
            assert legacy.apply(tx.sa, upto=legacy.LAST - 1) == legacy.LAST - 1
        with old.transaction() as tx:
            tx.execute(
                "INSERT INTO devices (id, profile, registered_by, registered_at) "
                "VALUES ('pi-1', 'rpi4', 'cli', 1.0)"
            )
            tx.execute("INSERT INTO models (name, version, created) VALUES ('cnn', '1', 2.0)")
        assert not _has_table(old, "leases")
    finally:
        old.close()

    db = open_database(db_target)  # what `edgefleet up` does on start
    try:
        assert db.schema_version() == head()
        assert db.query("SELECT id, profile FROM devices") == [{"id": "pi-1", "profile": "rpi4"}]
        assert db.query("SELECT name, version FROM models") == [{"name": "cnn", "version": "1"}]
        for table in ("leases", "rollout_waves", "replicas"):
            assert _has_table(db, table), table
        assert db.migrate() == head()  # applying again changes nothing
        assert db.query("SELECT COUNT(*) AS n FROM devices") == [{"n": 1}]
    finally:
        db.close()


def test_a_database_from_a_newer_edgefleet_is_refused(db_target: str) -> None:
    db = open_database(db_target)
    try:
        with db.transaction() as tx:
            tx.execute("UPDATE alembic_version SET version_num = 'f00dfeed'")
    finally:
        db.close()
    with pytest.raises(RuntimeError, match=r"schema is at revision f00dfeed, newer than this "):
        open_database(db_target)


def test_exclusive_transactions_wait_for_each_other_across_connections(db_target: str) -> None:
    first = open_database(db_target)
    order: list[str] = []
    entered = threading.Event()

    def other() -> None:
        second = open_database(db_target, migrate=False)  # SQLite: one thread per connection
        try:
            entered.wait(5)
            with second.transaction() as tx:
                order.append("second")
                tx.execute("UPDATE models SET created = created + 1")
        finally:
            second.close()

    thread = threading.Thread(target=other)
    try:
        with first.transaction() as tx:
            tx.execute("INSERT INTO models (name, version, created) VALUES ('m', '1', 0)")
            thread.start()
            entered.set()
            time.sleep(0.5)  # the other transaction is blocked on the lock meanwhile
            order.append("first")
        thread.join(10)
        assert order == ["first", "second"]
        assert first.query("SELECT created FROM models") == [{"created": 1.0}]
    finally:
        thread.join(10)
        first.close()


def test_a_failed_savepoint_keeps_the_rest_of_its_transaction(db_target: str) -> None:
    db = open_database(db_target)
    try:
        with db.transaction() as tx:
            tx.execute("INSERT INTO models (name, version, created) VALUES ('keep', '1', 0)")
            with pytest.raises(Exception, match=r"(?i)unique|duplicate"), db.transaction() as sp:
                sp.execute("INSERT INTO models (name, version, created) VALUES ('gone', '1', 0)")
                sp.execute("INSERT INTO models (name, version, created) VALUES ('keep', '1', 0)")
        assert db.query("SELECT name FROM models") == [{"name": "keep"}]
    finally:
        db.close()


def test_a_lease_has_one_holder_until_it_expires_and_fences_the_old_one(db_target: str) -> None:
    a_db, b_db = open_database(db_target), open_database(db_target)
    try:
        a, b = Lease(a_db, "a", ttl_s=0.6), Lease(b_db, "b", ttl_s=0.6)
        assert a.acquire() and a.epoch == 1
        assert not b.acquire() and b.epoch == 0
        assert a.acquire() and a.epoch == 1  # renewing keeps the term
        time.sleep(0.8)  # a stalls past its expiry (a GC pause, a partition)
        assert b.acquire() and b.epoch == 2
        with a_db.transaction() as tx:
            assert not a.held(tx, a_db.clock())  # the stalled holder's writes are fenced off
        with b_db.transaction() as tx:
            assert b.held(tx, b_db.clock())
            assert not b.held(tx, b_db.clock(), margin_s=1.0)  # 0.6 s TTL: not that long
        assert not a.acquire()  # and it cannot take the lease back while b renews
        state = b.state()
        assert state is not None and (state.holder, state.epoch) == ("b", 2)
        b.release()  # a clean stop hands over at once, without waiting out the TTL
        assert a.acquire() and a.epoch == 3
    finally:
        a_db.close()
        b_db.close()


def test_a_restarted_replica_starts_a_new_term(db_target: str) -> None:
    db = open_database(db_target)
    try:
        before = Lease(db, "r1", ttl_s=30)
        assert before.acquire() and before.epoch == 1
        after = Lease(db, "r1", ttl_s=30)  # the same name after a crash: not the old term
        assert after.acquire() and after.epoch == 2
        with db.transaction() as tx:
            assert after.held(tx, db.clock()) and not before.held(tx, db.clock())
    finally:
        db.close()


def test_replica_heartbeats_are_listed_newest_first(db_target: str) -> None:
    db = open_database(db_target)
    try:
        for name, leader in (("r1", True), ("r2", False)):
            heartbeat(db, name, started=db.clock(), leader=leader,
                      stats={"messages": 3}, client_id=f"c-{name}", shared=True)  # fmt: skip
            time.sleep(0.01)
        rows = replicas(db)
        assert [r["name"] for r in rows] == ["r2", "r1"]
        assert rows[1]["leader"] == 1 and rows[0]["stats"] == {"messages": 3}
        assert all(0 <= r["age_s"] < 5 for r in rows)
    finally:
        db.close()


def test_a_wave_starts_once_even_if_two_drivers_race(db_target: str, tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "home", db=db_target)
    try:
        for device in ("d1", "d2"):
            fleet.register_device(device, "rpi4")
        fleet.add_model(DATA / "tiny_int8.tflite", name="tiny", version="1")
        rollout = fleet.start_rollout("tiny:1", "all", Policy(waves=parse_waves("1d,100")))
        rid = rollout["id"]
        waves = fleet.db.query(
            "SELECT wave FROM rollout_waves WHERE rollout_id = ? ORDER BY wave", (rid,)
        )
        assert waves == [{"wave": 0}]
        policy = Policy(waves=parse_waves("1d,100"))
        # A second driver that read the same state tries to start wave 0 again: refused whole.
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"), fleet.db.transaction() as tx:
            fleet.rollouts._start_wave(tx, rid, 0, policy)
        assert fleet.db.query(
            "SELECT COUNT(*) AS n FROM rollout_waves WHERE rollout_id = ?", (rid,)
        ) == [{"n": 1}]
    finally:
        fleet.close()


def _has_table(db: Database, table: str) -> bool:
    """Whether `table` exists in the database's schema."""
    if db.dialect == "sqlite":
        sql = "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = ?"
    else:
        sql = (
            "SELECT COUNT(*) AS n FROM information_schema.tables "
            "WHERE table_name = ? AND table_schema = current_schema()"
        )
    row = db.query_one(sql, (table,))
    return bool(row and row["n"])


def test_sql_translation_keeps_literals_and_maps_the_sqlite_idioms() -> None:
    from controller.storage.legacy import translate_ddl
    from controller.storage.postgres import translate

    assert translate("SELECT * FROM t WHERE a = ? AND b LIKE '50%?'") == (
        "SELECT * FROM t WHERE a = %s AND b LIKE '50%%?'"
    )
    assert translate("SELECT a % ? FROM t") == "SELECT a %% %s FROM t"
    assert translate("INSERT OR IGNORE INTO t (a) VALUES (?)") == (
        "INSERT INTO t (a) VALUES (%s) ON CONFLICT DO NOTHING"
    )
    assert translate_ddl("CREATE TABLE t (id INTEGER PRIMARY KEY, ts REAL, n INTEGER)") == (
        "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
        "ts DOUBLE PRECISION, n BIGINT)"
    )
    assert translate_ddl("CREATE INDEX i ON t (a, COALESCE(b, ''))") == (
        "CREATE INDEX i ON t (a, (COALESCE(b, '')))"
    )


def test_replicas_command_shows_the_leader_and_counters(
    db_target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from controller.cli.main import app

    db = open_database(db_target)
    try:
        assert Lease(db, "r2").acquire()
        for name in ("r1", "r2"):
            heartbeat(db, name, started=db.clock(), leader=name == "r2",
                      stats={"messages": 7, "records_stored": 70}, client_id=name,
                      shared=True)  # fmt: skip
    finally:
        db.close()
    # --db sets EDGEFLEET_DB for the process (service threads); restore it after the test.
    monkeypatch.setenv("EDGEFLEET_DB", db_target)
    home = ["--home", str(tmp_path / "home")]
    out = CliRunner().invoke(app, ["--db", db_target, "replicas", *home, "--json"])
    assert out.exit_code == 0, out.output
    listed = json.loads(out.output)
    assert listed["leader"] == "r2"
    assert sorted(r["name"] for r in listed["replicas"]) == ["r1", "r2"]
    table = CliRunner().invoke(app, ["--db", db_target, "replicas", *home])
    assert table.exit_code == 0, table.output
    assert "leader" in table.output and "r1" in table.output and "70" in table.output
    bad = CliRunner().invoke(app, ["--db", "mysql://x@y/z", "replicas", *home])
    assert bad.exit_code == 2 and "expected a postgresql:// URL" in bad.output


def test_a_second_live_replica_with_the_same_name_is_refused(
    db_target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from controller.cli.main import app
    from controller.runtime.lease import running_elsewhere

    db = open_database(db_target)
    stop = threading.Event()

    def beat_as_another_process() -> None:
        beats = open_database(db_target, migrate=False)  # SQLite: one thread per connection
        try:
            while not stop.is_set():
                # One transaction: the heartbeat writes this process's host and pid, and a
                # reader between two commits saw itself, not "another process" (flaky).
                with beats.transaction() as tx:
                    heartbeat(beats, "r1", started=0.0, leader=False, stats={}, client_id="c",
                              shared=True)  # fmt: skip
                    tx.execute("UPDATE replicas SET host = 'cam-host', pid = 4242")
                stop.wait(0.3)
        finally:
            beats.close()

    thread = threading.Thread(target=beat_as_another_process)
    thread.start()
    try:
        time.sleep(0.5)
        monkeypatch.setenv("EDGEFLEET_DB", db_target)
        out = CliRunner().invoke(
            app, ["--db", db_target, "up", "--replica", "r1", "--broker", "mqtt://127.0.0.1:9",
                  "--home", str(tmp_path / "home")],
        )  # fmt: skip
        assert out.exit_code == 2, out.output
        assert "replica 'r1' is already running on cam-host (pid 4242)" in out.output
    finally:
        stop.set()
        thread.join(10)
    # Once its heartbeat is stale (a crash), the name is free again: a restart goes ahead.
    with db.transaction() as tx:
        tx.execute("UPDATE replicas SET last_seen = last_seen - 60")
    assert running_elsewhere(db, "r1", wait_s=0) is None
    db.close()

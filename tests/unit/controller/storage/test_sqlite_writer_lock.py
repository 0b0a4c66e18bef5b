"""The process-wide SQLite writer lock: threads of one process hand the write lock over through
it, never through SQLite's sleeping busy handler (controller/storage/sqlite.py, writer_lock)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from controller.storage import sqlite as sqlite_backend
from controller.storage.sqlite import FifoLock, SqliteDatabase, writer_lock
from tests.polling import wait_until

JOIN_S = 30.0


def _no_busy_wait(db: SqliteDatabase) -> SqliteDatabase:
    """With busy_timeout 0, SQLite answers a held write lock with "database is locked" at once
    instead of calling its busy handler: any wait must then be the writer lock's."""
    db.sqlite.execute("PRAGMA busy_timeout=0")
    return db


def test_a_second_thread_waits_for_the_writer_lock_not_for_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    first = _no_busy_wait(SqliteDatabase(path))
    second = _no_busy_wait(SqliteDatabase(path))
    order: list[str] = []
    errors: list[BaseException] = []
    second_tries = threading.Event()

    def write_second() -> None:
        try:
            order.append("second tries")
            second_tries.set()
            with second.transaction() as tx:
                order.append("second writes")
                tx.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
                tx.execute("INSERT INTO t VALUES (2)")
        except BaseException as exc:  # reported to the test thread below
            errors.append(exc)

    try:
        with first.transaction() as tx:
            tx.execute("CREATE TABLE t (v INTEGER)")
            thread = threading.Thread(target=write_second)
            thread.start()
            assert second_tries.wait(JOIN_S)
            # Let the second thread reach its BEGIN: without the writer lock it fails there.
            thread.join(0.2)
            tx.execute("INSERT INTO t VALUES (1)")
            order.append("first commits")
        thread.join(JOIN_S)
        assert not thread.is_alive()
        assert errors == []
        assert order == ["second tries", "first commits", "second writes"]
        rows = first.sqlite.execute("SELECT v FROM t ORDER BY rowid").fetchall()
        assert [r[0] for r in rows] == [1, 2]
    finally:
        first.close()
        second.close()


def test_an_exception_inside_the_transaction_releases_the_writer_lock(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    first = _no_busy_wait(SqliteDatabase(path))
    second = _no_busy_wait(SqliteDatabase(path))
    errors: list[BaseException] = []

    def crash() -> None:
        with first.transaction() as tx:
            tx.execute("CREATE TABLE t (v INTEGER)")
            raise RuntimeError("boom")

    def write_second() -> None:
        try:
            with second.transaction() as tx:
                tx.execute("CREATE TABLE t (v INTEGER)")
        except BaseException as exc:  # reported to the test thread below
            errors.append(exc)

    try:
        with pytest.raises(RuntimeError, match="boom"):
            crash()
        assert not writer_lock(path).locked()
        assert not first.sqlite.in_transaction
        thread = threading.Thread(target=write_second)
        thread.start()
        thread.join(JOIN_S)
        assert not thread.is_alive()
        assert errors == []
    finally:
        first.close()
        second.close()


def test_savepoints_and_snapshots_do_not_take_the_writer_lock(tmp_path: Path) -> None:
    path = tmp_path / "fleet.db"
    db = SqliteDatabase(path)
    lock = writer_lock(path)
    try:
        with db.snapshot():
            assert not lock.locked()
        with db.transaction() as tx:
            assert lock.locked()
            tx.execute("CREATE TABLE t (v INTEGER)")
            # A savepoint inside the transaction: the lock is not re-entrant, so taking it
            # again would hang; a failed savepoint keeps the lock with its transaction.
            with pytest.raises(RuntimeError), db.transaction() as inner:
                inner.execute("INSERT INTO t VALUES (1)")
                raise RuntimeError("only the savepoint rolls back")
            assert lock.locked()
            tx.execute("INSERT INTO t VALUES (2)")
        assert not lock.locked()
        assert [r[0] for r in db.sqlite.execute("SELECT v FROM t").fetchall()] == [2]
    finally:
        db.close()


def test_the_same_file_by_another_path_shares_one_lock(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    assert writer_lock(tmp_path / "dir" / ".." / "fleet.db") is writer_lock(tmp_path / "fleet.db")
    assert writer_lock(tmp_path / "other.db") is not writer_lock(tmp_path / "fleet.db")


def test_a_thread_blocked_by_its_own_other_connection_fails_as_sqlite_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fleet.db"
    first = SqliteDatabase(path)
    second = SqliteDatabase(path)
    # The wait SQLite's busy timeout would have allowed, shortened for the test.
    monkeypatch.setattr(sqlite_backend, "OPEN_TIMEOUT_S", 0.05)
    try:
        with (
            first.transaction(),
            pytest.raises(sqlite3.OperationalError, match="database is locked"),
            second.transaction(),
        ):
            pass
        with second.transaction() as tx:  # released: the next writer gets it
            tx.execute("CREATE TABLE t (v INTEGER)")
    finally:
        first.close()
        second.close()


def test_the_writer_lock_goes_to_its_waiters_in_order() -> None:
    """A thread that releases and asks again at once queues behind those already waiting (a
    threading.Lock usually let it win: the service loop waited behind back-to-back telemetry
    transactions)."""
    lock = FifoLock()
    assert lock.acquire()
    order: list[str] = []

    def take(name: str) -> None:
        assert lock.acquire(timeout=JOIN_S)
        order.append(name)
        lock.release()

    threads = []
    for waiting, name in enumerate(("B", "C"), start=1):
        thread = threading.Thread(target=take, args=(name,))
        thread.start()
        threads.append(thread)
        wait_until(lambda n=waiting: len(lock._waiters) == n, JOIN_S, f"{name} waiting")
    lock.release()
    assert lock.acquire(timeout=JOIN_S)  # asks again at once: after B and C
    order.append("A")
    lock.release()
    for thread in threads:
        thread.join(JOIN_S)
    assert order == ["B", "C", "A"]
    assert not lock.locked()


def test_a_writer_lock_wait_that_times_out_leaves_the_queue() -> None:
    lock = FifoLock()
    assert lock.acquire()
    assert not lock.acquire(timeout=0.01)
    assert len(lock._waiters) == 0
    lock.release()
    assert not lock.locked()
    assert lock.acquire(timeout=0)

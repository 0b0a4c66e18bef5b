"""The SQLite backend: one connection in WAL mode behind a SQLAlchemy engine."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy.pool import NullPool

from controller.storage.db import OPEN_TIMEOUT_S, Connection, Database


class FifoLock:
    """A lock handed to its waiters in the order they asked (threading.Lock is not: a thread
    that releases and asks again at once usually wins over one already waiting, so the service
    loop waited behind several back-to-back telemetry transactions; bench_writer_lock.py)."""

    def __init__(self) -> None:
        """Free, nobody waiting."""
        self._guard = threading.Lock()
        self._waiters: deque[threading.Lock] = deque()
        self._held = False

    def acquire(self, timeout: float = -1) -> bool:
        """Take the lock, after those already waiting; False after `timeout` seconds."""
        with self._guard:
            if not self._held:
                self._held = True
                return True
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        if turn.acquire(timeout=timeout):
            return True  # handed over by release()
        with self._guard:
            try:
                self._waiters.remove(turn)
            except ValueError:
                return True  # handed over just as the wait timed out: ours now
            return False

    def release(self) -> None:
        """Hand the lock to the longest waiter, or free it."""
        with self._guard:
            if self._waiters:
                self._waiters.popleft().release()  # stays held: now the waiter's
            else:
                self._held = False

    def locked(self) -> bool:
        """Whether some thread holds it."""
        return self._held


# One writer lock per database file in this process (keyed by its resolved path): threads of
# one controller (service loop, telemetry thread) hand SQLite's write lock to each other at
# once, instead of through SQLite's busy handler, which sleeps up to 100 ms between retries
# and so woke the waiter late (bench/RESULTS.md: the telemetry thread spent 81 s and the service
# loop 97 s waiting for each other). Other processes still wait through busy_timeout.
_WRITER_LOCKS: dict[str, FifoLock] = {}
_WRITER_LOCKS_GUARD = threading.Lock()


def writer_lock(path: Path) -> FifoLock:
    """The process-wide lock taken around every write transaction on the file at `path`."""
    key = str(path.resolve())
    with _WRITER_LOCKS_GUARD:
        lock = _WRITER_LOCKS.get(key)
        if lock is None:
            lock = _WRITER_LOCKS[key] = FifoLock()
        return lock


def _wrapped(sql: str, params: Any, exc: Exception) -> Exception:
    """The SQLAlchemy error (IntegrityError, OperationalError, …) wrapping a driver error."""
    return sqlalchemy.exc.DBAPIError.instance(sql, params, exc, sqlite3.Error)


class SqliteRaw:
    """SQL text in SQLite's own words on the driver connection, rows as sqlite3.Row (the
    surface of code not yet ported to storage/queries)."""

    __slots__ = ("_sqlite",)

    def __init__(self, sqlite: sqlite3.Connection) -> None:
        """Wrap the driver connection under the engine."""
        self._sqlite = sqlite

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> sqlite3.Cursor:
        """Run one statement; returns the cursor (rows by name and position)."""
        cursor = self._sqlite.cursor()
        cursor.row_factory = sqlite3.Row
        return cursor.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> sqlite3.Cursor:
        """Run one statement per parameter row."""
        cursor = self._sqlite.cursor()
        cursor.row_factory = sqlite3.Row
        return cursor.executemany(sql, rows)

    def run(self, sql: str, params: Sequence[Any], /) -> sqlite3.Cursor:
        """Run compiled SQL (qmark placeholders); rows are tuples. Errors as SQLAlchemy's,
        like every Core statement's."""
        try:
            return self._sqlite.execute(sql, params)
        except sqlite3.Error as exc:
            raise _wrapped(sql, params, exc) from exc

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]], /) -> int:
        """Run compiled SQL once per row; the rows changed in all."""
        try:
            return self._sqlite.executemany(sql, rows).rowcount
        except sqlite3.Error as exc:
            raise _wrapped(sql, rows, exc) from exc

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open on the driver connection."""
        return self._sqlite.in_transaction


class SqliteDatabase(Database):
    """One SQLite connection in WAL mode; schema at the Alembic head."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, migrate: bool = True) -> None:
        """Open (creating if needed) the database and bring its schema up to date."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._writer = writer_lock(path)

        def connect() -> sqlite3.Connection:
            # isolation_level=None: BEGIN/COMMIT are ours, so a batch is one transaction.
            # check_same_thread=False: a Database still belongs to one thread, but one left
            # unclosed (an HTTP worker's) may be garbage-collected, and closed, in another.
            return sqlite3.connect(
                path, isolation_level=None, timeout=OPEN_TIMEOUT_S, check_same_thread=False
            )

        self.engine = sqlalchemy.create_engine(
            "sqlite://", creator=connect, poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
        self.sa = self.engine.connect()
        driver = self.sa.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        self.sqlite = driver
        self.conn = Connection(self.sa, SqliteRaw(driver))
        self._wal_mode()
        # NORMAL is durable across application crashes in WAL mode, and much faster than FULL.
        self.sa.exec_driver_sql("PRAGMA synchronous=NORMAL")
        self.sa.exec_driver_sql("PRAGMA foreign_keys=ON")
        self._savepoints = 0
        self._data_version = -1
        if migrate:
            self.migrate()

    def _wal_mode(self) -> None:
        """Switch to WAL, waiting out another connection that is creating the same file.

        SQLite does not apply the busy timeout to this pragma: two processes (or threads)
        opening a new database at once got "database is locked" at once, which killed the
        controller service's thread when a CLI command opened the fleet beside it.
        """
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        while True:
            try:
                self.sa.exec_driver_sql("PRAGMA journal_mode=WAL")
                return
            except sqlalchemy.exc.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def migration_lock(self) -> Any:
        """BEGIN IMMEDIATE: one migrating connection at a time."""
        return self.transaction()

    @contextmanager
    def transaction(
        self, *, exclusive: bool = True, repeatable: bool = False
    ) -> Iterator[Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on error (IMMEDIATE avoids upgrade deadlocks),
        under the process-wide writer lock of the file (writer_lock).

        Inside an open transaction it is a SAVEPOINT instead: the service wraps a batch of
        messages in one transaction, and one bad message rolls back only its own changes (the
        outer transaction already holds the lock).
        """
        sqlite = self.sqlite
        if sqlite.in_transaction:
            self._savepoints += 1
            name = f"sp{self._savepoints}"
            sqlite.execute(f"SAVEPOINT {name}")
            try:
                yield self.conn
            except BaseException:
                sqlite.execute(f"ROLLBACK TO {name}")
                sqlite.execute(f"RELEASE {name}")
                raise
            sqlite.execute(f"RELEASE {name}")
            return
        # Waited for as long as SQLite's busy timeout would have, and failing as it would: a
        # thread that opened a second connection while its first holds the lock gets the old
        # "database is locked" after OPEN_TIMEOUT_S rather than hanging forever.
        if not self._writer.acquire(timeout=OPEN_TIMEOUT_S):
            raise sqlite3.OperationalError("database is locked")
        try:
            sqlite.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                sqlite.execute("ROLLBACK")
                raise
            sqlite.execute("COMMIT")
        finally:
            self._writer.release()

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """BEGIN (deferred: takes no write lock) … COMMIT: WAL readers see one snapshot."""
        self.sqlite.execute("BEGIN")
        try:
            yield self.conn
        finally:
            self.sqlite.execute("COMMIT")

    def changed_elsewhere(self) -> bool:
        """PRAGMA data_version moves when another connection commits (a CLI command)."""
        version = self.sqlite.execute("PRAGMA data_version").fetchone()[0]
        changed = bool(version != self._data_version)
        self._data_version = version
        return changed

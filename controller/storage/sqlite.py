"""The SQLite backend: one connection in WAL mode, schema version in PRAGMA user_version."""


from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from controller.storage.db import (
    OPEN_TIMEOUT_S,
    Connection,
    Database,
    check_schema_version,
    split_statements,
)
from controller.storage.migrations import MIGRATIONS


class SqliteDatabase(Database):
    """One SQLite connection in WAL mode; schema version in PRAGMA user_version."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, migrate: bool = True) -> None:
        """Open (creating if needed) the database and bring its schema up to date."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so batches are one transaction.
        self.sqlite = sqlite3.connect(path, isolation_level=None, timeout=OPEN_TIMEOUT_S)
        self.sqlite.row_factory = sqlite3.Row
        # sqlite3.Connection is the surface Connection describes; typeshed's wider parameter
        # types (mappings, buffers) are what mypy cannot match against the Protocol.
        self.conn = cast(Connection, self.sqlite)
        self._wal_mode()
        # NORMAL is durable across application crashes in WAL mode, and much faster than FULL.
        self.sqlite.execute("PRAGMA synchronous=NORMAL")
        self.sqlite.execute("PRAGMA foreign_keys=ON")
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
                self.sqlite.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def migrate(self, upto: int | None = None) -> int:
        """Apply every migration newer than the stored user_version (up to `upto`, for upgrade
        tests); return the version."""
        target = len(MIGRATIONS) if upto is None else upto
        with self.transaction():
            current = self.sqlite.execute("PRAGMA user_version").fetchone()[0]
            check_schema_version(current)
            for version, script in enumerate(MIGRATIONS[current:target], start=current + 1):
                for statement in split_statements(script):
                    self.sqlite.execute(statement)
                self.sqlite.execute(f"PRAGMA user_version={version}")
        return int(max(current, target))

    def schema_version(self) -> int:
        """PRAGMA user_version: the number of migrations applied."""
        return int(self.sqlite.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def transaction(
        self, *, exclusive: bool = True, repeatable: bool = False
    ) -> Iterator[Connection]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on error (IMMEDIATE avoids upgrade deadlocks).

        Inside an open transaction it is a SAVEPOINT instead: the service wraps a batch of
        messages in one transaction, and one bad message rolls back only its own changes.
        """
        if self.sqlite.in_transaction:
            self._savepoints += 1
            name = f"sp{self._savepoints}"
            self.sqlite.execute(f"SAVEPOINT {name}")
            try:
                yield self.conn
            except BaseException:
                self.sqlite.execute(f"ROLLBACK TO {name}")
                self.sqlite.execute(f"RELEASE {name}")
                raise
            self.sqlite.execute(f"RELEASE {name}")
            return
        self.sqlite.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.sqlite.execute("ROLLBACK")
            raise
        self.sqlite.execute("COMMIT")

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

    def close(self) -> None:
        """Close the connection."""
        self.sqlite.close()

"""Controller storage: one SQLAlchemy Core schema on SQLite (default) or PostgreSQL, migrated
by Alembic (docs/storage.md)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.exc import IntegrityError as IntegrityError  # re-exported, see below
from sqlalchemy.sql.base import Executable

# How long a connection waits for another one's lock (busy timeout, and opening a new file).
OPEN_TIMEOUT_S = 30.0
# URL schemes that select the PostgreSQL backend (controller/storage/postgres.py).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# IntegrityError: what a Core statement raises when the database refuses a row (a constraint, a
# trigger); the driver's own error is its `.orig`. Statements not yet ported raise the driver's.


class Cursor(Protocol):
    """What callers use of a result: rows, one row, affected row count."""

    @property
    def rowcount(self) -> int:
        """Rows the statement changed."""

    def fetchone(self) -> Any:
        """The next row (indexable by position and by column name), or None."""

    def fetchall(self) -> Sequence[Any]:
        """The remaining rows."""

    def __iter__(self) -> Iterator[Any]:
        """Iterate over the remaining rows."""


class RawSql(Protocol):
    """A backend's runner of SQL text in SQLite's words (`?` placeholders), rows indexable by
    name and position: the surface callers outside storage/ still use until they are ported
    to storage/queries (docs/storage.md)."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor:
        """Run one statement."""

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Cursor:
        """Run one statement for each parameter row."""

    def run(self, sql: str, params: Sequence[Any], /) -> Cursor:
        """Run SQL already in the driver's dialect and paramstyle (compiled from Core by
        queries.Prepared); rows are plain tuples."""

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]], /) -> int:
        """`run` once per parameter row, in one driver executemany; the rows changed."""

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open on the driver connection."""


class Connection:
    """The statements of one transaction: SQLAlchemy Core statements (storage/queries), and
    SQL text in SQLite's words for code not ported yet."""

    __slots__ = ("_raw", "driver", "sa")

    def __init__(self, sa: sqlalchemy.Connection, raw: RawSql) -> None:
        """Wrap the SQLAlchemy connection and the backend's raw-SQL runner of one database."""
        self.sa = sa
        self._raw = raw
        # The driver itself, for statements compiled once from Core (queries.Prepared).
        self.driver = raw

    def execute(self, statement: str | Executable, params: Any = (), /) -> Cursor:
        """Run one statement: Core (params a mapping, or a list of them for executemany) or
        SQL text with `?` placeholders (params a sequence)."""
        if isinstance(statement, str):
            return self._raw.execute(statement, params)
        return self.sa.execute(statement, params or None)

    def executemany(self, statement: str | Executable, rows: Iterable[Any], /) -> Cursor:
        """Run one statement for each parameter row (one round trip where the driver can)."""
        if isinstance(statement, str):
            return self._raw.executemany(statement, rows)
        return self.sa.execute(statement, list(rows))

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open (BEGIN issued, no COMMIT/ROLLBACK yet)."""
        return self._raw.in_transaction

    def rows(self, statement: Executable, params: Mapping[str, Any] | None = None) -> list[
        dict[str, Any]
    ]:
        """The rows of a Core query as dicts."""
        return [dict(r._mapping) for r in self.sa.execute(statement, params)]

    def one(
        self, statement: Executable, params: Mapping[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """The first row of a Core query as a dict, or None."""
        row = self.sa.execute(statement, params).first()
        return dict(row._mapping) if row is not None else None

    def scalar(self, statement: Executable, params: Mapping[str, Any] | None = None) -> Any:
        """The first column of the first row, or None."""
        return self.sa.execute(statement, params).scalar()


class Database:
    """One connection (use one per thread) with migrations applied on open.

    Two backends share this interface: SQLite (the embedded default) and PostgreSQL
    (replicas). SQLAlchemy runs in driver-level autocommit; each backend issues its own
    BEGIN/SAVEPOINT/COMMIT, because the semantics below (BEGIN IMMEDIATE, an advisory lock
    in the same transaction, REPEATABLE READ snapshots) are not SQLAlchemy's defaults.
    """

    dialect = "sqlite"
    engine: Engine
    sa: sqlalchemy.Connection
    conn: Connection

    @contextmanager
    def transaction(
        self, *, exclusive: bool = True, repeatable: bool = False
    ) -> Iterator[Connection]:
        """One transaction (a SAVEPOINT inside an open one), rolled back on error.

        `repeatable`: every statement sees one snapshot (PostgreSQL REPEATABLE READ), for
        read-then-delete code that must not touch rows other replicas commit meanwhile.

        `exclusive` transactions are serialized against every other exclusive one, in every
        process: read-decide-write code (rollouts, registry) relies on it. Telemetry ingest
        passes False and locks only the devices it writes (`lock_devices`), so replicas ingest
        in parallel. SQLite serializes all writers anyway.
        """
        raise NotImplementedError
        yield self.conn  # pragma: no cover

    def migration_lock(self) -> AbstractContextManager[Connection]:
        """The transaction a migration runs in: one process at a time."""
        raise NotImplementedError

    def migrate(self) -> str:
        """Bring the schema to this edgefleet's Alembic head (legacy databases in place);
        return the revision."""
        from controller.storage.upgrade import upgrade

        with self.migration_lock() as tx:
            return upgrade(tx.sa)

    def schema_version(self) -> str | None:
        """The Alembic revision of the database (None before any)."""
        from controller.storage.upgrade import current_revision

        return current_revision(self.sa)

    def lock_devices(self, device_ids: Iterable[str]) -> None:
        """Hold per-device write locks until the transaction ends (no-op where writers are
        serialized anyway, as in SQLite)."""

    def lock_fleet_hours(self, *, shared: bool) -> None:
        """Hold the fleet rollup's fold lock until the transaction ends: shared while ingest
        writes minutes, exclusive while hours are folded (no-op where writers are serialized
        anyway, as in SQLite)."""

    def healthy(self) -> bool:
        """False once the connection is lost for good (the service then stops: a supervisor
        restarts it; messages it did not acknowledge are delivered again)."""
        return not (self.sa.closed or self.sa.invalidated)

    def clock(self) -> float:
        """The time every replica agrees on (the database server's; here this host's)."""
        return time.time()

    def changed_elsewhere(self) -> bool:
        """True when another connection committed since the last call (cheap; may say False
        where the backend cannot tell: the caller then relies on its periodic tick)."""
        return False

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A read-only transaction: every query inside sees the same committed state."""
        raise NotImplementedError
        yield self.conn  # pragma: no cover

    def query(self, sql: str | Executable, params: Any = ()) -> list[dict[str, Any]]:
        """Rows as dicts."""
        if isinstance(sql, str):
            return [dict(row) for row in self.conn.execute(sql, params).fetchall()]
        return self.conn.rows(sql, params or None)

    def query_one(self, sql: str | Executable, params: Any = ()) -> dict[str, Any] | None:
        """First row as a dict, or None."""
        if isinstance(sql, str):
            row = self.conn.execute(sql, params).fetchone()
            return dict(row) if row else None
        return self.conn.one(sql, params or None)

    def close(self) -> None:
        """Close the connection (and its engine: one connection per Database)."""
        self.sa.close()
        self.engine.dispose()


def result(cursor: Any) -> CursorResult[Any]:
    """A Core statement's result, typed (Connection.execute returns Any for both surfaces)."""
    assert isinstance(cursor, CursorResult)
    return cursor


def database_target(home: Path, db: str | None = None) -> str:
    """Where the fleet's database is: `db`, else $EDGEFLEET_DB, else HOME/edgefleet.db."""
    return db or os.environ.get("EDGEFLEET_DB") or str(home / "edgefleet.db")


def is_postgres(target: str) -> bool:
    """Whether a database target is a PostgreSQL URL."""
    return target.startswith(POSTGRES_SCHEMES)


def with_search_path(url: str, schema: str) -> str:
    """A postgresql:// URL whose tables live in `schema` (libpq's options parameter): several
    fleets, or tests, in one database."""
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


def redact_url(url: str) -> str:
    """A database URL fit for logs and errors: the password replaced by ***."""
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def now() -> float:
    """Wall-clock timestamp stored in the database."""
    return time.time()


def to_json(value: Any) -> str:
    """Compact JSON for TEXT columns."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)

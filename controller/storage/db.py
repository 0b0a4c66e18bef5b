"""Controller storage: one schema with versioned migrations on SQLite (default) or PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from controller.storage.migrations import MIGRATIONS

# How long a connection waits for another one's lock (busy timeout, and opening a new file).
OPEN_TIMEOUT_S = 30.0
# URL schemes that select the PostgreSQL backend (controller/storage/postgres.py).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Cursor(Protocol):
    """What callers use of a DB-API cursor: rows, one row, affected row count."""

    rowcount: int

    def fetchone(self) -> Any:
        """The next row (indexable by position and by column name), or None."""

    def fetchall(self) -> list[Any]:
        """The remaining rows."""

    def __iter__(self) -> Iterator[Any]:
        """Iterate over the remaining rows."""


class Connection(Protocol):
    """The connection surface the controller writes SQL against (SQLite's, which the
    PostgreSQL backend mirrors): `?` placeholders, rows indexable by name and position."""

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor:
        """Run one statement."""

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Cursor:
        """Run one statement for each parameter row."""


class Database:
    """One connection (use one per thread) with migrations applied on open.

    Two backends share this interface and the SQL written against it: SQLite (the embedded
    default) and PostgreSQL (replicas). SQL uses `?` placeholders and the subset both run:
    ON CONFLICT upserts, CASE instead of two-argument MAX, no JSON functions (docs/storage.md).
    """

    dialect = "sqlite"
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

    def migrate(self, upto: int | None = None) -> int:
        """Apply the migrations the database lacks (up to `upto`); return its schema version."""
        raise NotImplementedError

    def schema_version(self) -> int:
        """The number of migrations applied to this database."""
        raise NotImplementedError

    def lock_devices(self, device_ids: Iterable[str]) -> None:
        """Hold per-device write locks until the transaction ends (no-op where writers are
        serialized anyway, as in SQLite)."""

    def healthy(self) -> bool:
        """False once the connection is lost for good (the service then stops: a supervisor
        restarts it; messages it did not acknowledge are delivered again)."""
        return True

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

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts."""
        return [dict(row) for row in self.conn.execute(sql, params).fetchall()]

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        """First row as a dict, or None."""
        row = self.conn.execute(sql, params).fetchone()
        return dict(row) if row else None

    def close(self) -> None:
        """Close the connection."""
        raise NotImplementedError


def check_schema_version(current: int) -> None:
    """Refuse a database a newer edgefleet migrated: this one may misread its schema."""
    if current > len(MIGRATIONS):
        raise RuntimeError(
            f"the database schema is version {current}, newer than this edgefleet's "
            f"({len(MIGRATIONS)}): upgrade edgefleet before running it against this database"
        )


def split_statements(script: str) -> list[str]:
    """The statements of a migration script (no migration has a `;` inside a literal)."""
    return [s.strip() for s in script.split(";") if s.strip()]


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

"""PostgreSQL backend: one psycopg 3 connection behind a SQLAlchemy engine.

Queries are SQLAlchemy Core (storage/queries). Code not ported yet writes SQLite's words, which
`translate` turns into PostgreSQL's once per statement text: `?` becomes `%s`, `INSERT OR
IGNORE` becomes `ON CONFLICT DO NOTHING`; its rows index by name and by position like
sqlite3.Row. NUMERIC results (SUM of BIGINT) come back as int or float, never Decimal.
docs/storage.md has the decisions.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import sqlalchemy
from psycopg import postgres
from psycopg.adapt import Dumper, Loader
from psycopg.pq import TransactionStatus
from sqlalchemy.pool import NullPool

from controller.storage.db import OPEN_TIMEOUT_S, Connection, Database, redact_url

# Advisory-lock namespace: every key is hashtext('edgefleet:<schema>:<name>'), so two fleets in
# two schemas of one database never block each other.
_MIGRATE_LOCK = "migrate"
_EXCLUSIVE_LOCK = "exclusive"
_FOLD_LOCK = "fleet-hours"


class Row(Sequence[Any]):
    """One result row: row[0], row["name"], dict(row), like sqlite3.Row."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: tuple[Any, ...], index: dict[str, int]) -> None:
        """Wrap the values and the shared column-name index of their result."""
        self._values = values
        self._index = index

    def __getitem__(self, key: Any) -> Any:
        """By position (int or slice) or by column name."""
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def __len__(self) -> int:
        """Number of columns."""
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        """The values in column order (as sqlite3.Row iterates)."""
        return iter(self._values)

    def __eq__(self, other: object) -> bool:
        """Equal to a row or tuple with the same values."""
        if isinstance(other, Row):
            return self._values == other._values
        return isinstance(other, tuple) and self._values == other

    def __hash__(self) -> int:
        """Hash of the values."""
        return hash(self._values)

    def keys(self) -> list[str]:
        """Column names, so dict(row) works."""
        return list(self._index)

    def __repr__(self) -> str:
        """Like a dict of the row."""
        return repr(dict(zip(self._index, self._values, strict=True)))


def _row_factory(cursor: Any) -> Any:
    """psycopg row factory building Rows that share one name index per result."""
    description = cursor.description or ()
    index = {column.name: i for i, column in enumerate(description)}

    def make(values: Sequence[Any]) -> Row:
        return Row(tuple(values), index)

    return make


class _NumericLoader(Loader):
    """NUMERIC as int when integral text, float otherwise (SUM(BIGINT) is NUMERIC here; SQLite
    returns int, and Decimal breaks JSON and float arithmetic)."""

    def load(self, data: Any) -> int | float:
        """Parse the text form."""
        text = bytes(data).decode()
        if any(c in text for c in ".eEN"):  # fractions, exponents, NaN
            return float(text)
        return int(text)


class _BoolAsIntDumper(Dumper):
    """Python bools as integer 0/1: the schema stores flags in INTEGER columns (as SQLite)."""

    oid = postgres.types["int4"].oid

    def dump(self, obj: Any) -> bytes:
        """1 or 0."""
        return b"1" if obj else b"0"


@functools.lru_cache(maxsize=2048)
def translate(sql: str) -> str:
    """The PostgreSQL text of one controller statement (cached: the texts are few, apart from
    IN lists of varying length, which the bound keeps from growing without limit)."""
    out: list[str] = []
    quote: str | None = None
    for ch in sql:
        if quote:
            out.append("%%" if ch == "%" else ch)
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "?":
            out.append("%s")
        elif ch == "%":
            out.append("%%")
        else:
            out.append(ch)
    text = "".join(out)
    if re.match(r"\s*INSERT\s+OR\s+IGNORE\s+INTO\b", text, re.IGNORECASE):
        text = re.sub(r"INSERT\s+OR\s+IGNORE", "INSERT", text, count=1, flags=re.IGNORECASE)
        text = text.rstrip().rstrip(";") + " ON CONFLICT DO NOTHING"
    return text




class PgRaw:
    """SQL text in SQLite's words, translated, on the driver connection; rows like sqlite3.Row
    (the surface of code not yet ported to storage/queries)."""

    __slots__ = ("pg",)

    def __init__(self, pg: psycopg.Connection[Any]) -> None:
        """Wrap the autocommit driver connection under the engine."""
        self.pg = pg

    def _cursor(self) -> Any:
        """A cursor with sqlite3.Row-like rows that writes Python bools as 0/1 (this SQL stores
        flags in INTEGER columns, as SQLite does)."""
        cursor = self.pg.cursor(row_factory=_row_factory)
        cursor.adapters.register_dumper(bool, _BoolAsIntDumper)
        return cursor

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Any:
        """Run one statement; returns the cursor (rows, rowcount)."""
        return self._cursor().execute(translate(sql), tuple(params))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any:
        """Run one statement per parameter row (psycopg pipelines them: one round trip)."""
        cursor = self._cursor()
        cursor.executemany(translate(sql), [tuple(r) for r in rows])
        return cursor

    def run(self, sql: str, params: Sequence[Any], /) -> Any:
        """Run compiled SQL (%s placeholders); rows are tuples. Errors as SQLAlchemy's, like
        every Core statement's."""
        try:
            return self.pg.execute(sql, params)
        except psycopg.Error as exc:
            raise sqlalchemy.exc.DBAPIError.instance(sql, params, exc, psycopg.Error) from exc

    def run_many(self, sql: str, rows: Sequence[Sequence[Any]], /) -> int:
        """Run compiled SQL once per row (psycopg pipelines them: one round trip); the rows
        changed in all."""
        try:
            cursor = self.pg.cursor()
            cursor.executemany(sql, rows)
            return cursor.rowcount
        except psycopg.Error as exc:
            raise sqlalchemy.exc.DBAPIError.instance(sql, rows, exc, psycopg.Error) from exc

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction is open on the driver connection."""
        return self.pg.info.transaction_status != TransactionStatus.IDLE


def _connect(url: str) -> psycopg.Connection[Any]:
    """A psycopg connection in autocommit (transactions are explicit BEGIN/COMMIT), with
    NUMERIC read as int/float."""
    try:
        pg = psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=int(OPEN_TIMEOUT_S),
            application_name="edgefleet",
        )
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConnectionError(f"cannot connect to {redact_url(url)}: {first}") from None
    pg.adapters.register_loader("numeric", _NumericLoader)
    return pg


class PostgresDatabase(Database):
    """One PostgreSQL connection; tables in the connection's search_path schema."""

    dialect = "postgresql"

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        """Connect, and bring the schema (in the connection's search_path) up to date."""
        self.url = url
        pg = _connect(url)  # first here: a refused connection is one clear line
        self.engine = sqlalchemy.create_engine(
            "postgresql+psycopg://",
            creator=lambda: pg,
            poolclass=NullPool,
            isolation_level="AUTOCOMMIT",
        )
        self.sa = self.engine.connect()
        self.pg = pg
        self.conn = Connection(self.sa, PgRaw(pg))
        schema = pg.execute("SELECT current_schema()").fetchone()
        if schema is None or schema[0] is None:
            self.close()
            raise ConnectionError(
                f"{url.split('@')[-1]}: no schema to create tables in (search_path is empty "
                "or names schemas that do not exist)"
            )
        self.schema = str(schema[0])
        self._savepoints = 0
        if migrate:
            self.migrate()

    def _lock_key(self, name: str) -> str:
        """The hashtext argument of a named advisory lock in this schema."""
        return f"edgefleet:{self.schema}:{name}"

    def _advisory_lock(self, name: str) -> None:
        """Take a transaction-scoped advisory lock (released at COMMIT/ROLLBACK)."""
        self.pg.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._lock_key(name),))

    @contextmanager
    def migration_lock(self) -> Iterator[Connection]:
        """A transaction holding the migrate lock: replicas that start together migrate one at
        a time (the second finds the schema current)."""
        with self.transaction(exclusive=False) as tx:
            self._advisory_lock(_MIGRATE_LOCK)
            yield tx

    @contextmanager
    def transaction(
        self, *, exclusive: bool = True, repeatable: bool = False
    ) -> Iterator[Connection]:
        """BEGIN … COMMIT (a SAVEPOINT inside an open transaction), rolled back on error.

        Exclusive transactions take one advisory lock first, so read-decide-write code runs
        one at a time across replicas, as every SQLite transaction does (BEGIN IMMEDIATE).
        """
        if self.conn.in_transaction:
            if exclusive:
                self._advisory_lock(_EXCLUSIVE_LOCK)  # re-entrant within a session
            self._savepoints += 1
            name = f"sp{self._savepoints}"
            self.pg.execute(f"SAVEPOINT {name}")
            try:
                yield self.conn
            except BaseException:
                self.pg.execute(f"ROLLBACK TO SAVEPOINT {name}")
                self.pg.execute(f"RELEASE SAVEPOINT {name}")
                raise
            self.pg.execute(f"RELEASE SAVEPOINT {name}")
            return
        self.pg.execute("BEGIN ISOLATION LEVEL REPEATABLE READ" if repeatable else "BEGIN")
        try:
            if exclusive:
                self._advisory_lock(_EXCLUSIVE_LOCK)
            yield self.conn
        except BaseException:
            if not self.pg.closed:
                self.pg.execute("ROLLBACK")
            raise
        self.pg.execute("COMMIT")

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A REPEATABLE READ, READ ONLY transaction: one snapshot for every query inside."""
        self.pg.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield self.conn
        finally:
            self.pg.execute("COMMIT")

    def healthy(self) -> bool:
        """Whether the connection still works (psycopg marks it closed or broken for good)."""
        return not (self.pg.closed or self.pg.broken) and super().healthy()

    def clock(self) -> float:
        """The server's clock: leases never depend on the replicas' clocks agreeing."""
        row = self.pg.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8").fetchone()
        assert row is not None  # SELECT without FROM always returns one row
        return float(row[0])

    def lock_fleet_hours(self, *, shared: bool) -> None:
        """The fold lock: ingest batches share it, the hour fold takes it alone, so the fold
        never misses minutes a batch that read the old fold mark is still writing."""
        call = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        self.pg.execute(f"SELECT {call}(hashtext(%s))", (self._lock_key(_FOLD_LOCK),))

    def lock_devices(self, device_ids: Iterable[str]) -> None:
        """Per-device advisory locks, taken in hash order so two batches never deadlock."""
        keys = sorted({self._lock_key(f"device:{d}") for d in device_ids})
        if keys:
            self.pg.execute(
                "SELECT pg_advisory_xact_lock(h) FROM "
                "(SELECT hashtext(k) AS h FROM unnest(%s::text[]) AS k ORDER BY h) AS ordered",
                (keys,),
            )

"""The controller's queries, one module per domain, in SQLAlchemy Core: the only SQL of the
controller (a test and an import-linter contract keep it so; docs/storage.md).

Each function takes the `Connection` of the caller's transaction (or `db.conn` for a read
outside one) and returns plain values: dicts, tuples, numbers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import Table, bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from controller.storage.db import Connection

# Both dialects' INSERT with ON CONFLICT (the same methods, one class per dialect).
Upsert = sqlite.Insert | postgresql.Insert
_T = TypeVar("_T")
# Bound parameters per statement on the batch paths: SQLite's limit before 3.32 (newer allow
# 32,766), so the cursors of a whole 500-message drain from 500 devices are one statement.
MAX_SQL_PARAMS = 999


def _insert(conn: Connection, table: Table) -> Upsert:
    """The dialect's INSERT, which has on_conflict_do_update/do_nothing."""
    return dialect_insert(conn.sa.dialect.name, table)


def dialect_insert(dialect: str, table: Table) -> Upsert:
    """The INSERT of dialect `dialect` ("sqlite" or "postgresql"), with ON CONFLICT."""
    if dialect == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def per_dialect(build: Callable[[str], _T]) -> Callable[[Connection], _T]:
    """A statement built once per dialect (upserts differ in class, not in text), cached."""
    cached = functools.cache(build)

    def get(conn: Connection) -> _T:
        return cached(conn.sa.dialect.name)

    return get


@functools.cache
def _positional_dialect(name: str) -> Dialect:
    """A dialect instance rendering positional placeholders its driver takes as they are."""
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import psycopg

        return psycopg.dialect(paramstyle="format")  # type: ignore[no-untyped-call]
    return sqlite.pysqlite.dialect(paramstyle="qmark")


class Prepared:
    """A Core statement compiled once per dialect to positional SQL text, run on the driver
    connection with plain tuples (rows come back as tuples).

    For the hot path (telemetry ingest: no per-row dict, no compile-cache lookup per call),
    and for every ON CONFLICT statement: SQLAlchemy 2.0 caches no compiled form of the
    dialects' INSERT … ON CONFLICT, so it would compile one (milliseconds) per execution.
    Rows are tuples in the order of `order` (checked at compile time) or mappings by
    parameter name; literal values bound in the statement keep their value.
    """

    def __init__(
        self, build: Callable[[str], ClauseElement], order: Sequence[str] | None = None
    ) -> None:
        """`build(dialect)` makes the statement; `order` names a tuple row's parameters."""
        self._build = build
        self.order = None if order is None else tuple(order)
        self._compiled: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]] = {}
        self._expanded: dict[tuple[str, int], str] = {}

    def _get(self, conn: Connection) -> tuple[str, tuple[str, ...], dict[str, Any]]:
        """(SQL text, parameter names in order, bound literal values) in the dialect."""
        name = conn.sa.dialect.name
        found = self._compiled.get(name)
        if found is None:
            compiled = self._build(name).compile(dialect=_positional_dialect(name))
            assert isinstance(compiled, SQLCompiler)
            names = tuple(compiled.positiontup or ())
            if self.order is not None and names != self.order:
                raise AssertionError(f"parameter order {names} is not {self.order}")
            fixed = {
                k: b.effective_value for k, b in compiled.binds.items() if b.value is not None
            }
            found = self._compiled[name] = (str(compiled), names, fixed)
        return found

    def sql(self, conn: Connection) -> str:
        """The statement's text in the connection's dialect."""
        return self._get(conn)[0]

    def _row(self, names: tuple[str, ...], fixed: dict[str, Any], row: Any) -> tuple[Any, ...]:
        """One parameter row as the positional tuple the driver takes."""
        if isinstance(row, tuple):
            return row
        return tuple(row[n] if n in row else fixed[n] for n in names)

    def execute(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Any:
        """Run the statement once; the result (rows as tuples, rowcount)."""
        sql, names, fixed = self._get(conn)
        return conn.driver.run(sql, self._row(names, fixed, params or {}))

    def execute_row(self, conn: Connection, row: tuple[Any, ...]) -> Any:
        """Run the statement once with a positional row (parameters in compiled order)."""
        return conn.driver.run(self._get(conn)[0], row)

    def execute_in(self, conn: Connection, values: Sequence[Any]) -> Any:
        """Run a statement whose only parameter is an expanding IN list (`bindparam(name,
        expanding=True)`) with `values`: the list's placeholders are written per length, the
        statement is compiled once."""
        sql, names, _ = self._get(conn)
        key = (conn.sa.dialect.name, len(values))
        text = self._expanded.get(key)
        if text is None:
            marker = "%s" if conn.sa.dialect.name == "postgresql" else "?"
            (name,) = names
            text = sql.replace(f"__[POSTCOMPILE_{name}]", ", ".join([marker] * len(values)))
            if len(self._expanded) < 4096:
                self._expanded[key] = text
        return conn.driver.run(text, tuple(values))

    def executemany_count(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> int:
        """executemany, returning the rows changed in all."""
        sql, names, fixed = self._get(conn)
        return conn.driver.run_many(sql, [self._row(names, fixed, r) for r in rows])

    def executemany(
        self, conn: Connection, rows: Sequence[tuple[Any, ...] | Mapping[str, Any]]
    ) -> None:
        """Run the statement once per row (one driver executemany); rows all tuples in
        compiled order, or all mappings."""
        if not rows:
            return
        sql, names, fixed = self._get(conn)
        if isinstance(rows[0], tuple):  # positional already (the hot path): as they are
            conn.driver.run_many(sql, rows)  # type: ignore[arg-type]
        else:
            conn.driver.run_many(sql, [self._row(names, fixed, r) for r in rows])


def prepared_upsert(
    table: Table,
    key: Sequence[str],
    columns: Sequence[str],
    update: Iterable[str] | Callable[[Any], Mapping[str, Any]] | None = None,
) -> Prepared:
    """An upsert (see `upsert`) of `columns`, compiled once per dialect; rows are mappings
    by column name, or tuples in the order of `columns`."""

    def build(dialect: str) -> ClauseElement:
        stmt = upsert(dialect, table, key, update)
        return stmt.values({c: bindparam(c) for c in columns})

    return Prepared(build, columns)


def upsert(
    conn: Connection | str,
    table: Table,
    key: Sequence[str],
    update: Iterable[str] | Callable[[Any], Mapping[str, Any]] | None = None,
) -> Upsert:
    """INSERT … ON CONFLICT (key) DO UPDATE SET each `update` column to the inserted value
    (or, given a function of `excluded`, to the expressions it returns); DO NOTHING when
    `update` is empty. SQLite and PostgreSQL spell it alike, but SQLAlchemy has it per
    dialect: this picks the connection's (or the one named)."""
    dialect = conn if isinstance(conn, str) else conn.sa.dialect.name
    stmt = dialect_insert(dialect, table)
    if not update:
        return stmt.on_conflict_do_nothing(index_elements=list(key))
    if callable(update):
        values = dict(update(stmt.excluded))
    else:
        values = {name: stmt.excluded[name] for name in update}
    return stmt.on_conflict_do_update(index_elements=list(key), set_=values)


def insert_ignore(conn: Connection, table: Table) -> Upsert:
    """INSERT … ON CONFLICT DO NOTHING (any unique key)."""
    return _insert(conn, table).on_conflict_do_nothing()


def dicts(conn: Connection, stmt: Any, params: Mapping[str, Any] | None = None) -> list[
    dict[str, Any]
]:
    """Rows of a query as dicts (keys zipped onto the plain rows: no `Row._mapping` each)."""
    result = conn.sa.execute(stmt, params)
    keys = list(result.keys())
    return [dict(zip(keys, r, strict=True)) for r in result.tuples()]


def first(
    conn: Connection, stmt: Any, params: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The first row of a query as a dict, or None."""
    row = conn.sa.execute(stmt, params).first()
    return dict(row._mapping) if row is not None else None

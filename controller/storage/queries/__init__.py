"""The controller's queries, one module per domain, in SQLAlchemy Core: the only SQL of the
controller (a test and an import-linter contract keep it so; docs/storage.md).

Each function takes the `Connection` of the caller's transaction (or `db.conn` for a read
outside one) and returns plain values: dicts, tuples, numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite

from controller.storage.db import Connection

# Both dialects' INSERT with ON CONFLICT (the same methods, one class per dialect).
Upsert = sqlite.Insert | postgresql.Insert


def _insert(conn: Connection, table: Table) -> Upsert:
    """The dialect's INSERT, which has on_conflict_do_update/do_nothing."""
    if conn.sa.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def upsert(
    conn: Connection,
    table: Table,
    key: Sequence[str],
    update: Iterable[str] | Mapping[str, Any] | None = None,
) -> Upsert:
    """INSERT … ON CONFLICT (key) DO UPDATE SET each `update` column to the inserted value
    (or, for a mapping, to the given expression); DO NOTHING when `update` is empty. SQLite
    and PostgreSQL spell it alike, but SQLAlchemy has it per dialect: this picks one."""
    stmt = _insert(conn, table)
    if not update:
        return stmt.on_conflict_do_nothing(index_elements=list(key))
    if isinstance(update, Mapping):
        values = dict(update)
    else:
        values = {name: stmt.excluded[name] for name in update}
    return stmt.on_conflict_do_update(index_elements=list(key), set_=values)


def insert_ignore(conn: Connection, table: Table) -> Upsert:
    """INSERT … ON CONFLICT DO NOTHING (any unique key)."""
    return _insert(conn, table).on_conflict_do_nothing()


def dicts(conn: Connection, stmt: Any, params: Mapping[str, Any] | None = None) -> list[
    dict[str, Any]
]:
    """Rows of a query as dicts."""
    return [dict(r._mapping) for r in conn.sa.execute(stmt, params)]


def first(
    conn: Connection, stmt: Any, params: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The first row of a query as a dict, or None."""
    row = conn.sa.execute(stmt, params).first()
    return dict(row._mapping) if row is not None else None

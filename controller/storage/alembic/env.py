"""Alembic environment: revisions run on the connection storage/upgrade.py hands over, inside
its transaction (BEGIN IMMEDIATE on SQLite, the migrate advisory lock on PostgreSQL)."""

from __future__ import annotations

import sqlalchemy
from alembic import context

from controller.storage.tables import metadata


def run() -> None:
    """Run the revisions online on the given connection; offline (SQL script) otherwise."""
    conn = context.config.attributes.get("connection")
    if not isinstance(conn, sqlalchemy.Connection):
        raise RuntimeError(
            "edgefleet's migrations run on an open database: `edgefleet db upgrade`"
        )
    context.configure(connection=conn, target_metadata=metadata, transaction_per_migration=False)
    with context.begin_transaction():
        context.run_migrations()


run()

"""Opening the fleet database: a postgresql:// URL or an SQLite file path picks the backend."""

from __future__ import annotations

from pathlib import Path

from controller.storage.db import Database, is_postgres, redact_url
from controller.storage.sqlite import SqliteDatabase


def open_database(target: str | Path, *, migrate: bool = True) -> Database:
    """Open a database: a postgresql:// URL, or the path of an SQLite file; `migrate=False`
    only for readers of a schema someone already brought up to date (metrics scrapes)."""
    text = str(target)
    if is_postgres(text):
        # psycopg only when asked for: a device-test venv (make test-slim) has none.
        from controller.storage.postgres import PostgresDatabase

        return PostgresDatabase(text, migrate=migrate)
    if "://" in text:
        raise ValueError(
            f"database {redact_url(text)!r}: expected a postgresql:// URL or an SQLite file path"
        )
    return SqliteDatabase(Path(text), migrate=migrate)

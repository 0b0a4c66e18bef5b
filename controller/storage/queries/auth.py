"""HTTP API bearer tokens (controller/http/auth.py): only the token's sha256 is stored."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, insert, select, update

from controller.storage.db import Connection
from controller.storage.queries import dicts, first
from controller.storage.tables import api_tokens as t


def token_exists(conn: Connection, name: str) -> bool:
    """Whether a token named `name` exists."""
    return conn.sa.execute(select(t.c.name).where(t.c.name == name)).first() is not None


def add_token(conn: Connection, name: str, sha256: str, role: str, created: float) -> None:
    """Store a new token by its hash."""
    conn.sa.execute(insert(t).values(name=name, sha256=sha256, role=role, created=created))


def tokens(conn: Connection) -> list[dict[str, Any]]:
    """name, role, created, last_used of every token, by name."""
    return dicts(conn, select(t.c.name, t.c.role, t.c.created, t.c.last_used).order_by(t.c.name))


def delete_token(conn: Connection, name: str) -> int:
    """Delete token `name`; the number of rows deleted (0 or 1)."""
    return conn.sa.execute(delete(t).where(t.c.name == name)).rowcount


def token_by_hash(conn: Connection, sha256: str) -> dict[str, Any] | None:
    """name, sha256, role, last_used of the token with this hash, or None."""
    return first(
        conn, select(t.c.name, t.c.sha256, t.c.role, t.c.last_used).where(t.c.sha256 == sha256)
    )


def touch_token(conn: Connection, name: str, ts: float) -> None:
    """Record a use of token `name`."""
    conn.sa.execute(update(t).where(t.c.name == name).values(last_used=ts))

"""HTTP API bearer tokens: created once, stored as sha256 only, looked up per request."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from agent.protocol import ProtocolError, validate_name
from controller.errors import FleetError
from controller.storage.db import Database, database_target, now
from controller.storage.open import open_database
from controller.storage.queries import auth as q

ROLES = ("read", "admin")
# The admin token `edgefleet up --http` makes for the dashboard and the demo, and its file.
LOCAL_TOKEN_NAME = "local"
TOKEN_FILE = "http-token"
# secrets.token_urlsafe(32): 256 random bits, 43 URL-safe characters (fits a URL fragment).
TOKEN_BYTES = 32
# last_used is written at most this often per token, so reads stay reads (no write lock each).
LAST_USED_RESOLUTION_S = 60.0


def token_sha256(token: str) -> str:
    """The stored form of a token: hex sha256 of its UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(db: Database, name: str, role: str = "read", *, local: bool = False) -> str:
    """Make a new token NAME with ROLE; return it (the only time it is seen in clear).

    The name `local` belongs to `up --http`, which replaces that token when its file is gone.
    """
    try:
        validate_name("token name", name)
    except ProtocolError as exc:
        raise FleetError(str(exc)) from None
    if name == LOCAL_TOKEN_NAME and not local:
        raise FleetError(f"token name {name!r} is reserved for `edgefleet up --http`")
    if role not in ROLES:
        raise FleetError(f"--role must be {' or '.join(ROLES)}, got {role!r}")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    with db.transaction() as tx:
        if q.token_exists(tx, name):
            raise FleetError(f"token {name!r} exists (revoke it first: `edgefleet tokens revoke`)")
        q.add_token(tx, name, token_sha256(token), role, now())
    return token


def list_tokens(db: Database) -> list[dict[str, Any]]:
    """Every token's name, role, creation and last use (never the token or its hash)."""
    return q.tokens(db.conn)


def revoke_token(db: Database, name: str) -> None:
    """Delete token NAME; requests bearing it get 401 from then on."""
    with db.transaction() as tx:
        if not q.delete_token(tx, name):
            raise FleetError(f"unknown token {name!r} (see `edgefleet tokens list`)")


def authenticate(db: Database, token: str) -> dict[str, Any] | None:
    """The token's row (name, role) or None; looked up by hash, so timing reveals no prefix."""
    digest = token_sha256(token)
    row = q.token_by_hash(db.conn, digest)
    if row is None or not hmac.compare_digest(row["sha256"], digest):
        return None
    ts = now()
    if row["last_used"] is None or ts - row["last_used"] > LAST_USED_RESOLUTION_S:
        with db.transaction() as tx:
            q.touch_token(tx, row["name"], ts)
    return {"name": row["name"], "role": row["role"]}


def ensure_local_token(home: Path, db_target: str | None = None) -> str:
    """The `local` admin token from HOME/http-token; (re)made when the file or row is gone."""
    path = home / TOKEN_FILE
    home.mkdir(parents=True, exist_ok=True)  # the database may live elsewhere (PostgreSQL)
    db = open_database(database_target(home, db_target))
    try:
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            token = ""
        if token:
            row = q.token_by_hash(db.conn, token_sha256(token))
            if row is not None and row["name"] == LOCAL_TOKEN_NAME:
                os.chmod(path, 0o600)  # the owner only, even if someone widened it
                return token
        # Only the hash is stored: a lost file cannot be recovered, so the token is replaced.
        with db.transaction() as tx:
            q.delete_token(tx, LOCAL_TOKEN_NAME)
        token = create_token(db, LOCAL_TOKEN_NAME, "admin", local=True)
    finally:
        db.close()
    _write_secret(path, token + "\n")
    return token


def _write_secret(path: Path, text: str) -> None:
    """Write a file readable by its owner only (0600 from creation), replacing it atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)

"""Schema upgrades with Alembic, run programmatically on the open connection: a new database
is created by the revisions, a legacy one is first brought to the baseline by the frozen legacy
migrations and stamped (docs/storage.md)."""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import Any

import sqlalchemy
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from controller.storage import legacy
from controller.storage.tables import metadata

log = logging.getLogger(__name__)
# Alembic logs two INFO lines ("Context impl …", "Will assume …") each time a connection's
# revision is read, which every open does; only what it applies is worth a line (below).
logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)

SCRIPTS = Path(__file__).resolve().parent / "alembic"
# The revision that equals the last legacy version's schema.
BASELINE = "0001"


def config(conn: sqlalchemy.Connection | None = None) -> Config:
    """An Alembic config without alembic.ini: our scripts, and the connection to run on."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


@functools.cache
def scripts() -> ScriptDirectory:
    """The revision scripts (read once per process)."""
    return ScriptDirectory.from_config(config())


def head() -> str:
    """The newest revision this edgefleet knows."""
    found = scripts().get_current_head()
    assert found is not None
    return found


def current_revision(conn: sqlalchemy.Connection) -> str | None:
    """The database's Alembic revision, or None before Alembic took it over."""
    return MigrationContext.configure(conn).get_current_revision()


def _refuse_unknown(revision: str) -> None:
    """Refuse a database a newer edgefleet migrated: this one may misread its schema."""
    try:
        known = scripts().get_revision(revision) is not None
    except CommandError:
        known = False
    if not known:
        raise RuntimeError(
            f"the database schema is at revision {revision}, newer than this edgefleet's "
            f"({head()}): upgrade edgefleet before running it against this database"
        )


def upgrade(conn: sqlalchemy.Connection) -> str:
    """Bring the database to the head revision inside the caller's transaction; return it."""
    revision = current_revision(conn)
    if revision == head():
        return revision
    if revision is None:
        stamped = legacy.version(conn)
        if stamped > legacy.LAST:
            raise RuntimeError(
                f"the database schema is version {stamped}, newer than this edgefleet's "
                f"legacy versions ({legacy.LAST}) and not managed by Alembic: upgrade "
                "edgefleet before running it against this database"
            )
        if stamped > 0:  # an older edgefleet's database: legacy steps, then the baseline
            log.info("bringing a legacy database (version %d) to the Alembic baseline", stamped)
            legacy.apply(conn)
            legacy.stamp(conn, legacy.HANDED_OVER)
            command.stamp(config(conn), BASELINE)
            revision = BASELINE
            if revision == head():
                return revision
    else:
        _refuse_unknown(revision)
    log.info("upgrading the database schema from %s to revision %s", revision or "new", head())
    command.upgrade(config(conn), "head")
    return head()


def schema_diff(conn: sqlalchemy.Connection) -> list[Any]:
    """What differs between the database and tables.py (empty when they agree), as Alembic's
    autogenerate sees it: tables, columns, types, nullability, server defaults, indexes,
    unique and foreign keys.

    Left out: the legacy stamp table (schema_version, PostgreSQL), and two SQLite quirks that
    are the legacy DDL's and harmless: a non-INTEGER primary key that SQLite lets hold NULL
    (nothing inserts one), and INTEGER PRIMARY KEY being the rowid rather than an identity.
    SQLite cannot reflect the expression index model_artifacts_profile; PostgreSQL compares it.
    """
    context = MigrationContext.configure(
        conn,
        opts={
            "compare_type": True,
            "compare_server_default": True,
            "include_name": lambda name, kind, parent: not (
                kind == "table" and name == "schema_version"
            ),
        },
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*expression-based index")
        found = compare_metadata(context, metadata)
    sqlite = conn.dialect.name == "sqlite"
    out: list[Any] = []
    for diff in found:
        ops = diff if isinstance(diff, list) else [diff]
        kept = [op for op in ops if not (sqlite and _sqlite_quirk(op))]
        out.extend(kept)
    return out


def _sqlite_quirk(op: tuple[Any, ...]) -> bool:
    """A nullable TEXT primary key, or the rowid where tables.py says identity."""
    kind = op[0]
    if kind not in ("modify_nullable", "modify_default"):
        return False
    table, column = op[2], op[3]
    is_pk = column in metadata.tables[table].primary_key.columns
    if kind == "modify_nullable":
        return is_pk and op[5] is True and op[6] is False
    return is_pk and isinstance(op[6], sqlalchemy.Identity)


def describe(conn: sqlalchemy.Connection) -> dict[str, Any]:
    """What `edgefleet db current` prints: the revision, this edgefleet's head, whether it is
    current, and the legacy stamp."""
    revision = current_revision(conn)
    return {
        "revision": revision,
        "head": head(),
        "current": revision == head(),
        "legacy_version": legacy.version(conn),
    }

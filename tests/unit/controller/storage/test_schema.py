"""Alembic takes today's databases over in place: every legacy version, on SQLite and
PostgreSQL, with rows in it, ends at the head revision with the schema tables.py describes
(docs/storage.md)."""

from __future__ import annotations

import threading

import pytest

from controller.storage import legacy
from controller.storage.db import Database
from controller.storage.open import open_database
from controller.storage.upgrade import BASELINE, head, schema_diff


def _legacy_database(target: str, version: int) -> None:
    """A database as an edgefleet before Alembic left it at `version`, with a fleet in it."""
    db = open_database(target, migrate=False)
    try:
        with db.migration_lock() as tx:
            assert legacy.apply(tx.sa, upto=version) == version
            tx.execute(
                "INSERT INTO devices (id, profile, registered_by, registered_at) "
                "VALUES ('pi-1', 'rpi4', 'cli', 1.0)"
            )
            tx.execute("INSERT INTO models (name, version, created) VALUES ('cnn', '1', 2.0)")
            tx.execute(
                "INSERT INTO deployments (id, model_id, target, created) VALUES ('d', 1, 'x', 3.0)"
            )
        assert legacy.version(db.sa) == version and db.schema_version() is None
    finally:
        db.close()


@pytest.mark.parametrize("version", range(1, legacy.LAST + 1))
def test_every_legacy_version_is_upgraded_in_place(db_target: str, version: int) -> None:
    _legacy_database(db_target, version)
    db = open_database(db_target)  # what `edgefleet up` does on start
    try:
        assert db.schema_version() == head()
        assert db.query("SELECT id, profile FROM devices") == [{"id": "pi-1", "profile": "rpi4"}]
        assert db.query("SELECT name, version FROM models") == [{"name": "cnn", "version": "1"}]
        row = db.query_one("SELECT id, state FROM deployments")
        # Legacy migration 3 completed the deployments from before rollouts; later ones not.
        assert row == {"id": "d", "state": "completed" if version < 3 else "running"}
        assert schema_diff(db.sa) == []
        # An edgefleet from before Alembic now refuses the database (newer than it knows).
        assert legacy.version(db.sa) == legacy.HANDED_OVER > legacy.LAST
        assert db.migrate() == head()  # reopening changes nothing
        assert db.query("SELECT COUNT(*) AS n FROM devices") == [{"n": 1}]
    finally:
        db.close()


def test_a_new_database_is_created_by_alembic_as_tables_py_says(db_target: str) -> None:
    db = open_database(db_target)
    try:
        assert db.schema_version() == head()
        assert db.query("SELECT version_num FROM alembic_version") != []
        assert schema_diff(db.sa) == []
        with db.transaction() as tx:  # the comparison sees a drift
            tx.execute("CREATE INDEX drift ON devices (profile)")
        diff = schema_diff(db.sa)
        assert [d[0] for d in diff] == ["remove_index"] and diff[0][1].name == "drift"
    finally:
        db.close()


def test_a_revision_this_edgefleet_does_not_know_is_refused_by_name(db_target: str) -> None:
    db = open_database(db_target)
    try:
        with db.transaction() as tx:
            tx.execute("UPDATE alembic_version SET version_num = 'c0ffee42'")
    finally:
        db.close()
    with pytest.raises(RuntimeError) as refused:
        open_database(db_target)
    message = str(refused.value)
    assert "\n" not in message and "revision c0ffee42, newer than this edgefleet's" in message


def test_a_legacy_version_newer_than_the_last_is_refused(db_target: str) -> None:
    db = open_database(db_target, migrate=False)
    try:
        with db.migration_lock() as tx:
            legacy.stamp(tx.sa, legacy.HANDED_OVER + 1)
    finally:
        db.close()
    with pytest.raises(RuntimeError, match=rf"schema is version {legacy.HANDED_OVER + 1}, newer"):
        open_database(db_target)


def test_the_baseline_is_the_first_revision() -> None:
    from controller.storage.upgrade import scripts

    base = scripts().get_base()
    assert base == BASELINE and scripts().get_revision(head()) is not None


def test_replicas_opening_a_new_database_at_once_migrate_one_at_a_time(db_target: str) -> None:
    errors: list[str] = []
    revisions: list[str | None] = []

    def open_it() -> None:
        try:
            db: Database = open_database(db_target)
            revisions.append(db.schema_version())
            db.close()
        except Exception as exc:  # collected: a thread's exception would be lost
            errors.append(repr(exc))

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and revisions == [head()] * 4

"""Opening the controller database: concurrent first opens of a new file must not fail."""

from __future__ import annotations

import threading
from pathlib import Path

from controller.storage.legacy import HANDED_OVER
from controller.storage.sqlite import SqliteDatabase
from controller.storage.upgrade import head


def test_threads_opening_a_new_database_at_once_all_succeed(tmp_path: Path) -> None:
    """Before the WAL pragma waited, about 1 in 10 of these rounds raised "database is locked"."""
    errors: list[str] = []
    for round_ in range(40):
        path = tmp_path / f"r{round_}" / "edgefleet.db"

        def open_it(path: Path = path) -> None:
            try:
                db = SqliteDatabase(path)
                assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
                assert db.conn.execute("PRAGMA user_version").fetchone()[0] == HANDED_OVER
                assert db.schema_version() == head()
                db.close()
            except Exception as exc:  # collected: a thread's exception would be lost
                errors.append(repr(exc))

        threads = [threading.Thread(target=open_it) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []

"""Fixtures shared by the controller's unit tests: one fleet and one database, each opened fresh.

A module that needs a scenario (devices, models, a deployment) builds it in a thin fixture on
top of `fleet`, named for what it adds, instead of opening a fleet of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.fleet.registry import Fleet
from controller.storage.db import Database
from controller.storage.open import open_database


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """An empty fleet in a fresh data dir (tmp_path/home, its SQLite file inside), closed after."""
    opened = Fleet(tmp_path / "home")
    yield opened
    opened.close()


@pytest.fixture
def db(db_target: str) -> Iterator[Database]:
    """A fresh migrated database: once an SQLite file, once a PostgreSQL schema (`db_target`)."""
    database = open_database(db_target)
    yield database
    database.close()

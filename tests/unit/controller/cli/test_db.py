"""`edgefleet db current|upgrade|check` on a database an older edgefleet left (docs/storage.md)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from controller.cli.main import app
from controller.storage import legacy
from controller.storage.open import open_database
from controller.storage.upgrade import head


def test_db_commands_show_upgrade_and_check_a_legacy_database(tmp_path: Path) -> None:
    home = tmp_path / "home"
    old = open_database(str(home / "edgefleet.db"), migrate=False)
    with old.migration_lock() as tx:
        legacy.apply(tx.sa, upto=5)
    old.close()
    runner = CliRunner()
    args = ["--home", str(home)]
    before = runner.invoke(app, ["db", "current", *args, "--json"])
    assert before.exit_code == 0, before.output
    assert json.loads(before.output) | {"database": ""} == {
        "database": "", "revision": None, "head": head(), "current": False, "legacy_version": 5,
    }  # fmt: skip
    up = runner.invoke(app, ["db", "upgrade", *args])
    assert up.exit_code == 0 and f"at revision {head()} (head)" in up.output, up.output
    assert f"revision {head()}, current" in runner.invoke(app, ["db", "current", *args]).output
    checked = runner.invoke(app, ["db", "check", *args])
    assert checked.exit_code == 0 and "matches" in checked.output, checked.output

    db = open_database(str(home / "edgefleet.db"))
    with db.transaction() as tx:
        tx.execute("CREATE INDEX drift ON devices (state)")
        tx.execute("UPDATE alembic_version SET version_num = 'beefcafe'")
    db.close()
    drift = runner.invoke(app, ["db", "check", *args])
    assert drift.exit_code == 1 and "drift" in drift.output, drift.output
    newer = runner.invoke(app, ["db", "upgrade", *args])
    assert newer.exit_code == 2, newer.output
    assert "error: the database schema is at revision beefcafe, newer" in newer.output

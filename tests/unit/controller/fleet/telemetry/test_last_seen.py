"""Telemetry is a sign of life: an ingest batch refreshes its devices' last_seen, never back."""

from __future__ import annotations

from controller.fleet.telemetry.store import TelemetryStore
from controller.storage.db import Database
from tests.telemetry_records import message


def _add(db: Database, device: str, last_seen: float | None) -> None:
    """A registered device row with this last_seen."""
    with db.transaction() as tx:
        tx.execute(
            "INSERT INTO devices (id, profile, last_seen, registered_by, registered_at) "
            "VALUES (?, 'rpi4', ?, 'test', 0)",
            (device, last_seen),
        )


def _last_seen(db: Database, device: str) -> float | None:
    """The device's last_seen."""
    row = db.query_one("SELECT last_seen FROM devices WHERE id = ?", (device,))
    assert row is not None
    return row["last_seen"]


def test_a_telemetry_batch_refreshes_last_seen_of_its_devices_only(db: Database) -> None:
    store = TelemetryStore(db)
    _add(db, "a", 100.0)
    _add(db, "b", None)
    _add(db, "c", 100.0)
    _add(db, "later", 5000.0)
    store.ingest_many([message("a", [1, 2]), message("b", [1]), message("later", [1])], 1000.0)
    assert _last_seen(db, "a") == 1000.0
    assert _last_seen(db, "b") == 1000.0
    assert _last_seen(db, "c") == 100.0  # sent nothing
    assert _last_seen(db, "later") == 5000.0  # an event seen later is not undone
    # Duplicates only (a resend) are still a message from the device.
    store.ingest(message("a", [1]), 2000.0)
    assert _last_seen(db, "a") == 2000.0
    # Telemetry of an unknown device changes no device row.
    store.ingest(message("ghost", [1]), 3000.0)
    assert db.query_one("SELECT 1 FROM devices WHERE id = 'ghost'") is None

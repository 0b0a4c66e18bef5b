"""Many device rows written straight into a fleet's database (dashboard and paging tests)."""

from __future__ import annotations

import time

from controller.fleet.registry import Fleet

# Profiles and states the simulated rows cycle through (all real profile ids and device states).
PROFILES = ("rpi4", "imx8mp", "coral-dev-board")
STATES = ("running", "idle", "failed")


def insert_devices(fleet: Fleet, count: int, prefix: str = "sim") -> list[str]:
    """Insert `count` devices `<prefix>-00000...` in one transaction; every fourth one offline."""
    ids = [f"{prefix}-{i:05d}" for i in range(count)]
    now = time.time()
    rows = [
        (d, PROFILES[i % len(PROFILES)], STATES[i % len(STATES)], int(i % 4 != 0), now - i, now)
        for i, d in enumerate(ids)
    ]
    with fleet.db.transaction() as tx:
        tx.executemany(
            "INSERT INTO devices (id, profile, state, online, last_seen, registered_by, "
            "registered_at) VALUES (?, ?, ?, ?, ?, 'test', ?)",
            rows,
        )
    return ids

"""Simulation helpers of the integration tier: a multi-chunk model, a running simulation, the
online check (the simulator and distribution tests)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from controller.fleet.registry import Fleet
from controller.simulate import (
    Simulation,
)

CHUNK = 64 * 1024


def multi_chunk_model(path: Path, chunks: int, seed: int) -> Path:
    """Seeded random bytes spanning `chunks` 64 KiB chunks, with the TFLite identifier."""
    data = bytearray(random.Random(seed).randbytes(chunks * CHUNK - 100))
    data[4:8] = b"TFL3"
    path.write_bytes(data)
    return path


@contextmanager
def running(sim: Simulation, connect_timeout: float = 30.0) -> Iterator[Simulation]:
    """Start a simulation, wait for every connection, stop it at the end."""
    sim.start()
    try:
        assert sim.wait_connected(connect_timeout), f"only {sim.counters.connected} connected"
        yield sim
    finally:
        sim.stop()


def online(fleet: Fleet, ids: list[str]) -> bool:
    """Every listed device is registered and online."""
    rows = {d["id"]: d for d in fleet.devices()}
    return all(i in rows and rows[i]["online"] for i in ids)

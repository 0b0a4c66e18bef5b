"""Fleet state made without agents: many device rows written straight into the database
(dashboard and paging tests), an agent's activation reports (API and dashboard tests)."""

from __future__ import annotations

import time
import uuid

from agent.protocol import BenchmarkReport, Event, Status
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


def activate(fleet: Fleet, rollout: str, device: str) -> None:
    """Play the agent: activation, a benchmark and a status for the device's generation."""
    row = next(d for d in fleet.deployment(rollout)["devices"] if d["device_id"] == device)
    sha, generation = row["artifact_sha256"], row["generation"]
    report = BenchmarkReport(
        model_sha256=sha, runtime="litert", runtime_version="2.3.0", threads=1, runs=50,
        warmup=5, init_ms=1.0, first_inference_ms=1.0, p50_ms=4.0, p90_ms=4.5, p95_ms=5.0,
        p99_ms=5.5, mean_ms=4.2, std_ms=0.1, min_ms=3.0, max_ms=6.0, peak_rss_mb=50.0,
        rss_mb=50.0, power_w=3.0, energy_mj_per_inference=1.0, power_source="estimated:profile",
        power_estimated=True,
    )  # fmt: skip
    for kind, extra in (("update", {"state": "active"}), ("benchmark", {"benchmark": report})):
        fleet.record_event(
            Event(
                device_id=device,
                event_id=uuid.uuid4().hex,
                kind=kind,  # type: ignore[arg-type]
                message=kind,
                deployment_id=rollout,
                generation=generation,
                **extra,
            )
        )
    fleet.record_status(Status(device_id=device, online=True, model_sha256=sha))

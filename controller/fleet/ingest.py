"""Ingest of device messages (hello, status, events), handed on to rollouts; runtime calls it."""


from __future__ import annotations

import firmware_profiles
from agent.protocol import (
    Event,
    Hello,
    Status,
)
from agent.protocol.schema import encode
from controller.fleet.core import FleetCore
from controller.storage.db import now, to_json


class Ingest(FleetCore):
    """Records what devices report (mixed into Fleet; uses self.db, self.rollouts)."""

    # ------------------------------------------------------------------ ingest
    def record_hello(self, hello: Hello) -> None:
        """Register or refresh a device from its hello, matching it to a profile."""
        facts = encode(hello.facts)
        existing = self.db.query_one(
            "SELECT profile, registered_by FROM devices WHERE id = ?", (hello.device_id,)
        )
        if existing and existing["registered_by"] == "cli" and existing["profile"]:
            profile, reason = existing["profile"], "registered by operator"
        else:
            profile, reason = firmware_profiles.match(
                {
                    "arch": hello.facts.arch,
                    "cpu_count": hello.facts.cpu_count,
                    "ram_mb": hello.facts.ram_mb,
                    "declared_profile": hello.profile,
                    "delegates": list(hello.facts.delegates),
                    "board": hello.facts.board,
                    "socs": list(hello.facts.socs),
                    "cpu_parts": list(hello.facts.cpu_parts),
                    "emulated": hello.facts.emulated,
                },
                self.profiles,
            )
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO devices (id, profile, profile_reason, declared_profile, facts, "
                "agent_version, runtime, runtime_version, online, registered_by, registered_at, "
                "last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, 'hello', ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET profile=excluded.profile, "
                "profile_reason=excluded.profile_reason, "
                "declared_profile=excluded.declared_profile, facts=excluded.facts, "
                "agent_version=excluded.agent_version, "
                "runtime=excluded.runtime, runtime_version=excluded.runtime_version, online=1, "
                "last_seen=excluded.last_seen",
                (
                    hello.device_id,
                    profile,
                    reason,
                    hello.profile,
                    to_json(facts),
                    hello.agent_version,
                    hello.facts.runtime,
                    hello.facts.runtime_version,
                    hello.ts,
                    now(),
                ),
            )
            # Commands sent while the device was away were lost with its clean session: send
            # them again (the agent runs each command id once).
            tx.execute(
                "UPDATE commands SET published = NULL WHERE device_id = ? "
                "AND published IS NOT NULL AND completed IS NULL",
                (hello.device_id,),
            )

    def record_status(self, status: Status) -> None:
        """Apply a device's retained status (the offline last will only flips `online`)."""
        with self.db.transaction() as tx:
            if not status.online:
                tx.execute("UPDATE devices SET online = 0 WHERE id = ?", (status.device_id,))
                return
            tx.execute(
                "UPDATE devices SET online = 1, state = ?, status_detail = ?, model_sha256 = ?, "
                "previous_sha256 = ?, reported_generation = ?, last_seen = ? WHERE id = ?",
                (
                    status.state,
                    status.detail,
                    status.model_sha256,
                    status.previous_sha256,
                    status.generation,
                    now(),
                    status.device_id,
                ),
            )

    def record_event(self, event: Event) -> bool:
        """Store an event once (dedupe by device and event id); update deployment and benchmarks."""
        with self.db.transaction() as tx:
            inserted = tx.execute(
                "INSERT INTO events (device_id, event_id, kind, deployment_id, generation, state, "
                "message, ts, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (
                    event.device_id,
                    event.event_id,
                    event.kind,
                    event.deployment_id,
                    event.generation,
                    event.state,
                    event.message,
                    event.ts,
                    now(),
                ),
            ).rowcount
            if not inserted:
                return False
            tx.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (now(), event.device_id))
            if event.kind == "command":
                tx.execute(
                    "UPDATE commands SET completed = ?, result = ? WHERE id = ? AND device_id = ?",
                    (now(), event.message, event.event_id, event.device_id),
                )
            if event.benchmark is not None:
                b = event.benchmark
                tx.execute(
                    "INSERT INTO benchmarks (event_id, device_id, model_sha256, deployment_id, "
                    "p50_ms, p90_ms, p99_ms, peak_rss_mb, power_w, energy_mj_per_inference, "
                    "power_source, report, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING",
                    (
                        event.event_id,
                        event.device_id,
                        b.model_sha256,
                        event.deployment_id,
                        b.p50_ms,
                        b.p90_ms,
                        b.p99_ms,
                        b.peak_rss_mb,
                        b.power_w,
                        b.energy_mj_per_inference,
                        b.power_source,
                        to_json(encode(b)),
                        event.ts,
                    ),
                )
            self.rollouts.on_event(tx, event)
        return True

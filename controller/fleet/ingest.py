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
from controller.storage.queries import devices as device_queries
from controller.storage.queries import events as event_queries


class Ingest(FleetCore):
    """Records what devices report (mixed into Fleet; uses self.db, self.rollouts)."""

    # ------------------------------------------------------------------ ingest
    def record_hello(self, hello: Hello) -> None:
        """Register or refresh a device from its hello, matching it to a profile."""
        facts = encode(hello.facts)
        existing = device_queries.registration(self.db.conn, hello.device_id)
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
            device_queries.hello(tx, {
                "id": hello.device_id, "profile": profile, "profile_reason": reason,
                "declared_profile": hello.profile, "facts": to_json(facts),
                "agent_version": hello.agent_version, "runtime": hello.facts.runtime,
                "runtime_version": hello.facts.runtime_version, "registered_at": hello.ts,
                "last_seen": now(),
            })  # fmt: skip
            # Commands sent while the device was away were lost with its clean session: send
            # them again (the agent runs each command id once).
            event_queries.resend_unanswered_commands(tx, hello.device_id)

    def record_status(self, status: Status) -> None:
        """Apply a device's retained status (the offline last will only flips `online`)."""
        with self.db.transaction() as tx:
            if not status.online:
                device_queries.set_offline(tx, status.device_id)
                return
            device_queries.set_status(tx, status.device_id, {
                "state": status.state, "status_detail": status.detail,
                "model_sha256": status.model_sha256, "previous_sha256": status.previous_sha256,
                "reported_generation": status.generation, "last_seen": now(),
            })  # fmt: skip

    def record_event(self, event: Event) -> bool:
        """Store an event once (dedupe by device and event id); update deployment and benchmarks."""
        with self.db.transaction() as tx:
            inserted = event_queries.add_event(tx, {
                "device_id": event.device_id, "event_id": event.event_id, "kind": event.kind,
                "deployment_id": event.deployment_id, "generation": event.generation,
                "state": event.state, "message": event.message, "ts": event.ts,
                "received": now(),
            })  # fmt: skip
            if not inserted:
                return False
            device_queries.touch(tx, event.device_id, now())
            if event.kind == "command":
                event_queries.complete_command(
                    tx, event.event_id, event.device_id, event.message, now()
                )
            if event.benchmark is not None:
                b = event.benchmark
                event_queries.add_benchmark(tx, {
                    "event_id": event.event_id, "device_id": event.device_id,
                    "model_sha256": b.model_sha256, "deployment_id": event.deployment_id,
                    "p50_ms": b.p50_ms, "p90_ms": b.p90_ms, "p99_ms": b.p99_ms,
                    "peak_rss_mb": b.peak_rss_mb, "power_w": b.power_w,
                    "energy_mj_per_inference": b.energy_mj_per_inference,
                    "power_source": b.power_source, "report": to_json(encode(b)), "ts": event.ts,
                })  # fmt: skip
            self.rollouts.on_event(tx, event)
        return True

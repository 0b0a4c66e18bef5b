"""Fleet service layer: registry, models, deployments, ingest; shared by CLI, API and service."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

import firmware_profiles
from agent.protocol import (
    ArtifactRef,
    Command,
    Desired,
    Event,
    Hello,
    Manifest,
    ProtocolError,
    Status,
    dump,
    parse,
    validate_device_id,
)
from agent.protocol.schema import encode
from controller.artifacts import ArtifactStore, build_manifest
from controller.db import Database, now, to_json

# Offset 4 of every TFLite flatbuffer holds this file identifier (schema.fbs: file_identifier).
TFLITE_IDENTIFIER = b"TFL3"


class FleetError(ValueError):
    """A request about an unknown device, profile, model or deployment, or bad input."""


def default_home() -> Path:
    """Data directory: $EDGEFLEET_HOME or ~/.local/share/edgefleet."""
    return Path(os.environ.get("EDGEFLEET_HOME", "~/.local/share/edgefleet")).expanduser()


class Fleet:
    """Everything that changes or reads fleet state; owns one database connection."""

    def __init__(self, home: Path) -> None:
        """Open the database and artifact store under `home`."""
        self.home = home
        self.db = Database(home / "edgefleet.db")
        self.artifacts = ArtifactStore(home / "artifacts")
        self._profiles: dict[str, firmware_profiles.Profile] | None = None

    @property
    def profiles(self) -> dict[str, firmware_profiles.Profile]:
        """Profiles loaded once per Fleet (matching runs on every hello)."""
        if self._profiles is None:
            self._profiles = firmware_profiles.load_all()
        return self._profiles

    def close(self) -> None:
        """Release the database connection."""
        self.db.close()

    # ------------------------------------------------------------------ devices
    def register_device(self, device_id: str, profile: str) -> dict[str, Any]:
        """Pre-register a device with an explicit profile (it may connect later)."""
        try:
            validate_device_id(device_id)
        except ProtocolError as exc:
            raise FleetError(str(exc)) from None
        self._profile(profile)
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO devices (id, profile, profile_reason, registered_by, registered_at) "
                "VALUES (?, ?, 'registered by operator', 'cli', ?) "
                "ON CONFLICT(id) DO UPDATE SET profile=excluded.profile, "
                "profile_reason=excluded.profile_reason",
                (device_id, profile, now()),
            )
        return self.device(device_id)

    def remove_device(self, device_id: str) -> None:
        """Forget a device (its history of events and benchmarks is kept)."""
        self.device(device_id)
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM devices WHERE id = ?", (device_id,))

    def devices(self) -> list[dict[str, Any]]:
        """All devices, ordered by id."""
        return [_device_row(r) for r in self.db.query("SELECT * FROM devices ORDER BY id")]

    def has_device(self, device_id: str) -> bool:
        """True when the device is in the registry."""
        return self.db.query_one("SELECT 1 FROM devices WHERE id = ?", (device_id,)) is not None

    def device(self, device_id: str) -> dict[str, Any]:
        """One device, or FleetError naming the id."""
        row = self.db.query_one("SELECT * FROM devices WHERE id = ?", (device_id,))
        if row is None:
            raise FleetError(f"unknown device {device_id!r} (see `edgefleet devices list`)")
        return _device_row(row)

    def device_detail(self, device_id: str, limit: int = 20) -> dict[str, Any]:
        """A device with its latest benchmarks and events."""
        detail = self.device(device_id)
        detail["benchmarks"] = self.benchmarks(device_id, limit)
        detail["events"] = self.db.query(
            "SELECT kind, deployment_id, generation, state, message, ts FROM events "
            "WHERE device_id = ? ORDER BY ts DESC LIMIT ?",
            (device_id, limit),
        )
        return detail

    def benchmarks(self, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
        """Latest benchmark reports of a device, newest first."""
        rows = self.db.query(
            "SELECT report, deployment_id, ts FROM benchmarks WHERE device_id = ? "
            "ORDER BY ts DESC LIMIT ?",
            (device_id, limit),
        )
        return [
            {**json.loads(r["report"]), "deployment_id": r["deployment_id"], "ts": r["ts"]}
            for r in rows
        ]

    @staticmethod
    def _profile(profile: str) -> firmware_profiles.Profile:
        """Load a profile or raise FleetError naming it."""
        try:
            return firmware_profiles.load(profile)
        except firmware_profiles.ProfileError as exc:
            raise FleetError(str(exc)) from None

    # ------------------------------------------------------------------ models & deployments
    def add_artifact(
        self,
        model_path: Path,
        *,
        name: str,
        version: str | None = None,
        recipe: str = "as-is",
        profile: str | None = None,
        check: bool = True,
    ) -> Manifest:
        """Store a .tflite file as an artifact of model name:version and return its manifest.

        Without a version, the first 12 hex digits of the file's sha256 are used.
        """
        if not model_path.is_file():
            raise FleetError(f"{model_path}: no such file")
        if check:
            with model_path.open("rb") as fh:
                head = fh.read(8)
            if head[4:8] != TFLITE_IDENTIFIER:
                raise FleetError(f"{model_path}: not a TFLite model (no 'TFL3' identifier)")
        try:
            manifest = build_manifest(
                model_path, name=name, version=version or "", recipe=recipe, profile=profile
            )
        except ValueError as exc:
            raise FleetError(str(exc)) from None
        if not version:
            version = manifest.sha256[:12]
            manifest = dataclasses.replace(manifest, version=version)
        try:
            dump(manifest)  # the manifest must fit the protocol's message cap to be published
        except ProtocolError as exc:
            raise FleetError(f"{model_path}: too large to distribute: {exc}") from None
        stored = self.artifacts.add_file(model_path)
        if stored != manifest.sha256:
            raise FleetError(f"{model_path}: changed while it was being added; try again")
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO models (name, version, source, created) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name, version) DO NOTHING",
                (name, version, str(model_path), now()),
            )
            model_id = tx.execute(
                "SELECT id FROM models WHERE name = ? AND version = ?", (name, version)
            ).fetchone()[0]
            tx.execute(
                "INSERT INTO artifacts (sha256, model_id, recipe, profile, size, chunk_size, "
                "manifest, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(sha256) DO NOTHING",
                (
                    manifest.sha256,
                    model_id,
                    recipe,
                    profile,
                    manifest.size,
                    manifest.chunk_size,
                    to_json(encode(manifest)),
                    now(),
                ),
            )
        return manifest

    def manifest(self, sha256: str) -> Manifest:
        """The stored manifest of an artifact."""
        row = self.db.query_one("SELECT manifest FROM artifacts WHERE sha256 = ?", (sha256,))
        if row is None:
            raise FleetError(f"unknown artifact {sha256}")
        return parse(row["manifest"], Manifest)

    def deploy(
        self,
        model_path: Path,
        *,
        devices: list[str] | None = None,
        profile: str | None = None,
        name: str | None = None,
        version: str | None = None,
        check: bool = True,
    ) -> dict[str, Any]:
        """Direct deployment: set the desired state of the chosen devices to this model."""
        if bool(devices) == bool(profile):
            raise FleetError("choose the target: --to DEVICE (repeatable) or --profile PROFILE")
        if profile:
            self._profile(profile)
            targets = [d["id"] for d in self.devices() if d["profile"] == profile]
            if not targets:
                raise FleetError(f"no registered device has profile {profile!r}")
        else:
            targets = [self.device(d)["id"] for d in devices or []]
        manifest = self.add_artifact(
            model_path,
            name=name or model_path.stem,
            version=version,
            profile=profile,
            check=check,
        )
        deployment_id = f"dep-{uuid.uuid4().hex[:12]}"
        ts = now()
        with self.db.transaction() as tx:
            model_id = tx.execute(
                "SELECT model_id FROM artifacts WHERE sha256 = ?", (manifest.sha256,)
            ).fetchone()[0]
            target = f"profile:{profile}" if profile else "devices:" + ",".join(targets)
            tx.execute(
                "INSERT INTO deployments (id, model_id, target, created) VALUES (?, ?, ?, ?)",
                (deployment_id, model_id, target, ts),
            )
            for device_id in targets:
                # Monotonic even when the device row was recreated or the database is new: the
                # agent ignores generations <= the last one it applied, so never go back.
                previous = tx.execute(
                    "SELECT MAX(desired_generation, reported_generation) FROM devices WHERE id = ?",
                    (device_id,),
                ).fetchone()[0]
                generation = max(previous + 1, int(ts * 1000))
                tx.execute(
                    "UPDATE devices SET desired_generation = ?, desired_sha256 = ?, "
                    "desired_deployment_id = ? WHERE id = ?",
                    (generation, manifest.sha256, deployment_id, device_id),
                )
                tx.execute(
                    "UPDATE deployment_devices SET state = 'superseded', updated = ? "
                    "WHERE device_id = ? AND state IN ('pending', 'in_progress', 'activated')",
                    (ts, device_id),
                )
                tx.execute(
                    "INSERT INTO deployment_devices (deployment_id, device_id, artifact_sha256, "
                    "generation, state, updated) VALUES (?, ?, ?, ?, 'pending', ?)",
                    (deployment_id, device_id, manifest.sha256, generation, ts),
                )
        return self.deployment(deployment_id)

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        """A deployment with the state of each of its devices."""
        row = self.db.query_one("SELECT * FROM deployments WHERE id = ?", (deployment_id,))
        if row is None:
            raise FleetError(f"unknown deployment {deployment_id!r}")
        row["devices"] = self.db.query(
            "SELECT device_id, artifact_sha256, generation, state, detail, updated "
            "FROM deployment_devices WHERE deployment_id = ? ORDER BY device_id",
            (deployment_id,),
        )
        return row

    # ------------------------------------------------------------------ desired state (reconcile)
    def unpublished_desired(self) -> list[tuple[str, Desired, Manifest]]:
        """Devices whose desired generation has not been published yet, with what to publish."""
        rows = self.db.query(
            "SELECT d.id, d.desired_generation, d.desired_sha256, d.desired_deployment_id, "
            "a.manifest FROM devices d JOIN artifacts a ON a.sha256 = d.desired_sha256 "
            "WHERE d.desired_generation > d.published_generation"
        )
        out = []
        for r in rows:
            manifest = parse(r["manifest"], Manifest)
            desired = Desired(
                generation=r["desired_generation"],
                deployment_id=r["desired_deployment_id"],
                artifact=ArtifactRef(
                    sha256=manifest.sha256,
                    size=manifest.size,
                    name=manifest.name,
                    version=manifest.version,
                ),
            )
            out.append((r["id"], desired, manifest))
        return out

    def mark_published(self, device_id: str, generation: int) -> None:
        """Record that a desired generation reached the broker (retained)."""
        with self.db.transaction() as tx:
            tx.execute(
                "UPDATE devices SET published_generation = MAX(published_generation, ?) "
                "WHERE id = ?",
                (generation, device_id),
            )
            tx.execute(
                "UPDATE deployment_devices SET state = 'in_progress', updated = ? "
                "WHERE device_id = ? AND generation = ? AND state = 'pending'",
                (now(), device_id, generation),
            )

    def republish_all(self) -> None:
        """Forget what was published (after a broker reconnect retained state may be gone)."""
        with self.db.transaction() as tx:
            tx.execute("UPDATE devices SET published_generation = 0")

    # ------------------------------------------------------------------ commands
    def send_command(self, device_id: str, action: str, *, runs: int = 50, warmup: int = 5) -> str:
        """Queue a one-shot command (benchmark, rollback, resend_status); the service sends it."""
        self.device(device_id)
        command = Command(
            command_id=f"cmd-{uuid.uuid4().hex[:12]}", action=action, runs=runs, warmup=warmup
        )  # type: ignore[arg-type]
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO commands (id, device_id, action, runs, warmup, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (command.command_id, device_id, action, runs, warmup, now()),
            )
        return command.command_id

    def command(self, command_id: str) -> dict[str, Any]:
        """One command with its state."""
        row = self.db.query_one("SELECT * FROM commands WHERE id = ?", (command_id,))
        if row is None:
            raise FleetError(f"unknown command {command_id!r}")
        return row

    def unpublished_commands(self) -> list[tuple[str, Command]]:
        """Commands not yet handed to the broker, oldest first."""
        rows = self.db.query("SELECT * FROM commands WHERE published IS NULL ORDER BY created")
        return [
            (
                r["device_id"],
                Command(command_id=r["id"], action=r["action"], runs=r["runs"], warmup=r["warmup"]),
            )
            for r in rows
        ]

    def mark_command_published(self, command_id: str) -> None:
        """Record that a command was published."""
        with self.db.transaction() as tx:
            tx.execute("UPDATE commands SET published = ? WHERE id = ?", (now(), command_id))

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
            if event.deployment_id and event.generation is not None:
                new_state = {"error": "failed"}.get(event.kind)
                if event.kind == "update" and event.state == "active":
                    new_state = "activated"
                if event.kind == "benchmark":
                    new_state = "succeeded"
                if new_state:
                    tx.execute(
                        "UPDATE deployment_devices SET state = ?, detail = ?, updated = ? "
                        "WHERE deployment_id = ? AND device_id = ? AND generation = ? "
                        "AND state NOT IN ('succeeded', 'failed', 'superseded')",
                        (
                            new_state,
                            event.message,
                            now(),
                            event.deployment_id,
                            event.device_id,
                            event.generation,
                        ),
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
        return True


def _device_row(row: dict[str, Any]) -> dict[str, Any]:
    """Decode JSON columns and booleans of a device row."""
    row = dict(row)
    row["facts"] = json.loads(row.get("facts") or "{}")
    row["online"] = bool(row["online"])
    return row

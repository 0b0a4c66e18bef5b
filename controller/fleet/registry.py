"""Fleet service layer: registry, models, deployments, ingest; shared by CLI, API and service."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, TypeVar

import firmware_profiles
from agent.protocol import (
    ArtifactRef,
    Command,
    Desired,
    Event,
    Fallback,
    GoldenRef,
    Hello,
    Manifest,
    ProtocolError,
    Status,
    dump,
    parse,
    validate_device_id,
    validate_name,
)
from agent.protocol.schema import encode
from controller.errors import FleetError
from controller.fleet.artifacts import ArtifactStore, build_manifest, check_golden
from controller.fleet.candidates import register_candidates
from controller.fleet.rollout.engine import Rollouts, deploy_policy
from controller.fleet.rollout.policy import Policy
from controller.fleet.telemetry.store import TelemetryStore
from controller.security.signing import DESIRED_VALIDITY_S, FleetSigner
from controller.storage.db import database_target, now, open_database, to_json

# Offset 4 of every TFLite flatbuffer holds this file identifier (schema.fbs: file_identifier).
TFLITE_IDENTIFIER = b"TFL3"
# What `edgefleet optimize` writes beside each selected artifact (converters/manifest.py).
CONVERTER_MANIFEST_SCHEMA = "edgefleet.artifact-manifest/v1"

log = logging.getLogger(__name__)

__all__ = ["Fleet", "FleetError", "default_home"]


def default_home() -> Path:
    """Data directory: $EDGEFLEET_HOME or ~/.local/share/edgefleet."""
    return Path(os.environ.get("EDGEFLEET_HOME", "~/.local/share/edgefleet")).expanduser()


class Fleet:
    """Everything that changes or reads fleet state; owns one database connection."""

    def __init__(self, home: Path, db: str | None = None) -> None:
        """Open the database (`db`, $EDGEFLEET_DB or HOME/edgefleet.db) and the artifact store
        under `home`."""
        self.home = home
        self.db = open_database(database_target(home, db))
        self.artifacts = ArtifactStore(home / "artifacts")
        self.rollouts = Rollouts(self)
        self.telemetry = TelemetryStore(self.db)
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
    def register_device(
        self,
        device_id: str,
        profile: str,
        *,
        auth: str | None = None,
        bundle_dir: Path | None = None,
        broker_url: str | None = None,
        topic_root: str | None = None,
        agent_data_dir: str | None = None,
    ) -> dict[str, Any]:
        """Pre-register a device with an explicit profile (it may connect later).

        With `auth` ("password" or "cert") it also gets fresh broker credentials and an agent
        config bundle in `bundle_dir` (default HOME/bundles/ID): docs/security.md.
        """
        try:
            validate_device_id(device_id)
        except ProtocolError as exc:
            raise FleetError(str(exc)) from None
        self._profile(profile)
        bundle: Path | None = None
        if auth is not None:
            from controller.security.broker_config import default_device_broker_url
            from controller.security.identity import FleetSecurity, IdentityError

            security = FleetSecurity(self.home)
            bundle = bundle_dir or self.home / "bundles" / device_id
            try:
                credentials = security.provision_device(device_id, auth, bundle)
                bundle = security.write_bundle(
                    credentials,
                    bundle,
                    broker_url=broker_url or default_device_broker_url(auth),
                    profile=profile,
                    topic_root=topic_root,
                    data_dir=agent_data_dir,
                ).parent
            except (IdentityError, ValueError) as exc:
                raise FleetError(str(exc)) from None
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO devices (id, profile, profile_reason, registered_by, registered_at) "
                "VALUES (?, ?, 'registered by operator', 'cli', ?) "
                "ON CONFLICT(id) DO UPDATE SET profile=excluded.profile, "
                "profile_reason=excluded.profile_reason",
                (device_id, profile, now()),
            )
        row = self.device(device_id)
        if bundle is not None:
            row["auth"] = auth
            row["bundle"] = str(bundle)
        return row

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
        golden: Path | None = None,
        check: bool = True,
        expected_sha256: str | None = None,
        link: bool = True,
    ) -> Manifest:
        """Store a .tflite file (and its golden .npz) as an artifact of model name:version.

        Without a version, the first 12 hex digits of the file's sha256 are used. The golden
        file travels as its own content-addressed blob that the manifest points to. With
        `expected_sha256`, a file that hashes differently is refused before anything is written.
        `link=False` stores the blob without making it the version's artifact for the profile
        (a ranked candidate that only a selection phase may promote).
        """
        _check_names(name=name, version=version, recipe=recipe)
        if not model_path.is_file():
            raise FleetError(f"{model_path}: no such file")
        if check:
            with model_path.open("rb") as fh:
                head = fh.read(8)
            if head[4:8] != TFLITE_IDENTIFIER:
                raise FleetError(f"{model_path}: not a TFLite model (no 'TFL3' identifier)")
        if profile is not None:
            self._profile(profile)
        golden_manifest = None
        try:
            if golden is not None:
                check_golden(golden)
                golden_manifest = build_manifest(
                    golden, name=name, version=version or "", recipe="golden", profile=profile
                )
            manifest = build_manifest(
                model_path, name=name, version=version or "", recipe=recipe, profile=profile
            )
        except ValueError as exc:
            raise FleetError(str(exc)) from None
        if expected_sha256 is not None and manifest.sha256 != expected_sha256:
            raise FleetError(f"{model_path}: sha256 {manifest.sha256} is not {expected_sha256}")
        if not version:
            version = manifest.sha256[:12]
        manifest = dataclasses.replace(
            manifest,
            version=version,
            golden=GoldenRef(golden_manifest.sha256, golden_manifest.size)
            if golden_manifest
            else None,
        )
        if golden_manifest is not None:
            golden_manifest = dataclasses.replace(golden_manifest, version=version)
        try:
            dump(manifest)  # the manifest must fit the protocol's message cap to be published
        except ProtocolError as exc:
            raise FleetError(f"{model_path}: too large to distribute: {exc}") from None
        if link:
            self._check_version_free(name, version, profile, manifest.sha256)
        blobs = [(model_path, manifest, "model")]
        if golden is not None and golden_manifest is not None:
            blobs.append((golden, golden_manifest, "golden"))
        for path, blob_manifest, _ in blobs:
            if self.artifacts.add_file(path) != blob_manifest.sha256:
                raise FleetError(f"{path}: changed while it was being added; try again")
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO models (name, version, source, created) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name, version) DO NOTHING",
                (name, version, str(model_path), now()),
            )
            model_id = tx.execute(
                "SELECT id FROM models WHERE name = ? AND version = ?", (name, version)
            ).fetchone()[0]
            for _, blob_manifest, kind in reversed(blobs):  # the golden row first
                tx.execute(
                    "INSERT INTO artifacts (sha256, model_id, recipe, profile, size, chunk_size, "
                    "manifest, created, kind, golden_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(sha256) DO UPDATE SET manifest = excluded.manifest, "
                    "golden_sha256 = excluded.golden_sha256 "
                    "WHERE excluded.golden_sha256 IS NOT NULL",
                    (
                        blob_manifest.sha256,
                        model_id,
                        blob_manifest.recipe,
                        profile,
                        blob_manifest.size,
                        blob_manifest.chunk_size,
                        to_json(encode(blob_manifest)),
                        now(),
                        kind,
                        manifest.golden.sha256 if kind == "model" and manifest.golden else None,
                    ),
                )
            # The same file may serve several models (or profiles): the link is its own row,
            # one per model version and profile. A version never changes under a rollout.
            if link:
                tx.execute(
                    "INSERT INTO model_artifacts (model_id, sha256, profile, recipe, created) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (model_id, manifest.sha256, profile, recipe, now()),
                )
        return manifest

    def _check_version_free(self, name: str, version: str, profile: str | None, sha: str) -> None:
        """Refuse a different file for a model version and profile that already has one."""
        row = self.db.query_one(
            "SELECT l.sha256 FROM model_artifacts l JOIN models m ON m.id = l.model_id "
            "WHERE m.name = ? AND m.version = ? AND COALESCE(l.profile, '') = ?",
            (name, version, profile or ""),
        )
        if row and row["sha256"] != sha:
            where = f"profile {profile}" if profile else "every profile"
            raise FleetError(
                f"{name}:{version} already has a different artifact for {where} "
                f"({row['sha256'][:12]}); register the new file under a new version"
            )

    def add_model(
        self,
        path: Path,
        *,
        name: str,
        version: str,
        profile: str | None = None,
        golden: Path | None = None,
    ) -> dict[str, Any]:
        """Register model name:version from one .tflite or from an `optimize` output directory.

        A directory contributes one artifact per profile, read from the `*.manifest.json`
        files `edgefleet optimize` writes (each checked against its artifact's sha256).
        """
        _check_names(name=name, version=version)
        if path.is_dir():
            if golden is not None or profile is not None:
                raise FleetError("--golden/--profile apply to a single .tflite, not a directory")
            found = sorted(path.glob("*/*.manifest.json"))
            if not found:
                raise FleetError(f"{path}: no */*.manifest.json (run `edgefleet optimize` first)")
            for manifest_path in found:
                doc = read_converter_manifest(manifest_path)
                artifact = manifest_path.parent / doc["file"]
                golden_path = (
                    manifest_path.parent / doc["golden"]["file"] if doc.get("golden") else None
                )
                self.add_artifact(
                    artifact,
                    name=name,
                    version=version,
                    recipe=str(doc["recipe"]),
                    profile=str(doc["profile"]),
                    golden=golden_path,
                    expected_sha256=doc["sha256"],  # as recorded in manifest_path
                )
            register_candidates(self, path, name=name, version=version)
        else:
            self.add_artifact(path, name=name, version=version, profile=profile, golden=golden)
        return self.model(f"{name}:{version}")

    def model(self, ref: str) -> dict[str, Any]:
        """A model by `name:version` (or `name` = its newest version) with its artifacts."""
        name, _, version = ref.partition(":")
        if version:
            row = self.db.query_one(
                "SELECT * FROM models WHERE name = ? AND version = ?", (name, version)
            )
        else:
            row = self.db.query_one(
                "SELECT * FROM models WHERE name = ? ORDER BY created DESC, id DESC LIMIT 1",
                (name,),
            )
        if row is None:
            raise FleetError(f"unknown model {ref!r} (see `edgefleet models list`)")
        row["artifacts"] = self.db.query(
            "SELECT a.sha256, l.recipe, l.profile, a.size, a.golden_sha256, l.created "
            "FROM model_artifacts l JOIN artifacts a ON a.sha256 = l.sha256 "
            "WHERE l.model_id = ? ORDER BY l.profile, l.created",
            (row["id"],),
        )
        return row

    def models(self) -> list[dict[str, Any]]:
        """Every model version with the profiles it has artifacts for."""
        rows = self.db.query("SELECT * FROM models ORDER BY name, created")
        for r in rows:
            r["profiles"] = [
                p or "*"
                for (p,) in self.db.conn.execute(
                    "SELECT profile FROM model_artifacts WHERE model_id = ? ORDER BY profile",
                    (r["id"],),
                )
            ]
        return rows

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
        golden: Path | None = None,
        check: bool = True,
    ) -> dict[str, Any]:
        """Direct deployment: one wave, no gates; every chosen device gets this exact file."""
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
            golden=golden,
            check=check,
        )
        model_id = self.model(f"{manifest.name}:{manifest.version}")["id"]
        target = f"profile:{profile}" if profile else "devices:" + ",".join(targets)
        deployment_id = self.rollouts.create(
            kind="deploy",
            model_id=model_id,
            target=target,
            policy=deploy_policy(),
            assignments=[(d, manifest.sha256, "") for d in targets],
        )
        return self.deployment(deployment_id)

    def start_rollout(self, model_ref: str, selector: str, policy: Policy) -> dict[str, Any]:
        """Staged rollout of model NAME[:VER] to the devices `selector` picks, per `policy`."""
        model = self.model(model_ref)
        by_profile = {a["profile"]: a["sha256"] for a in model["artifacts"]}
        assignments: list[tuple[str, str | None, str]] = []
        for device in self.select(selector):
            sha = by_profile.get(device["profile"]) or by_profile.get(None)
            why = "" if sha else f"no artifact of {model_ref} for profile {device['profile']!r}"
            assignments.append((device["id"], sha, why))
        if assignments and not any(sha for _, sha, _ in assignments):
            profiles = sorted({str(d) for d in by_profile})
            raise FleetError(
                f"{model_ref} has artifacts for {', '.join(profiles)}; none of the "
                f"{len(assignments)} selected devices has one of those profiles"
            )
        rollout_id = self.rollouts.create(
            kind="rollout",
            model_id=model["id"],
            target=selector,
            policy=policy,
            assignments=assignments,
        )
        return self.deployment(rollout_id)

    def select(self, selector: str) -> list[dict[str, Any]]:
        """Devices matching `all`, `profile:P`, `device:ID` or an id glob; comma = union."""
        devices = self.devices()
        chosen: dict[str, dict[str, Any]] = {}
        for term in (t.strip() for t in selector.split(",")):
            if not term:
                raise FleetError(f"--to: empty term in {selector!r}")
            kind, _, value = term.partition(":")
            if term == "all":
                matched = devices
            elif kind == "profile" and value:
                self._profile(value)
                matched = [d for d in devices if d["profile"] == value]
            elif kind == "device" and value:
                matched = [self.device(value)]
            elif ":" not in term:
                matched = [d for d in devices if fnmatch.fnmatchcase(d["id"], term)]
            else:
                raise FleetError(
                    f"--to: {term!r} is not all, profile:P, device:ID or a device-id glob"
                )
            chosen.update((d["id"], d) for d in matched)
        return [chosen[k] for k in sorted(chosen)]

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        """A deployment or rollout with the state of each of its devices."""
        return self.rollouts.status(deployment_id)

    # ------------------------------------------------------------------ desired state (reconcile)
    def unpublished_desired(self) -> list[tuple[str, Desired, list[Manifest]]]:
        """Devices whose desired generation is not published yet: desired state + manifests."""
        rows = self.db.query(
            "SELECT d.id, d.profile, d.desired_generation, d.desired_deployment_id, a.manifest, "
            "g.manifest AS golden, p.policy, d.desired_threads, d.desired_fallback FROM devices d "
            "LEFT JOIN artifacts a ON a.sha256 = d.desired_sha256 "
            "LEFT JOIN artifacts g ON g.sha256 = a.golden_sha256 "
            "LEFT JOIN deployments p ON p.id = d.desired_deployment_id "
            "WHERE d.desired_generation > d.published_generation"
        )
        out = []
        if not rows:
            return out
        # Everything published is signed (docs/security.md); re-read each time so a key rotated
        # by `edgefleet keys rotate` in another process is used from the next reconcile on.
        signer = _fleet_signer(self.home)
        expires = time.time() + DESIRED_VALIDITY_S
        parsed: dict[str, Manifest] = {}  # a wave shares one artifact: parse and sign it once
        for r in rows:
            manifests = [
                parsed.get(m) or parsed.setdefault(m, _signed(signer, parse(m, Manifest)))
                for m in (r["golden"], r["manifest"])
                if m
            ]
            manifest = manifests[-1] if r["manifest"] else None
            fallback = None
            if r["desired_fallback"] and manifest is not None:
                fallback, extra = self._fallback(json.loads(r["desired_fallback"]), signer, parsed)
                manifests += extra  # published (golden first) like the primary's
            profile = self.profiles.get(r["profile"] or "")
            policy = Policy.from_json(json.loads(r["policy"] or "{}"))
            desired = Desired(
                generation=r["desired_generation"],
                deployment_id=r["desired_deployment_id"],
                artifact=ArtifactRef(
                    sha256=manifest.sha256,
                    size=manifest.size,
                    name=manifest.name,
                    version=manifest.version,
                )
                if manifest
                else None,
                benchmark_runs=policy.benchmark_runs,
                latency_budget_ms=profile.budgets.latency_ms if profile else 0.0,
                memory_budget_mb=profile.budgets.peak_rss_mb if profile else 0.0,
                device_id=r["id"],
                profile=r["profile"] or None,
                expires=expires,
                threads=r["desired_threads"],
                fallback=fallback,
            )
            out.append((r["id"], _signed(signer, desired), manifests))
        return out

    def _fallback(
        self, spec: dict[str, Any], signer: FleetSigner | None, parsed: dict[str, Manifest]
    ) -> tuple[Fallback, list[Manifest]]:
        """The Fallback of a desired state and the (signed) manifests its artifact needs."""
        row = self.db.query_one(
            "SELECT a.manifest, g.manifest AS golden FROM artifacts a "
            "LEFT JOIN artifacts g ON g.sha256 = a.golden_sha256 WHERE a.sha256 = ?",
            (spec["sha256"],),
        )
        if row is None:
            raise FleetError(f"fallback artifact {spec['sha256']} is not stored")
        manifests = [
            parsed.get(m) or parsed.setdefault(m, _signed(signer, parse(m, Manifest)))
            for m in (row["golden"], row["manifest"])
            if m
        ]
        target = manifests[-1]
        fallback = Fallback(
            artifact=ArtifactRef(
                sha256=target.sha256, size=target.size, name=target.name, version=target.version
            ),
            latency_ms=float(spec["latency_ms"]),
            threads=spec.get("threads"),
            window_s=float(spec.get("window_s", 60.0)),
        )
        return fallback, manifests

    def set_chunks_retained(self, sha256: str, retained: bool) -> None:
        """Record whether the broker holds this artifact's chunks as retained messages."""
        with self.db.transaction() as tx:
            tx.execute(
                "UPDATE artifacts SET chunks_retained = ? WHERE sha256 = ?",
                (int(retained), sha256),
            )

    def chunks_retained(self) -> set[str]:
        """Artifacts whose chunks the broker holds retained."""
        return {
            r["sha256"]
            for r in self.db.query("SELECT sha256 FROM artifacts WHERE chunks_retained = 1")
        }

    def artifacts_in_use(self) -> set[str]:
        """Artifacts (and their golden blobs) that a device may still need to download."""
        rows = self.db.query(
            "SELECT DISTINCT a.sha256, a.golden_sha256 FROM deployment_devices dd "
            "JOIN artifacts a ON a.sha256 = dd.artifact_sha256 "
            "WHERE dd.state IN ('waiting', 'baselining', 'pending', 'in_progress', 'retrying') "
            "UNION SELECT DISTINCT a.sha256, a.golden_sha256 FROM devices d "
            "JOIN artifacts a ON a.sha256 = d.desired_sha256 "
            "WHERE d.desired_generation > d.reported_generation"
        )
        used = {sha for r in rows for sha in (r["sha256"], r["golden_sha256"]) if sha}
        # An armed fallback may be fetched late (after the primary's activation). Its JSON is
        # read here, not with json_extract/->>, which differ between SQLite and PostgreSQL.
        fallbacks = {
            json.loads(r["desired_fallback"]).get("sha256")
            for r in self.db.query(
                "SELECT DISTINCT desired_fallback FROM devices WHERE desired_fallback IS NOT NULL"
            )
        }
        if fallbacks := {sha for sha in fallbacks if sha}:
            marks = ", ".join("?" * len(fallbacks))
            for r in self.db.query(
                f"SELECT sha256, golden_sha256 FROM artifacts WHERE sha256 IN ({marks})",
                tuple(fallbacks),
            ):
                used |= {sha for sha in (r["sha256"], r["golden_sha256"]) if sha}
        return used

    def mark_published(self, device_id: str, generation: int) -> None:
        """Record that a desired generation reached the broker (retained)."""
        self.mark_published_many([(device_id, generation)])

    def mark_published_many(self, published: list[tuple[str, int]]) -> None:
        """mark_published for many devices in one transaction (a wave of 1,000 is one commit)."""
        ts = now()
        with self.db.transaction() as tx:
            tx.executemany(
                "UPDATE devices SET published_generation = ? "
                "WHERE id = ? AND published_generation < ?",
                [(generation, device_id, generation) for device_id, generation in published],
            )
            tx.executemany(
                "UPDATE deployment_devices SET state = 'in_progress', updated = ? "
                "WHERE device_id = ? AND generation = ? AND state = 'pending'",
                [(ts, device_id, generation) for device_id, generation in published],
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


_T = TypeVar("_T")


def _fleet_signer(home: Path) -> FleetSigner | None:
    """The fleet signing key (created on first use); None only where `cryptography` is missing.

    `cryptography` is a hard dependency of the controller install; only the slim device test
    environment runs the controller without it, and then publishes unsigned (development mode).
    """
    try:
        return FleetSigner.load_or_create(home / "security")
    except ImportError:
        log.warning("cryptography is not installed: publishing UNSIGNED desired state")
        return None


def _signed(signer: FleetSigner | None, message: _T) -> _T:
    """The message signed by the fleet key (unchanged without one)."""
    return signer.sign(message) if signer is not None else message


def _check_names(*, name: str, version: str | None, recipe: str | None = None) -> None:
    """Refuse a model name, version or recipe that could not travel as a safe name."""
    try:
        validate_name("model name", name)
        if version:
            validate_name("model version", version)
        if recipe is not None:
            validate_name("recipe name", recipe)
    except ProtocolError as exc:
        raise FleetError(str(exc)) from None


def _device_row(row: dict[str, Any]) -> dict[str, Any]:
    """Decode JSON columns and booleans of a device row."""
    row = dict(row)
    row["facts"] = json.loads(row.get("facts") or "{}")
    row["online"] = bool(row["online"])
    return row


def read_converter_manifest(path: Path) -> dict[str, Any]:
    """A converters manifest.json, checked for the fields `models add` reads."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FleetError(f"{path}: unreadable ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != CONVERTER_MANIFEST_SCHEMA:
        raise FleetError(
            f"{path}: not an edgefleet artifact manifest ({CONVERTER_MANIFEST_SCHEMA})"
        )
    for key in ("file", "sha256", "recipe", "profile"):
        if not isinstance(doc.get(key), str):
            raise FleetError(f"{path}: field {key!r} missing or not a string")
    golden = doc.get("golden")
    if golden is not None and not (
        isinstance(golden, dict) and isinstance(golden.get("file"), str)
    ):
        raise FleetError(f"{path}: field 'golden' must be null or {{\"file\": ...}}")
    return doc

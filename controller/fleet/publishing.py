"""Desired states and commands: deploy, rollouts' targets, what the runtime still has to publish."""

from __future__ import annotations

import fnmatch
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, TypeVar

from agent.protocol import (
    ArtifactRef,
    Command,
    Desired,
    Fallback,
    Manifest,
    parse,
)
from controller.errors import FleetError
from controller.fleet.core import FleetCore
from controller.fleet.opcheck import refuse_missing_custom_ops
from controller.fleet.rollout.engine import deploy_policy
from controller.fleet.rollout.policy import Policy
from controller.fleet.rollout.states import DeviceState, move_all
from controller.security.signing import DESIRED_VALIDITY_S, FleetSigner
from controller.security.signing import sign_command as sign_for_device
from controller.storage.db import now
from controller.storage.queries import publishing as q
from controller.storage.queries import rollout_states as scopes

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# Rollout device states whose artifact a device may still download.
_NEEDS_ARTIFACT = (
    DeviceState.WAITING,
    DeviceState.BASELINING,
    DeviceState.PENDING,
    DeviceState.IN_PROGRESS,
    DeviceState.RETRYING,
)


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


class Publishing(FleetCore):
    """What each device should run and be told (mixed into Fleet; uses self.db, self.home)."""

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
        if check:
            refuse_missing_custom_ops(model_path, self._runtimes_of(targets))
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

    def _runtimes_of(self, device_ids: list[str]) -> dict[str, tuple[str, str, str]]:
        """Each device's runtime as it reported it (else its profile's) and profile compiler."""
        out: dict[str, tuple[str, str, str]] = {}
        for device_id in device_ids:
            row = self.device(device_id)
            prof = self._profile(row["profile"]) if row.get("profile") else None
            name = row.get("runtime") or (prof.runtime.name if prof else None)
            version = row.get("runtime_version") or (prof.runtime.version if prof else None)
            if name and version:  # a device that never said hello and has no profile: unknown
                kind = prof.compiler.kind if prof else "none"
                out[f"device {device_id}"] = (str(name), str(version), kind)
        return out

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
    def unpublished_desired(
        self, limit: int | None = None
    ) -> list[tuple[str, Desired, list[Manifest]]]:
        """Devices whose desired generation is not published yet: desired state + manifests.

        With `limit`, at most that many, in device-id order (the service's download pacing
        publishes a window's worth at a time and need not sign 10,000 desired states a tick).
        """
        rows = q.unpublished_desired(self.db.conn, limit)
        out: list[tuple[str, Desired, list[Manifest]]] = []
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
        row = q.artifact_manifests(self.db.conn, spec["sha256"])
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
            q.set_chunks_retained(tx, sha256, retained)

    def chunks_retained(self) -> set[str]:
        """Artifacts whose chunks the broker holds retained."""
        return q.chunks_retained(self.db.conn)

    def artifacts_in_use(self) -> set[str]:
        """Artifacts (and their golden blobs) that a device may still need to download."""
        rows = q.artifacts_in_use(self.db.conn, [s.value for s in _NEEDS_ARTIFACT])
        used = {sha for r in rows for sha in (r["sha256"], r["golden_sha256"]) if sha}
        # An armed fallback may be fetched late (after the primary's activation). Its JSON is
        # read here, not with json_extract/->>, which differ between SQLite and PostgreSQL.
        fallbacks = {json.loads(f).get("sha256") for f in q.desired_fallbacks(self.db.conn)}
        if fallbacks := {sha for sha in fallbacks if sha}:
            for r in q.artifact_goldens(self.db.conn, sorted(fallbacks)):
                used |= {sha for sha in (r["sha256"], r["golden_sha256"]) if sha}
        return used

    def mark_published(self, device_id: str, generation: int) -> None:
        """Record that a desired generation reached the broker (retained)."""
        self.mark_published_many([(device_id, generation)])

    def mark_published_many(self, published: list[tuple[str, int]]) -> None:
        """mark_published for many devices in one transaction (a wave of 1,000 is one commit);
        their rollout device timeouts start here (Rollouts.start_deadlines)."""
        ts = self.rollouts.clock()
        with self.db.transaction() as tx:
            q.mark_published(tx, published)
            move_all(
                tx,
                DeviceState.IN_PROGRESS,
                (DeviceState.PENDING,),
                scopes.device_generations(published),
                ts=ts,
            )
            self.rollouts.start_deadlines(tx, published)

    def republish_all(self) -> None:
        """Forget what was published (after a broker reconnect retained state may be gone)."""
        with self.db.transaction() as tx:
            q.forget_published(tx)

    # ------------------------------------------------------------------ commands
    def send_command(self, device_id: str, action: str, *, runs: int = 50, warmup: int = 5) -> str:
        """Queue a one-shot command (benchmark, rollback, resend_status); the service sends it."""
        self.device(device_id)
        command = Command(
            command_id=f"cmd-{uuid.uuid4().hex[:12]}",
            action=action,  # type: ignore[arg-type]  # Command.__post_init__ checks the value
            runs=runs,
            warmup=warmup,
        )
        with self.db.transaction() as tx:
            q.add_command(tx, {"id": command.command_id, "device_id": device_id,
                               "action": action, "runs": runs, "warmup": warmup,
                               "created": now()})  # fmt: skip
        return command.command_id

    def command(self, command_id: str) -> dict[str, Any]:
        """One command with its state."""
        row = q.command(self.db.conn, command_id)
        if row is None:
            raise FleetError(f"unknown command {command_id!r}")
        return row

    def unpublished_commands(self) -> list[tuple[str, Command]]:
        """Commands not yet handed to the broker, oldest first, signed for their device."""
        rows = q.unpublished_commands(self.db.conn)
        signer = _fleet_signer(self.home) if rows else None
        return [
            (
                r["device_id"],
                sign_for_device(
                    signer,
                    Command(
                        command_id=r["id"], action=r["action"], runs=r["runs"], warmup=r["warmup"]
                    ),
                    r["device_id"],
                ),
            )
            for r in rows
        ]

    def sign_command(self, device_id: str, command: Command) -> Command:
        """A command the service builds itself (resend, announce), signed for `device_id`."""
        return sign_for_device(_fleet_signer(self.home), command, device_id)

    def mark_command_published(self, command_id: str) -> None:
        """Record that a command was published."""
        with self.db.transaction() as tx:
            q.mark_command_published(tx, command_id, now())

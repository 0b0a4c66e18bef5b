"""Fleet service layer: registry, models, deployments, ingest; shared by CLI, API and service."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import firmware_profiles
from agent.protocol import (
    ProtocolError,
    validate_device_id,
)
from controller.errors import FleetError
from controller.fleet.artifacts import ArtifactStore
from controller.fleet.ingest import Ingest
from controller.fleet.models import ModelCatalog
from controller.fleet.publishing import Publishing
from controller.fleet.rollout.engine import Rollouts
from controller.fleet.telemetry.store import TelemetryStore
from controller.storage.db import database_target, now
from controller.storage.open import open_database

log = logging.getLogger(__name__)

__all__ = ["Fleet", "FleetError", "default_home"]


def default_home() -> Path:
    """Data directory: $EDGEFLEET_HOME or ~/.local/share/edgefleet."""
    return Path(os.environ.get("EDGEFLEET_HOME", "~/.local/share/edgefleet")).expanduser()


class Fleet(Publishing, Ingest, ModelCatalog):
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


def _device_row(row: dict[str, Any]) -> dict[str, Any]:
    """Decode JSON columns and booleans of a device row."""
    row = dict(row)
    row["facts"] = json.loads(row.get("facts") or "{}")
    row["online"] = bool(row["online"])
    return row



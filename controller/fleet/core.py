"""The fleet's shared state (database, artifacts, rollouts, telemetry, profiles); device reads."""


from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import firmware_profiles
from agent.protocol import Manifest
from controller.errors import FleetError
from controller.fleet.artifacts import ArtifactStore
from controller.fleet.rollout.engine import Rollouts
from controller.fleet.telemetry.store import TelemetryStore
from controller.storage.db import database_target
from controller.storage.open import open_database
from controller.storage.queries import devices as device_queries

if TYPE_CHECKING:
    from controller.fleet.registry import Fleet

log = logging.getLogger(__name__)


def default_home() -> Path:
    """Data directory: $EDGEFLEET_HOME or ~/.local/share/edgefleet."""
    return Path(os.environ.get("EDGEFLEET_HOME", "~/.local/share/edgefleet")).expanduser()


def _device_row(row: dict[str, Any]) -> dict[str, Any]:
    """Decode JSON columns and booleans of a device row."""
    row = dict(row)
    row["facts"] = json.loads(row.get("facts") or "{}")
    row["online"] = bool(row["online"])
    return row


class FleetCore:
    """State every part of Fleet works on, and reading devices (base of every part)."""

    def __init__(self, home: Path, db: str | None = None) -> None:
        """Open the database (`db`, $EDGEFLEET_DB or HOME/edgefleet.db) and the artifact store
        under `home`."""
        self.home = home
        self.db = open_database(database_target(home, db))
        self.artifacts = ArtifactStore(home / "artifacts")
        self.rollouts = Rollouts(cast("Fleet", self))  # FleetCore is always a Fleet's base
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

    def devices(self) -> list[dict[str, Any]]:
        """All devices, ordered by id."""
        return [_device_row(r) for r in device_queries.all_devices(self.db.conn)]

    def has_device(self, device_id: str) -> bool:
        """True when the device is in the registry."""
        return device_queries.exists(self.db.conn, device_id)

    def device(self, device_id: str) -> dict[str, Any]:
        """One device, or FleetError naming the id."""
        row = device_queries.device(self.db.conn, device_id)
        if row is None:
            raise FleetError(f"unknown device {device_id!r} (see `edgefleet devices list`)")
        return _device_row(row)

    @staticmethod
    def _profile(profile: str) -> firmware_profiles.Profile:
        """Load a profile or raise FleetError naming it."""
        try:
            return firmware_profiles.load(profile)
        except firmware_profiles.ProfileError as exc:
            raise FleetError(str(exc)) from None

    def model(self, ref: str) -> dict[str, Any]:
        """A model version by reference (defined by ModelCatalog)."""
        raise NotImplementedError

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
        """Store one artifact file (defined by ModelCatalog)."""
        raise NotImplementedError

"""Fleet service layer: registry, models, deployments, ingest; shared by CLI, API and service."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from agent.protocol import (
    ProtocolError,
    validate_device_id,
)
from controller.errors import FleetError
from controller.fleet.core import default_home
from controller.fleet.ingest import Ingest
from controller.fleet.models import ModelCatalog
from controller.fleet.publishing import Publishing
from controller.security.revocation import read_revoked, revoked_path, write_revoked
from controller.storage.db import now
from controller.storage.queries import devices as device_queries

log = logging.getLogger(__name__)

__all__ = ["Fleet", "FleetError", "default_home"]


class Fleet(Publishing, Ingest, ModelCatalog):
    """Everything that changes or reads fleet state; owns one database connection."""


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
            device_queries.register(tx, device_id, profile, "registered by operator", "cli", now())
        row = self.device(device_id)
        if bundle is not None:
            row["auth"] = auth
            row["bundle"] = str(bundle)
        return row

    def remove_device(self, device_id: str) -> None:
        """Revoke a device and forget it (its history of events and benchmarks is kept).

        Removing without revoking would leave its credentials working and let its next hello
        register it again; `devices register` brings a removed device back.
        """
        self.device(device_id)
        self.revoke_device(device_id)
        with self.db.transaction() as tx:
            device_queries.remove(tx, device_id)

    def revoke_device(self, device_id: str) -> bool:
        """Revoke a device's broker access and refuse its messages (docs/security.md,
        "Revocation"); True when it had a password to remove."""
        try:
            validate_device_id(device_id)
        except ProtocolError as exc:
            raise FleetError(str(exc)) from None
        try:
            from controller.security.identity import FleetSecurity, IdentityError
        except ImportError:  # no `cryptography`: no password file can exist; record the id
            path = revoked_path(self.home)
            write_revoked(path, read_revoked(path) | {device_id})
            return False
        try:
            return FleetSecurity(self.home).revoke_device(device_id)
        except IdentityError as exc:
            raise FleetError(str(exc)) from None


    def device_detail(self, device_id: str, limit: int = 20) -> dict[str, Any]:
        """A device with its latest benchmarks and events."""
        detail = self.device(device_id)
        detail["benchmarks"] = self.benchmarks(device_id, limit)
        detail["events"] = device_queries.recent_events(self.db.conn, device_id, limit)
        return detail

    def benchmarks(self, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
        """Latest benchmark reports of a device, newest first."""
        rows = device_queries.recent_benchmarks(self.db.conn, device_id, limit)
        return [
            {**json.loads(r["report"]), "deployment_id": r["deployment_id"], "ts": r["ts"]}
            for r in rows
        ]



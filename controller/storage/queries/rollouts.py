"""Rollouts and their device rows (controller/fleet/rollout/engine.py, control.py, events.py,
outliers.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, func, insert, select, update

from controller.storage.db import Connection
from controller.storage.queries import Prepared, dicts
from controller.storage.queries.rollout_states import state_literal
from controller.storage.tables import deployment_devices, deployments

dd, dp = deployment_devices.c, deployments.c


def create_rollout(conn: Connection, row: dict[str, Any]) -> None:
    """A new rollout row (id, model_id, target, created, kind, policy, state, wave, updated)."""
    conn.sa.execute(insert(deployments).values(**row))


_DEVICE_COLUMNS = ("deployment_id", "device_id", "artifact_sha256", "generation", "state",
                   "detail", "updated", "position", "wave")  # fmt: skip
_ADD_DEVICE = Prepared(
    lambda dialect: insert(deployment_devices).values(
        {c: bindparam(c) for c in _DEVICE_COLUMNS}
    ),
    _DEVICE_COLUMNS,
)


def add_device(conn: Connection, row: dict[str, Any]) -> None:
    """A device's row in a rollout (generation 0 until its wave starts)."""
    _ADD_DEVICE.execute(conn, {"generation": 0, **row})


def set_phase(conn: Connection, rollout_id: str, phase: str) -> None:
    """A rollout's phase: 'selecting' (candidates on canaries) or 'waves'."""
    conn.sa.execute(update(deployments).where(dp.id == rollout_id).values(phase=phase))


def rollouts_in(conn: Connection, states: Sequence[str]) -> list[dict[str, Any]]:
    """Every rollout row in one of `states` (inlined: the partial index applies)."""
    return dicts(conn, select(deployments).where(dp.state.in_(_literal_states(states))))


def _literal_states(states: Sequence[str]) -> list[Any]:
    """States as SQL literals, in the given order (to match a partial index's text)."""
    return [state_literal(s) for s in states]


def state_and_wave(conn: Connection, rollout_id: str) -> tuple[str, int] | None:
    """A rollout's state and current wave, or None."""
    row = conn.sa.execute(select(dp.state, dp.wave).where(dp.id == rollout_id)).first()
    return None if row is None else (str(row[0]), int(row[1]))


def phase(conn: Connection, rollout_id: str) -> str:
    """A rollout's phase."""
    return str(conn.sa.execute(select(dp.phase).where(dp.id == rollout_id)).scalar_one())


def counts(conn: Connection, rollout_id: str, up_to_wave: int | None = None) -> dict[str, int]:
    """Devices per state in a rollout (or in its waves up to `up_to_wave`)."""
    query = select(dd.state, func.count()).where(dd.deployment_id == rollout_id)
    if up_to_wave is not None:
        query = query.where(dd.wave <= up_to_wave)
    return {str(s): int(n) for s, n in conn.sa.execute(query.group_by(dd.state))}



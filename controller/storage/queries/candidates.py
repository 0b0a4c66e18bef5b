"""Registered candidates of a model and what a selection did with them
(controller/fleet/candidates.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, exists, insert, select

from controller.storage.db import Connection
from controller.storage.queries import dicts
from controller.storage.tables import (
    artifacts,
    candidate_trials,
    deployment_devices,
    deployments,
    model_candidates,
)

c = model_candidates.c
_COLUMNS = ("rank", "sha256", "recipe", "threads", "host")


def candidates(conn: Connection, model_id: int, profile: str) -> list[tuple[Any, ...]]:
    """(rank, sha256, recipe, threads, host) of a model's candidates for a profile, by rank."""
    rows = conn.sa.execute(
        select(*(c[n] for n in _COLUMNS))
        .where(c.model_id == model_id, c.profile == profile)
        .order_by(c.rank)
    )
    return [tuple(r) for r in rows]


def replace_candidates(
    conn: Connection, model_id: int, profile: str, rows: Sequence[tuple[Any, ...]]
) -> None:
    """A model's candidates for a profile become `rows` ((rank, sha256, recipe, threads,
    host) each)."""
    conn.sa.execute(delete(model_candidates).where(c.model_id == model_id, c.profile == profile))
    if rows:
        conn.sa.execute(
            insert(model_candidates),
            [{"model_id": model_id, "profile": profile, **dict(zip(_COLUMNS, r, strict=True))}
             for r in rows],
        )  # fmt: skip


def model_candidate_rows(conn: Connection, model_id: int) -> list[dict[str, Any]]:
    """profile, rank, sha256, recipe, threads, host (JSON text), size of a model's candidates."""
    a = artifacts.c
    return dicts(
        conn,
        select(c.profile, c.rank, c.sha256, c.recipe, c.threads, c.host, a.size)
        .select_from(model_candidates)
        .join(artifacts, a.sha256 == c.sha256)
        .where(c.model_id == model_id)
        .order_by(c.profile, c.rank),
    )


def selections(conn: Connection, model_id: int) -> list[dict[str, Any]]:
    """id, state, phase, created of a model's rollouts that tried candidates, newest first."""
    d = deployments.c
    tried = exists().where(candidate_trials.c.rollout_id == d.id)
    return dicts(
        conn,
        select(d.id, d.state, d.phase, d.created)
        .where(d.model_id == model_id, tried)
        .order_by(d.created.desc()),
    )


def fell_back(conn: Connection, rollout_id: str) -> list[dict[str, Any]]:
    """device_id, message of a rollout's devices that fell back, by device."""
    dd = deployment_devices.c
    return dicts(
        conn,
        select(dd.device_id, dd.fell_back.label("message"))
        .where(dd.deployment_id == rollout_id, dd.fell_back.is_not(None))
        .order_by(dd.device_id),
    )


def outliers(conn: Connection, rollout_id: str) -> list[dict[str, Any]]:
    """device_id, state, reason of a rollout's devices marked outliers, by device."""
    dd = deployment_devices.c
    return dicts(
        conn,
        select(dd.device_id, dd.state, dd.outlier.label("reason"))
        .where(dd.deployment_id == rollout_id, dd.outlier.is_not(None))
        .order_by(dd.device_id),
    )

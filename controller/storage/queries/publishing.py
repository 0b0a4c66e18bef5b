"""Desired state, artifacts in use and the command queue (controller/fleet/publishing.py)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, bindparam, insert, literal_column, select, union, update

from controller.storage.db import Connection
from controller.storage.queries import Prepared, dicts, first
from controller.storage.tables import artifacts, commands, deployment_devices, deployments, devices

d, a, cm = devices.c, artifacts.c, commands.c


def in_literal(column: Any, values: Iterable[str]) -> ColumnElement[bool]:
    """`column IN ('a', 'b')` with the values inlined, so a partial index on them still
    applies. Only for fixed identifiers (enum values), never caller input."""
    texts = list(values)
    for v in texts:
        if not v.replace("_", "").isalnum():
            raise ValueError(f"not an identifier: {v!r}")
    result: ColumnElement[bool] = column.in_([literal_column(f"'{v}'") for v in texts])
    return result


def unpublished_desired(conn: Connection, limit: int | None) -> list[dict[str, Any]]:
    """Devices whose desired generation is not published yet, by id (at most `limit`): id,
    profile, desired_generation, desired_deployment_id, manifest, golden (its manifest),
    policy, desired_threads, desired_fallback."""
    g = artifacts.alias("g")
    p = deployments
    query = (
        select(d.id, d.profile, d.desired_generation, d.desired_deployment_id, a.manifest,
               g.c.manifest.label("golden"), p.c.policy, d.desired_threads, d.desired_fallback)
        .select_from(
            devices.outerjoin(artifacts, a.sha256 == d.desired_sha256)
            .outerjoin(g, g.c.sha256 == a.golden_sha256)
            .outerjoin(p, p.c.id == d.desired_deployment_id)
        )
        .where(d.desired_generation > d.published_generation)
    )  # fmt: skip
    if limit is not None:
        query = query.order_by(d.id).limit(limit)
    return dicts(conn, query)


def artifact_manifests(conn: Connection, sha256: str) -> dict[str, Any] | None:
    """manifest and golden (its golden's manifest) of a stored artifact, or None."""
    g = artifacts.alias("g")
    return first(
        conn,
        select(a.manifest, g.c.manifest.label("golden"))
        .select_from(artifacts.outerjoin(g, g.c.sha256 == a.golden_sha256))
        .where(a.sha256 == sha256),
    )


def set_chunks_retained(conn: Connection, sha256: str, retained: bool) -> None:
    """Whether the broker holds an artifact's chunks retained."""
    conn.sa.execute(
        update(artifacts).where(a.sha256 == sha256).values(chunks_retained=int(retained))
    )


def chunks_retained(conn: Connection) -> set[str]:
    """Artifacts whose chunks the broker holds retained."""
    return set(conn.sa.execute(select(a.sha256).where(a.chunks_retained == 1)).scalars())


def artifacts_in_use(conn: Connection, rollout_states: Iterable[str]) -> list[dict[str, Any]]:
    """sha256, golden_sha256 of artifacts a rollout device in these states, or a device whose
    desired generation is not reported yet, may still download."""
    dd = deployment_devices.c
    by_rollout = (
        select(a.sha256, a.golden_sha256)
        .distinct()
        .select_from(deployment_devices)
        .join(artifacts, a.sha256 == dd.artifact_sha256)
        .where(in_literal(dd.state, rollout_states))
    )
    by_desired = (
        select(a.sha256, a.golden_sha256)
        .distinct()
        .select_from(devices)
        .join(artifacts, a.sha256 == d.desired_sha256)
        .where(d.desired_generation > d.reported_generation)
    )
    return dicts(conn, union(by_rollout, by_desired))


def desired_fallbacks(conn: Connection) -> list[str]:
    """The distinct armed fallbacks (JSON text) of devices."""
    query = select(d.desired_fallback).distinct().where(d.desired_fallback.is_not(None))
    return [str(v) for v in conn.sa.execute(query).scalars()]


def artifact_goldens(conn: Connection, shas: Sequence[str]) -> list[dict[str, Any]]:
    """sha256, golden_sha256 of these artifacts."""
    return dicts(conn, select(a.sha256, a.golden_sha256).where(a.sha256.in_(list(shas))))


_PUBLISHED = Prepared(
    lambda dialect: update(devices)
    .where(d.id == bindparam("device"), d.published_generation < bindparam("generation"))
    .values(published_generation=bindparam("generation")),
)


def mark_published(conn: Connection, published: Sequence[tuple[str, int]]) -> None:
    """published_generation = each (device, generation)'s, never moving it backwards."""
    _PUBLISHED.executemany(conn, [{"device": dv, "generation": g} for dv, g in published])


def forget_published(conn: Connection) -> None:
    """published_generation = 0 for every device."""
    conn.sa.execute(update(devices).values(published_generation=0))


def add_command(conn: Connection, row: dict[str, Any]) -> None:
    """Queue a command (id, device_id, action, runs, warmup, created)."""
    conn.sa.execute(insert(commands).values(**row))


def command(conn: Connection, command_id: str) -> dict[str, Any] | None:
    """One command's row, or None."""
    return first(conn, select(commands).where(cm.id == command_id))


def unpublished_commands(conn: Connection) -> list[dict[str, Any]]:
    """Commands not handed to the broker yet, oldest first."""
    return dicts(conn, select(commands).where(cm.published.is_(None)).order_by(cm.created))


def mark_command_published(conn: Connection, command_id: str, at: float) -> None:
    """A command reached the broker."""
    conn.sa.execute(update(commands).where(cm.id == command_id).values(published=at))

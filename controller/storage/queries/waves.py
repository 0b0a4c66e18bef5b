"""Wave steps of the rollout engine: wave starts, desired states, baselines, retries
(controller/fleet/rollout/waves.py)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, bindparam, case, exists, func, insert, select, union_all, update

from controller.storage.db import Connection
from controller.storage.queries import Prepared
from controller.storage.queries.rollout_states import state_literal
from controller.storage.queries.rollouts import set_device_columns
from controller.storage.tables import (
    artifacts,
    benchmarks,
    candidate_trials,
    commands,
    deployment_devices,
    deployments,
    devices,
    events,
    rollout_waves,
)

dd, d = deployment_devices.c, devices.c


def _row(key: tuple[str, str]) -> Any:
    """WHERE of row (rollout id, device id)."""
    return and_(dd.deployment_id == key[0], dd.device_id == key[1])


def start_wave(conn: Connection, rollout_id: str, wave: int, ts: float, driver: str) -> None:
    """Set a rollout's current wave and record its start (with how many devices it has).

    The `rollout_waves` row makes the start once per wave: a second start (two drivers at
    once) fails on the primary key (IntegrityError) and rolls its transaction back."""
    conn.sa.execute(
        update(deployments).where(deployments.c.id == rollout_id).values(wave=wave, updated=ts)
    )
    size = conn.sa.execute(
        select(func.count()).where(dd.deployment_id == rollout_id, dd.wave == wave)
    ).scalar_one()
    conn.sa.execute(
        insert(rollout_waves).values(
            rollout_id=rollout_id, wave=wave, started=ts, driver=driver, devices=int(size)
        )
    )


def waiting_in_wave(
    conn: Connection, rollout_id: str, wave: int, waiting: str
) -> list[tuple[str, str, str | None, bool]]:
    """(device_id, artifact, current model, canary) of a wave's rows in state `waiting`.

    A canary (a device that ran candidate trials in this rollout) ran candidates since the
    rollout started, so its current model is the row's previous_sha256, not what it reports."""
    t = candidate_trials.c
    canary = exists().where(t.rollout_id == dd.deployment_id, t.device_id == dd.device_id)
    rows = conn.sa.execute(
        select(dd.device_id, dd.artifact_sha256,
               case((canary, dd.previous_sha256), else_=d.model_sha256), canary)
        .select_from(deployment_devices.outerjoin(devices, d.id == dd.device_id))
        .where(dd.deployment_id == rollout_id, dd.wave == wave,
               dd.state == state_literal(waiting))
    )  # fmt: skip
    return [(str(i), str(s), c, bool(k)) for i, s, c, k in rows]


def set_device(conn: Connection, key: tuple[str, str], **columns: Any) -> None:
    """Set columns of row (rollout id, device id): previous_sha256, baseline, generation, …"""
    # Compiled once per column set: a wave start runs two per device.
    set_device_columns(conn, key, **columns)


def add_attempt(conn: Connection, key: tuple[str, str]) -> None:
    """One more attempt on row (rollout id, device id)."""
    conn.sa.execute(update(deployment_devices).where(_row(key)).values(attempts=dd.attempts + 1))


def add_command(
    conn: Connection, command_id: str, device_id: str, action: str, runs: int, warmup: int,
    created: float,
) -> None:  # fmt: skip
    """Queue a command (benchmark, rollback) for a device."""
    conn.sa.execute(
        insert(commands).values(id=command_id, device_id=device_id, action=action, runs=runs,
                                warmup=warmup, created=created)
    )  # fmt: skip


_ROW = (dd.deployment_id == bindparam("rollout_id")) & (dd.device_id == bindparam("device_id"))
# The per-device statements of a wave start, compiled once (building a Core statement and its
# cache key per call cost more than SQLite's work for them: ~1.5 ms of ~3.5 ms per device).
_ROW_OPTIONS = Prepared(
    lambda dialect: select(dd.artifact_sha256, dd.threads, dd.fallback).where(_ROW),
    ("rollout_id", "device_id"),
)


def row_options(conn: Connection, key: tuple[str, str]) -> tuple[str, int | None, str | None]:
    """(artifact_sha256, threads, fallback JSON) of row (rollout id, device id)."""
    row = _ROW_OPTIONS.execute_row(conn, key).fetchone()
    if row is None:
        raise LookupError(f"no row {key} in deployment_devices")
    return str(row[0]), row[1], row[2]


def skip_info(conn: Connection, key: tuple[str, str]) -> tuple[str, str | None, str]:
    """(state, previous_sha256, rollout policy JSON) of row (rollout id, device id)."""
    row = conn.sa.execute(
        select(dd.state, dd.previous_sha256, deployments.c.policy)
        .join(deployments, deployments.c.id == dd.deployment_id)
        .where(_row(key))
    ).one()
    return str(row[0]), row[1], str(row[2])


def artifact_known(conn: Connection, sha256: str) -> bool:
    """Whether the controller holds artifact `sha256`."""
    found = conn.sa.execute(select(artifacts.c.sha256).where(artifacts.c.sha256 == sha256))
    return found.first() is not None


def detail(conn: Connection, key: tuple[str, str]) -> str:
    """The detail of row (rollout id, device id)."""
    return str(conn.sa.execute(select(dd.detail).where(_row(key))).scalar_one())


@functools.lru_cache(maxsize=16)
def _rows_to_drive(waiting: tuple[str, ...], timing: tuple[str, ...]) -> Prepared:
    """SELECT of a rollout's rows in one of `waiting`, or in one of `timing` past deadline."""
    # One SELECT per state, each a seek on index deployment_devices_state (deployment_id,
    # state, deadline), so rows that cannot change this tick are not read at all. (One WHERE
    # with ORs, SQLite plans as a scan of the rollout's rows.)
    columns = (dd.device_id, dd.artifact_sha256, dd.state, dd.attempts, dd.deadline,
               dd.previous_sha256)  # fmt: skip
    mine = dd.deployment_id == bindparam("rollout_id")
    parts = [select(*columns).where(mine, dd.state == state_literal(s)) for s in waiting]
    parts += [
        select(*columns).where(mine, dd.state == state_literal(s), dd.deadline < bindparam("now"))
        for s in timing
    ]
    # No ORDER BY: SQLite would then read the baselining part along the primary key (sorted
    # by device id, every row of the rollout); the caller sorts the few rows.
    stmt = union_all(*parts)
    return Prepared(lambda dialect: stmt)


def rows_to_drive(
    conn: Connection,
    rollout_id: str,
    waiting: Sequence[str],
    timing: Sequence[str],
    now: float,
) -> list[tuple[str, str, str, int, float | None, str | None]]:
    """(device_id, artifact, state, attempts, deadline, previous_sha256) of a rollout's rows
    in one of the states `waiting` (whatever their deadline), or in one of `timing` with a
    deadline before `now`; by device id. The others cannot change in this tick."""
    if not waiting and not timing:
        return []
    stmt = _rows_to_drive(tuple(waiting), tuple(timing))
    rows = stmt.execute(conn, {"rollout_id": rollout_id, "now": now}).fetchall()
    return sorted((str(i), str(s), str(st), int(a), dl, p) for i, s, st, a, dl, p in rows)


_LAST_GENERATION = Prepared(
    lambda dialect: select(
        case((d.desired_generation > d.reported_generation, d.desired_generation),
             else_=d.reported_generation)
    ).where(d.id == bindparam("device_id")),
    ("device_id",),
)  # fmt: skip


def last_generation(conn: Connection, device_id: str) -> int | None:
    """The higher of a device's desired and reported generation, or None (not registered)."""
    row = _LAST_GENERATION.execute_row(conn, (device_id,)).fetchone()
    return None if row is None else int(row[0] or 0)


_SET_DESIRED = Prepared(
    lambda dialect: update(devices).where(d.id == bindparam("device_id")).values(
        desired_generation=bindparam("generation"), desired_sha256=bindparam("sha"),
        desired_deployment_id=bindparam("rollout_id"), desired_threads=bindparam("threads"),
        desired_fallback=bindparam("fallback")),
    ("generation", "sha", "rollout_id", "threads", "fallback", "device_id"),
)  # fmt: skip


def set_desired(
    conn: Connection, device_id: str, generation: int, sha: str | None, rollout_id: str,
    threads: int | None, fallback: str | None,
) -> None:  # fmt: skip
    """A device's desired state: model, owning rollout, runtime options, generation."""
    _SET_DESIRED.execute_row(conn, (generation, sha, rollout_id, threads, fallback, device_id))


_b, _e = benchmarks.c, events.c
_LATEST_BENCHMARK = Prepared(
    lambda dialect: select(_b.report)
    .join(events, and_(_e.device_id == _b.device_id, _e.event_id == _b.event_id))
    .where(_b.device_id == bindparam("device_id"), _b.model_sha256 == bindparam("sha"),
           _e.received >= bindparam("since"))
    .order_by(_e.received.desc())
    .limit(1)
)  # fmt: skip


def latest_benchmark(conn: Connection, device_id: str, sha: str, since: float) -> str | None:
    """The report (JSON) of the newest benchmark of `sha` on a device received after `since`
    (the controller's receive time, not the device's clock), or None."""
    params = {"device_id": device_id, "sha": sha, "since": since}
    found = _LATEST_BENCHMARK.execute(conn, params).fetchone()
    return None if found is None else str(found[0])

"""Rollouts and their device rows (controller/fleet/rollout/engine.py, control.py, events.py,
outliers.py)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, case, func, insert, literal_column, select, update

from controller.storage.db import Connection
from controller.storage.queries import Prepared, dicts, first
from controller.storage.queries.rollout_states import state_literal
from controller.storage.tables import (
    benchmarks,
    candidate_trials,
    deployment_devices,
    deployments,
    devices,
    models,
)

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


_COUNTS_UP_TO = Prepared(
    lambda dialect: select(
        dd.state, func.count(), func.sum(case((dd.wave <= bindparam("wave"), literal_column("1")),
                                      else_=literal_column("0")))
    )
    .where(dd.deployment_id == bindparam("rollout_id"))
    .group_by(dd.state),
    ("wave", "rollout_id"),
)


def counts_up_to(
    conn: Connection, rollout_id: str, wave: int
) -> tuple[dict[str, int], dict[str, int]]:
    """(devices per state in a rollout, devices per state in its waves up to `wave`) in one
    read: what `counts` returns for both, from index deployment_devices_state alone."""
    every: dict[str, int] = {}
    so_far: dict[str, int] = {}
    for state, n, upto in _COUNTS_UP_TO.execute_row(conn, (wave, rollout_id)).fetchall():
        every[str(state)] = int(n)
        if upto:  # as `counts(up_to_wave=…)`: a state with no row in those waves is absent
            so_far[str(state)] = int(upto)
    return every, so_far


_DEVICE_FOR_EVENT = Prepared(
    lambda dialect: select(dd.state, dd.attempts, dd.baseline, dd.previous_sha256, dp.policy)
    .join(deployments, dp.id == dd.deployment_id)
    .where(dd.deployment_id == bindparam("rollout_id"), dd.device_id == bindparam("device_id"),
           dd.generation == bindparam("generation")),
    ("rollout_id", "device_id", "generation"),
)  # fmt: skip


def device_for_event(
    conn: Connection, rollout_id: str, device_id: str, generation: int
) -> tuple[str, int, str | None, str | None, str] | None:
    """(state, attempts, baseline, previous_sha256, rollout policy) of a device's row in a
    rollout at `generation`, or None (an old generation, or an unknown rollout)."""
    row = _DEVICE_FOR_EVENT.execute_row(conn, (rollout_id, device_id, generation)).fetchone()
    return None if row is None else (row[0], int(row[1]), row[2], row[3], row[4])


@functools.lru_cache(maxsize=64)
def _set_columns(columns: tuple[str, ...]) -> Prepared:
    """UPDATE of `columns` of one row (rollout, device), compiled once per column set (the
    event path runs one per event)."""
    stmt = (
        update(deployment_devices)
        .where(dd.deployment_id == bindparam("rollout_id"), dd.device_id == bindparam("device_id"))
        .values({c: bindparam(f"v_{c}") for c in columns})
    )
    return Prepared(lambda dialect: stmt)


def set_device_columns(conn: Connection, key: tuple[str, str], **columns: Any) -> None:
    """Set columns of row (rollout id, device id): result, stage, outlier, fell_back, …"""
    unknown = [c for c in columns if c not in dd]
    if unknown:
        raise ValueError(f"not a column of deployment_devices: {', '.join(unknown)}")
    params = {"rollout_id": key[0], "device_id": key[1]}
    params |= {f"v_{c}": v for c, v in columns.items()}
    _set_columns(tuple(columns)).execute(conn, params)


def peer_results(conn: Connection, key: tuple[str, str]) -> list[tuple[str, str | None]]:
    """(result, baseline) JSON of the other devices of a rollout that reported a result for
    the same artifact and have the same profile as device key[1]."""
    mine = deployment_devices.alias("mine")
    me = devices.alias("me")
    same_artifact = (
        select(mine.c.artifact_sha256)
        .where(mine.c.deployment_id == key[0], mine.c.device_id == key[1])
        .scalar_subquery()
    )
    same_profile = select(me.c.profile).where(me.c.id == key[1]).scalar_subquery()
    rows = conn.sa.execute(
        select(dd.result, dd.baseline)
        .join(devices, devices.c.id == dd.device_id)
        .where(
            dd.deployment_id == key[0],
            dd.device_id != key[1],
            dd.result.is_not(None),
            dd.artifact_sha256 == same_artifact,
            devices.c.profile == same_profile,
        )
    )
    return [(str(r), b) for r, b in rows]


def rollout(conn: Connection, rollout_id: str) -> dict[str, Any] | None:
    """A rollout's row, or None."""
    return first(conn, select(deployments).where(dp.id == rollout_id))


def state(conn: Connection, rollout_id: str) -> str | None:
    """A rollout's state, or None."""
    found = conn.sa.execute(select(dp.state).where(dp.id == rollout_id)).scalar()
    return None if found is None else str(found)


def trial_started(conn: Connection, rollout_id: str, waiting: str) -> dict[str, bool]:
    """Per device with candidate trials in a rollout: whether any of them left trial state
    `waiting`."""
    t = candidate_trials.c
    started = func.max(case((t.state != state_literal(waiting), 1), else_=0))
    rows = conn.sa.execute(
        select(t.device_id, started).where(t.rollout_id == rollout_id).group_by(t.device_id)
    )
    return {str(d): bool(s) for d, s in rows}


def devices_in(
    conn: Connection, rollout_id: str, states: Sequence[str]
) -> list[tuple[str, str | None, str]]:
    """(device_id, previous_sha256, state) of a rollout's rows in one of `states`."""
    rows = conn.sa.execute(
        select(dd.device_id, dd.previous_sha256, dd.state).where(
            dd.deployment_id == rollout_id, dd.state.in_(list(states))
        )
    )
    return [(str(d), p, str(s)) for d, p, s in rows]


def desired_owner(conn: Connection, device_id: str) -> tuple[str | None] | None:
    """(desired_deployment_id,) of a device, or None when it is not registered."""
    row = conn.sa.execute(
        select(devices.c.desired_deployment_id).where(devices.c.id == device_id)
    ).first()
    return None if row is None else (row[0],)


def device_rows(conn: Connection, rollout_id: str) -> list[dict[str, Any]]:
    """A rollout's device rows for its status, by position."""
    return dicts(
        conn,
        select(dd.device_id, dd.wave, dd.artifact_sha256, dd.previous_sha256, dd.generation,
               dd.state, dd.attempts, dd.stage, dd.detail, dd.result, dd.updated, dd.threads,
               dd.outlier, dd.fell_back)
        .where(dd.deployment_id == rollout_id)
        .order_by(dd.position),
    )  # fmt: skip


def model_name(conn: Connection, model_id: int) -> dict[str, Any] | None:
    """name, version of a model, or None."""
    return first(conn, select(models.c.name, models.c.version).where(models.c.id == model_id))


def counts_of_all(conn: Connection) -> dict[str, dict[str, int]]:
    """Devices per state of every rollout, in one GROUP BY (the list view read one per rollout)."""
    out: dict[str, dict[str, int]] = {}
    query = select(dd.deployment_id, dd.state, func.count()).group_by(dd.deployment_id, dd.state)
    for rollout_id, state, n in conn.sa.execute(query):
        out.setdefault(str(rollout_id), {})[str(state)] = int(n)
    return out


def all_rollouts(conn: Connection) -> list[dict[str, Any]]:
    """id, kind, state, wave, target, created, reason, model (name:version) of every rollout
    and deployment, newest first."""
    m = models.c
    return dicts(
        conn,
        select(dp.id, dp.kind, dp.state, dp.wave, dp.target, dp.created, dp.reason,
               (m.name + literal_column("':'") + m.version).label("model"))
        .join(models, m.id == dp.model_id)
        .order_by(dp.created.desc()),
    )  # fmt: skip


def latest_benchmarks(conn: Connection, profile: str | None) -> list[dict[str, Any]]:
    """device_id, profile, model_sha256, report (JSON) of each device's newest benchmark of
    the model it runs (of one profile, or all)."""
    d, b = devices.c, benchmarks.alias("b2")
    newest = (
        select(b.c.id)
        .where(b.c.device_id == d.id, b.c.model_sha256 == d.model_sha256)
        .order_by(b.c.ts.desc(), b.c.id.desc())
        .limit(1)
        .correlate(devices)
        .scalar_subquery()
    )
    query = (
        select(d.id.label("device_id"), d.profile, d.model_sha256, benchmarks.c.report)
        .select_from(devices)
        .join(benchmarks, benchmarks.c.id == newest)
        .where(d.model_sha256.is_not(None))
    )
    if profile is not None:
        query = query.where(d.profile == profile)
    return dicts(conn, query)


def desired_owners(conn: Connection, device_ids: Sequence[str]) -> dict[str, str]:
    """The rollout (desired_deployment_id) each of these devices is pointed at, if any."""
    d = devices.c
    out: dict[str, str] = {}
    for i in range(0, len(device_ids), 500):
        part = list(device_ids[i : i + 500])
        rows = conn.sa.execute(
            select(d.id, d.desired_deployment_id).where(
                d.id.in_(part), d.desired_deployment_id.is_not(None)
            )
        )
        out.update((str(a), str(b)) for a, b in rows)
    return out


def policy_text(conn: Connection, rollout_id: str) -> str | None:
    """A rollout's policy (JSON text), or None."""
    found = conn.sa.execute(select(dp.policy).where(dp.id == rollout_id)).scalar()
    return None if found is None else str(found)


_START_DEADLINE = Prepared(
    lambda dialect: update(deployment_devices)
    .where(dd.deployment_id == bindparam("rollout_id"), dd.device_id == bindparam("device_id"),
           dd.generation == bindparam("generation"), dd.deadline.is_(None))
    .values(deadline=bindparam("deadline")),
)  # fmt: skip
_START_TRIAL_DEADLINE = Prepared(
    lambda dialect: update(candidate_trials)
    .where(candidate_trials.c.rollout_id == bindparam("rollout_id"),
           candidate_trials.c.device_id == bindparam("device_id"),
           candidate_trials.c.generation == bindparam("generation"),
           candidate_trials.c.state == literal_column("'running'"),
           candidate_trials.c.deadline.is_(None))
    .values(deadline=bindparam("deadline")),
)  # fmt: skip


def start_deadlines(conn: Connection, rows: Sequence[tuple[float, str, str, int]]) -> None:
    """Set the deadline of rollout rows and running candidate trials (deadline, rollout id,
    device id, generation) that have none yet: only the first publication starts it."""
    params = [{"deadline": t, "rollout_id": r, "device_id": d, "generation": g}
              for t, r, d, g in rows]  # fmt: skip
    _START_DEADLINE.executemany(conn, params)
    _START_TRIAL_DEADLINE.executemany(conn, params)

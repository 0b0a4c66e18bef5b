"""Candidate trials on canaries and the decisions per profile (controller/fleet/rollout/
selection.py). Trial states come from the caller (fleet/rollout/trial_states.py keeps the
table) as fixed identifiers, inlined as literals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import and_, exists, func, insert, select, update

from controller.storage.db import Connection
from controller.storage.queries import dicts
from controller.storage.queries.rollout_states import any_state, state_literal
from controller.storage.tables import (
    candidate_decisions,
    candidate_trials,
    deployment_devices,
    deployments,
    devices,
    model_candidates,
)

t, dd, dv = candidate_trials.c, deployment_devices.c, devices.c

Trial = tuple[str, str, int]  # (rollout id, device id, rank)


def _trial(key: Trial) -> Any:
    """WHERE of one trial."""
    return and_(t.rollout_id == key[0], t.device_id == key[1], t.rank == key[2])


def waiting_devices(
    conn: Connection, rollout_id: str, waiting: str
) -> list[tuple[str, str | None, int]]:
    """(device_id, profile, online) of a rollout's rows in state `waiting`, in rollout order."""
    rows = conn.sa.execute(
        select(dd.device_id, dv.profile, dv.online)
        .join(devices, dv.id == dd.device_id)
        .where(dd.deployment_id == rollout_id, dd.state == state_literal(waiting))
        .order_by(dd.position)
    )
    return [(str(d), p, int(o or 0)) for d, p, o in rows]


def top_candidates(
    conn: Connection, model_id: int, profile: str, limit: int
) -> list[tuple[int, str, int | None]]:
    """(rank, sha256, threads) of a model's best `limit` candidates for a profile."""
    c = model_candidates.c
    rows = conn.sa.execute(
        select(c.rank, c.sha256, c.threads)
        .where(c.model_id == model_id, c.profile == profile)
        .order_by(c.rank)
        .limit(limit)
    )
    return [(int(r), str(s), th) for r, s, th in rows]


def device_model(conn: Connection, device_id: str) -> str | None:
    """The model a device reports it runs."""
    found = conn.sa.execute(select(dv.model_sha256).where(dv.id == device_id)).first()
    return None if found is None else found[0]


def add_trials(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """New trials (rollout_id, profile, device_id, rank, sha256, threads, updated)."""
    if rows:
        conn.sa.execute(insert(candidate_trials), list(rows))


def cancel_gone(
    conn: Connection,
    rollout_id: str,
    trialing: str,
    open_states: Sequence[str],
    cancelled: str,
    why: str,
    ts: float,
) -> int:
    """Move the trials in `open_states` whose canary is removed or no longer in device state
    `trialing` in this rollout to `cancelled`; how many."""
    mine = select(dd.device_id).where(
        dd.deployment_id == rollout_id, dd.state == state_literal(trialing)
    )
    stmt = (
        update(candidate_trials)
        .where(
            t.rollout_id == rollout_id,
            any_state(t.state, open_states),
            (t.device_id.not_in(select(dv.id)) | t.device_id.not_in(mine)).self_group(),
        )
        .values(state=state_literal(cancelled), detail=why, updated=ts)
    )
    return int(conn.sa.execute(stmt).rowcount)


def expired(
    conn: Connection, rollout_id: str, busy: Sequence[str], ts: float
) -> list[tuple[str, int, str]]:
    """(device_id, rank, state) of a rollout's trials in `busy` whose deadline passed by `ts`."""
    rows = conn.sa.execute(
        select(t.device_id, t.rank, t.state).where(
            t.rollout_id == rollout_id, any_state(t.state, busy), t.deadline < ts
        )
    )
    return [(str(d), int(r), str(s)) for d, r, s in rows]


def busy_devices(conn: Connection, rollout_id: str, busy: Sequence[str]) -> set[str]:
    """Canaries of a rollout with a trial in one of the states `busy`."""
    rows = conn.sa.execute(
        select(t.device_id).distinct().where(t.rollout_id == rollout_id, any_state(t.state, busy))
    )
    return {str(d) for (d,) in rows}


def next_waiting(conn: Connection, rollout_id: str, waiting: str) -> list[tuple[str, int]]:
    """(device_id, lowest rank) of each canary's trials in state `waiting`."""
    rows = conn.sa.execute(
        select(t.device_id, func.min(t.rank))
        .where(t.rollout_id == rollout_id, t.state == state_literal(waiting))
        .group_by(t.device_id)
    )
    return [(str(d), int(r)) for d, r in rows]


def profiles(conn: Connection, rollout_id: str, not_in: Sequence[str] = ()) -> set[str]:
    """Profiles with trials in a rollout (only trials in none of the states `not_in`)."""
    query = select(t.profile).distinct().where(t.rollout_id == rollout_id)
    if not_in:
        query = query.where(t.state.not_in([state_literal(s) for s in not_in]))
    return {str(p) for (p,) in conn.sa.execute(query)}


def decided_profiles(conn: Connection, rollout_id: str) -> set[str]:
    """Profiles of a rollout with a stored decision."""
    c = candidate_decisions.c
    rows = conn.sa.execute(select(c.profile).where(c.rollout_id == rollout_id))
    return {str(p) for (p,) in rows}


def trial(conn: Connection, key: Trial) -> dict[str, Any]:
    """sha256, threads, attempts of one trial."""
    row = conn.sa.execute(select(t.sha256, t.threads, t.attempts).where(_trial(key))).one()
    return dict(row._mapping)


def trial_state(conn: Connection, key: Trial) -> str | None:
    """One trial's state, or None (no such trial)."""
    found = conn.sa.execute(select(t.state).where(_trial(key))).scalar()
    return None if found is None else str(found)


def set_trial(conn: Connection, key: Trial, **columns: Any) -> None:
    """Set columns of one trial other than its state (states change through `move_trial`)."""
    if "state" in columns:
        raise ValueError("a trial's state changes through move_trial")
    conn.sa.execute(update(candidate_trials).where(_trial(key)).values(**columns))


def move_trial(
    conn: Connection,
    key: Trial,
    to: str,
    sources: Sequence[str],
    ts: float,
    columns: Mapping[str, Any],
    *,
    retry: bool = False,
) -> bool:
    """Move one trial to state `to` if it is in one of `sources`, with extra columns; `retry`
    counts one attempt more. Whether it moved."""
    values: dict[str, Any] = {**columns, "state": state_literal(to), "updated": ts}
    if retry:
        values["attempts"] = t.attempts + 1
    stmt = update(candidate_trials).where(_trial(key), any_state(t.state, sources)).values(**values)
    return int(conn.sa.execute(stmt).rowcount) == 1


def trial_of_generation(
    conn: Connection, rollout_id: str, device_id: str, generation: int | None
) -> tuple[int, str] | None:
    """(rank, state) of the trial a canary runs at `generation`, or None (none given)."""
    if generation is None:
        return None
    row = conn.sa.execute(
        select(t.rank, t.state).where(
            t.rollout_id == rollout_id, t.device_id == device_id, t.generation == generation
        )
    ).first()
    return None if row is None else (int(row[0]), str(row[1]))


def cancel_open(
    conn: Connection,
    rollout_id: str,
    open_states: Sequence[str],
    cancelled: str,
    reason: str,
    ts: float,
) -> int:
    """Move every trial of a rollout in `open_states` to `cancelled`; how many."""
    stmt = (
        update(candidate_trials)
        .where(t.rollout_id == rollout_id, any_state(t.state, open_states))
        .values(state=state_literal(cancelled), detail=reason, updated=ts)
    )
    return int(conn.sa.execute(stmt).rowcount)


def trialed_candidates(
    conn: Connection, rollout_id: str, profile: str
) -> list[tuple[int, str, int | None, str | None, str | None]]:
    """(rank, sha256, threads, recipe, host JSON) of what a profile's trials ran, by rank; the
    registry adds the recipe and host numbers when it still has the candidate."""
    c = model_candidates.c
    model_id = select(deployments.c.model_id).where(deployments.c.id == rollout_id)
    rows = conn.sa.execute(
        select(t.rank, t.sha256, t.threads, c.recipe, c.host)
        .distinct()
        .select_from(
            candidate_trials.outerjoin(
                model_candidates,
                and_(c.model_id == model_id.scalar_subquery(), c.profile == t.profile,
                     c.rank == t.rank),
            )
        )
        .where(t.rollout_id == rollout_id, t.profile == profile)
        .order_by(t.rank)
    )  # fmt: skip
    return [(int(r), str(s), th, rc, h) for r, s, th, rc, h in rows]


def profile_trials(
    conn: Connection, rollout_id: str, profile: str
) -> list[tuple[str, int, str, str | None, Any]]:
    """(device_id, rank, state, result JSON, detail) of a profile's trials."""
    rows = conn.sa.execute(
        select(t.device_id, t.rank, t.state, t.result, t.detail)
        .where(t.rollout_id == rollout_id, t.profile == profile)
        .order_by(t.device_id, t.rank)
    )
    return [(str(d), int(r), str(s), res, det) for d, r, s, res, det in rows]


def add_decision(conn: Connection, row: dict[str, Any]) -> None:
    """A profile's decision (rollout_id, profile, winner_rank, sha256, threads,
    fallback_rank, explanation, decided)."""
    conn.sa.execute(insert(candidate_decisions).values(**row))


def members(
    conn: Connection, rollout_id: str, profile: str, states: Sequence[str]
) -> list[tuple[str, bool, bool]]:
    """(device_id, still registered, trialed) of a rollout's rows in `states` that belong to
    a profile: its devices, and its canaries even if since removed or re-profiled."""
    trialed = exists().where(t.rollout_id == dd.deployment_id, t.device_id == dd.device_id)
    trialed_here = exists().where(
        t.rollout_id == dd.deployment_id, t.device_id == dd.device_id, t.profile == profile
    )
    rows = conn.sa.execute(
        select(dd.device_id, dv.id.is_not(None), trialed)
        .select_from(deployment_devices.outerjoin(devices, dv.id == dd.device_id))
        .where(dd.deployment_id == rollout_id, any_state(dd.state, states),
               ((dv.profile == profile) | trialed_here).self_group())
    )  # fmt: skip
    return [(str(d), bool(e), bool(tr)) for d, e, tr in rows]


def decisions(conn: Connection, rollout_id: str) -> list[dict[str, Any]]:
    """A rollout's stored decisions, one per profile (explanation as JSON text)."""
    c = candidate_decisions.c
    return dicts(
        conn,
        select(c.profile, c.winner_rank, c.sha256, c.threads, c.fallback_rank, c.explanation,
               c.decided).where(c.rollout_id == rollout_id).order_by(c.profile),
    )  # fmt: skip


def trials(conn: Connection, rollout_id: str) -> list[dict[str, Any]]:
    """Every trial of a rollout (result as JSON text)."""
    return dicts(
        conn,
        select(t.profile, t.device_id, t.rank, t.sha256, t.threads, t.state, t.generation,
               t.detail, t.outlier, t.result)
        .where(t.rollout_id == rollout_id)
        .order_by(t.profile, t.device_id, t.rank),
    )  # fmt: skip

"""Guarded state changes of rollout devices and rollouts (controller/fleet/rollout/states.py
keeps the transition tables; these are the statements that apply them).

Each UPDATE names the legal source states in its WHERE, so a row in any other state is left
as it is and the caller sees it in the row count. Statements are compiled once per target,
source set, scope and column set (the engine's hot path).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, bindparam, literal_column, or_, select, update

from controller.storage.db import Connection
from controller.storage.queries import Prepared
from controller.storage.tables import candidate_trials, deployment_devices, deployments

dd = deployment_devices.c


def state_literal(state: str) -> ColumnElement[Any]:
    """A state as an SQL literal: states are fixed identifiers (enum values), never input."""
    if not state.replace("_", "").isalnum():
        raise ValueError(f"not a state: {state!r}")
    return literal_column(f"'{state}'")


def any_state(column: Any, states: Sequence[str]) -> ColumnElement[bool]:
    """`(state = 'a' OR state = 'b')`, values inlined.

    SQLite evaluates a literal `IN` list on an unindexed column through a temporary table built
    on every execution; plain comparisons cost a fraction of that on the engine's hot path.
    """
    return or_(*(column == state_literal(s) for s in states)).self_group()


# The scopes a bulk state change may take: which deployment_devices rows, by bound parameters.
_SCOPES: dict[str, Callable[[], ColumnElement[bool]]] = {
    "device": lambda: dd.device_id == bindparam("device_id"),
    "device_elsewhere": lambda: (dd.device_id == bindparam("device_id"))
    & (dd.deployment_id != bindparam("rollout_id")),
    "row": lambda: (dd.deployment_id == bindparam("rollout_id"))
    & (dd.device_id == bindparam("device_id")),
    "deadline_before": lambda: dd.deadline < bindparam("before"),
    "device_generation": lambda: (dd.device_id == bindparam("device_id"))
    & (dd.generation == bindparam("generation")),
    "untried": lambda: (dd.deployment_id == bindparam("rollout_id"))
    & dd.device_id.not_in(
        select(candidate_trials.c.device_id).where(
            candidate_trials.c.rollout_id == bindparam("rollout_id"),
            candidate_trials.c.state != bindparam("trial_waiting"),
        )
    ),
}


@dataclass(frozen=True)
class Scope:
    """Which rows a bulk state change touches: a named WHERE and its parameters (a list of
    parameter sets runs the statement once per set, in one executemany)."""

    name: str
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]] = field(default_factory=dict)


def of_device(device_id: str) -> Scope:
    """Every row of one device."""
    return Scope("device", {"device_id": device_id})


def one_row(rollout_id: str, device_id: str) -> Scope:
    """The row of one device in one rollout."""
    return Scope("row", {"rollout_id": rollout_id, "device_id": device_id})


def of_device_elsewhere(device_id: str, rollout_id: str) -> Scope:
    """A device's rows in rollouts other than `rollout_id`."""
    return Scope("device_elsewhere", {"device_id": device_id, "rollout_id": rollout_id})


def deadline_before(ts: float) -> Scope:
    """Rows whose deadline passed by `ts`."""
    return Scope("deadline_before", {"before": ts})


def device_generations(pairs: Sequence[tuple[str, int]]) -> Scope:
    """The rows of each (device, generation)."""
    return Scope("device_generation", [{"device_id": d, "generation": g} for d, g in pairs])


def untried_in(rollout_id: str, trial_waiting: str) -> Scope:
    """A rollout's rows whose device never started a candidate trial (every trial of it still
    in trial state `trial_waiting`)."""
    return Scope("untried", {"rollout_id": rollout_id, "trial_waiting": trial_waiting})


@functools.lru_cache(maxsize=512)
def _move_one(to: str, sources: tuple[str, ...], columns: tuple[str, ...]) -> Prepared:
    """UPDATE one row (rollout, device) to `to` if it is in one of `sources`."""
    values: dict[str, Any] = {"state": state_literal(to), "updated": bindparam("ts")}
    values |= {c: bindparam(f"v_{c}") for c in columns}
    stmt = (
        update(deployment_devices)
        .where(
            dd.deployment_id == bindparam("rollout_id"),
            dd.device_id == bindparam("device_id"),
            any_state(dd.state, sources),
        )
        .values(values)
    )
    return Prepared(lambda dialect: stmt)


def move_device(
    conn: Connection,
    key: tuple[str, str],
    to: str,
    sources: Sequence[str],
    ts: float,
    columns: Mapping[str, Any],
) -> int:
    """Move row (rollout id, device id) to `to` with `columns` if its state is one of
    `sources`; the number of rows changed (0 or 1)."""
    stmt = _move_one(to, tuple(sources), tuple(columns))
    params = {"rollout_id": key[0], "device_id": key[1], "ts": ts}
    params |= {f"v_{c}": v for c, v in columns.items()}
    return int(stmt.execute(conn, params).rowcount)


def device_state(conn: Connection, key: tuple[str, str]) -> str | None:
    """The state of row (rollout id, device id), or None."""
    found = conn.sa.execute(
        select(dd.state).where(dd.deployment_id == key[0], dd.device_id == key[1])
    ).scalar()
    return None if found is None else str(found)


@functools.lru_cache(maxsize=256)
def _move_scope(to: str, sources: tuple[str, ...], scope: str, detail: bool) -> Prepared:
    """UPDATE every row of `scope` in one of `sources` to `to` (and a detail)."""
    values: dict[str, Any] = {"state": state_literal(to), "updated": bindparam("ts")}
    if detail:
        values["detail"] = bindparam("detail")
    stmt = (
        update(deployment_devices)
        .where(any_state(dd.state, sources), _SCOPES[scope]().self_group())
        .values(values)
    )
    return Prepared(lambda dialect: stmt)


def move_devices(
    conn: Connection, to: str, sources: Sequence[str], scope: Scope, ts: float,
    detail: str | None,
) -> int:  # fmt: skip
    """Move every row of `scope` in one of `sources` to `to`; how many changed."""
    stmt = _move_scope(to, tuple(sources), scope.name, detail is not None)
    head: dict[str, Any] = {"ts": ts} | ({"detail": detail} if detail is not None else {})
    if isinstance(scope.params, Mapping):
        return int(stmt.execute(conn, head | dict(scope.params)).rowcount)
    rows = [head | dict(p) for p in scope.params]
    if not rows:
        return 0
    return stmt.executemany_count(conn, rows)


@functools.lru_cache(maxsize=128)
def _move_rollout(to: str, sources: tuple[str, ...], columns: tuple[str, ...]) -> Prepared:
    """UPDATE a rollout to `to` (with columns) if it is in one of `sources`."""
    values: dict[str, Any] = {"state": state_literal(to), "updated": bindparam("ts")}
    values |= {c: bindparam(f"v_{c}") for c in columns}
    stmt = (
        update(deployments)
        .where(deployments.c.id == bindparam("rollout_id"),
               any_state(deployments.c.state, sources))
        .values(values)
    )  # fmt: skip
    return Prepared(lambda dialect: stmt)


def move_rollout(
    conn: Connection, rollout_id: str, to: str, sources: Sequence[str], ts: float,
    columns: Mapping[str, Any],
) -> int:  # fmt: skip
    """Move a rollout to `to` with `columns` if its state is one of `sources`; rows changed."""
    stmt = _move_rollout(to, tuple(sorted(sources)), tuple(columns))
    params = {"rollout_id": rollout_id, "ts": ts} | {f"v_{c}": v for c, v in columns.items()}
    return int(stmt.execute(conn, params).rowcount)


def rollout_state(conn: Connection, rollout_id: str) -> str | None:
    """A rollout's state, or None."""
    found = conn.sa.execute(
        select(deployments.c.state).where(deployments.c.id == rollout_id)
    ).scalar()
    return None if found is None else str(found)

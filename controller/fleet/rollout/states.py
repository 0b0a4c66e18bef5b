"""Rollout state machines as tables: device rows and rollouts, and the only writers of their state.

Every change of `deployment_devices.state` goes through `move` (one row) or `move_all` (a set
of rows chosen by their current state); every change of `deployments.state` through
`move_rollout`. Each checks the edge against its table and raises `IllegalTransition` naming
from and to, so a new code path cannot invent an edge silently. The persisted values are the
enum values (plain strings), unchanged from before the tables existed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import Enum
from typing import Any, NoReturn

from controller.errors import FleetError
from controller.storage.db import Connection
from controller.storage.queries import rollout_states as q
from controller.storage.queries.rollout_states import Scope


class DeviceState(str, Enum):
    """State of one device within one rollout (`deployment_devices.state`)."""

    WAITING = "waiting"  # its wave has not started (or a canary back from its trials)
    BASELINING = "baselining"  # measuring the current model first (regression gates)
    TRIALING = "trialing"  # a canary measuring candidates in the selection phase
    PENDING = "pending"  # desired state written, not published yet
    IN_PROGRESS = "in_progress"  # desired state published to the broker
    ACTIVATED = "activated"  # the agent committed the model; its benchmark is due
    RETRYING = "retrying"  # the next tick writes a new generation for the same artifact
    SUCCEEDED = "succeeded"  # benchmark within every gate
    OUTLIER = "outlier"  # broke a gate, but the device's conditions explain it: kept
    FAILED = "failed"  # agent error, or timed out with no retries left
    GATE_FAILED = "gate_failed"  # benchmark broke a gate: pointed back at once
    CANCELLED = "cancelled"  # never started: the rollout ended first
    ROLLING_BACK = "rolling_back"  # pointed back at its previous model after abort/rollback
    ROLLED_BACK = "rolled_back"  # back on its previous model
    ROLLBACK_FAILED = "rollback_failed"  # the rollback errored or timed out
    SUPERSEDED = "superseded"  # a newer deployment or rollout took the device
    SKIPPED = "skipped"  # no artifact for its profile, or no candidate passed

    def __str__(self) -> str:
        """The persisted value (so f-strings and logs show `in_progress`, not the member)."""
        return self.value


D = DeviceState

# States a device row is created in (the INSERT of `Rollouts.create`).
INITIAL: frozenset[DeviceState] = frozenset({D.WAITING, D.SKIPPED})

# (from, to, when): every edge a device row may take; anything else raises IllegalTransition.
TRANSITIONS: tuple[tuple[DeviceState, DeviceState, str], ...] = (
    (D.WAITING, D.BASELINING, "wave starts, regression gates need a baseline"),
    (D.WAITING, D.PENDING, "wave starts"),
    (D.WAITING, D.TRIALING, "chosen as a canary for the candidates"),
    (D.WAITING, D.WAITING, "selection decided: the winner's artifact"),
    (D.WAITING, D.SKIPPED, "no candidate passed on its profile"),
    (D.WAITING, D.CANCELLED, "rollout ended before its wave"),
    (D.WAITING, D.ROLLING_BACK, "rollout ended; a former canary goes back"),
    (D.WAITING, D.SUPERSEDED, "a newer rollout took the device"),
    (D.BASELINING, D.PENDING, "baseline measured, or waited long enough"),
    (D.BASELINING, D.CANCELLED, "rollout ended"),
    (D.BASELINING, D.SUPERSEDED, "a newer rollout took the device"),
    (D.TRIALING, D.WAITING, "selection decided: joins wave 0"),
    (D.TRIALING, D.SKIPPED, "no candidate passed, or the device was removed"),
    (D.TRIALING, D.CANCELLED, "rollout ended before its first trial"),
    (D.TRIALING, D.ROLLING_BACK, "no candidate passed, or rollout ended: goes back"),
    (D.TRIALING, D.SUPERSEDED, "a newer rollout took the device"),
    (D.PENDING, D.IN_PROGRESS, "desired state published"),
    (D.PENDING, D.ACTIVATED, "agent reports active"),
    (D.PENDING, D.SUCCEEDED, "benchmark within the gates"),
    (D.PENDING, D.OUTLIER, "gate broken, explained by the device"),
    (D.PENDING, D.GATE_FAILED, "gate broken"),
    (D.PENDING, D.RETRYING, "transport error or timeout, retries left"),
    (D.PENDING, D.FAILED, "error, or timeout with no retries left"),
    (D.PENDING, D.ROLLING_BACK, "rollout ended"),
    (D.PENDING, D.SUPERSEDED, "a newer rollout took the device"),
    (D.IN_PROGRESS, D.ACTIVATED, "agent reports active"),
    (D.IN_PROGRESS, D.SUCCEEDED, "benchmark within the gates"),
    (D.IN_PROGRESS, D.OUTLIER, "gate broken, explained by the device"),
    (D.IN_PROGRESS, D.GATE_FAILED, "gate broken"),
    (D.IN_PROGRESS, D.RETRYING, "transport error or timeout, retries left"),
    (D.IN_PROGRESS, D.FAILED, "error, or timeout with no retries left"),
    (D.IN_PROGRESS, D.ROLLING_BACK, "rollout ended"),
    (D.IN_PROGRESS, D.SUPERSEDED, "a newer rollout took the device"),
    (D.ACTIVATED, D.ACTIVATED, "activation reported again"),
    (D.ACTIVATED, D.SUCCEEDED, "benchmark within the gates"),
    (D.ACTIVATED, D.OUTLIER, "gate broken, explained by the device"),
    (D.ACTIVATED, D.GATE_FAILED, "gate broken"),
    (D.ACTIVATED, D.RETRYING, "transport error or timeout, retries left"),
    (D.ACTIVATED, D.FAILED, "error after commit, or timeout with no retries left"),
    (D.ACTIVATED, D.ROLLING_BACK, "rollout ended"),
    (D.ACTIVATED, D.SUPERSEDED, "a newer rollout took the device"),
    (D.RETRYING, D.PENDING, "next tick: new generation"),
    (D.RETRYING, D.ROLLING_BACK, "rollout ended"),
    (D.RETRYING, D.SUPERSEDED, "a newer rollout took the device"),
    (D.SUCCEEDED, D.ROLLING_BACK, "rollout aborted or rolled back"),
    (D.SUCCEEDED, D.SUPERSEDED, "rollback, but a newer rollout owns the device"),
    (D.OUTLIER, D.ROLLING_BACK, "rollout aborted or rolled back"),
    (D.OUTLIER, D.SUPERSEDED, "rollback, but a newer rollout owns the device"),
    (D.ROLLING_BACK, D.ROLLED_BACK, "agent reports its previous model active (or idle)"),
    (D.ROLLING_BACK, D.ROLLBACK_FAILED, "agent error, or rollback timed out"),
    (D.ROLLING_BACK, D.SUPERSEDED, "a newer rollout took the device"),
)
EDGES: frozenset[tuple[DeviceState, DeviceState]] = frozenset((f, t) for f, t, _ in TRANSITIONS)

# A device in one of these no longer holds its wave back.
DONE: frozenset[DeviceState] = frozenset(
    {
        D.SUCCEEDED, D.FAILED, D.GATE_FAILED, D.SKIPPED, D.SUPERSEDED, D.CANCELLED,
        D.ROLLED_BACK, D.ROLLBACK_FAILED, D.ROLLING_BACK, D.OUTLIER,
    }
)  # fmt: skip
# States that count as executed for the failure threshold, and which of them failed.
EXECUTED: frozenset[DeviceState] = frozenset({D.SUCCEEDED, D.FAILED, D.GATE_FAILED})
FAILED: frozenset[DeviceState] = frozenset({D.FAILED, D.GATE_FAILED})
# The desired state of these devices points at the rollout's artifact.
IN_FLIGHT: tuple[DeviceState, ...] = (D.PENDING, D.IN_PROGRESS, D.ACTIVATED, D.RETRYING)
# States a device event moves on (an event in any other state changes nothing).
UPDATING: tuple[DeviceState, ...] = (D.PENDING, D.IN_PROGRESS, D.ACTIVATED)
# States with no edge out: the device's part in the rollout is over for good.
TERMINAL: frozenset[DeviceState] = frozenset(DeviceState) - {f for f, _ in EDGES}


class RolloutState(str, Enum):
    """State of a whole rollout or deployment (`deployments.state`)."""

    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"

    def __str__(self) -> str:
        """The persisted value."""
        return self.value


R = RolloutState

# (from, to, when): every edge a rollout may take.
ROLLOUT_TRANSITIONS: tuple[tuple[RolloutState, RolloutState, str], ...] = (
    (R.RUNNING, R.PAUSED, "operator: pause"),
    (R.PAUSED, R.RUNNING, "operator: resume"),
    (R.RUNNING, R.COMPLETED, "every wave done"),
    (R.RUNNING, R.ABORTED, "failure threshold passed, or operator: abort"),
    (R.PAUSED, R.ABORTED, "failure threshold passed, or operator: abort"),
    (R.RUNNING, R.ROLLED_BACK, "operator: rollback"),
    (R.PAUSED, R.ROLLED_BACK, "operator: rollback"),
    (R.COMPLETED, R.ROLLED_BACK, "operator: rollback"),
    (R.ABORTED, R.ROLLED_BACK, "operator: rollback"),
)
ROLLOUT_EDGES: frozenset[tuple[RolloutState, RolloutState]] = frozenset(
    (f, t) for f, t, _ in ROLLOUT_TRANSITIONS
)
# Rollouts the reconcile loop looks at.
ACTIVE: tuple[RolloutState, ...] = (R.RUNNING, R.PAUSED)


class IllegalTransition(FleetError):
    """A state change that its table does not allow (a bug in the caller, not bad input)."""


@functools.cache
def check(frm: DeviceState | str, to: DeviceState | str) -> None:
    """Raise IllegalTransition unless `frm → to` is a row of TRANSITIONS."""
    if (frm, to) not in EDGES:  # str values compare and hash like their members
        raise IllegalTransition(f"illegal rollout device transition {frm} → {to}")


def check_rollout(frm: RolloutState | str, to: RolloutState | str) -> None:
    """Raise IllegalTransition unless `frm → to` is a row of ROLLOUT_TRANSITIONS."""
    if (frm, to) not in ROLLOUT_EDGES:
        raise IllegalTransition(f"illegal rollout transition {frm} → {to}")


def refused(
    what: str, state: str | None, to: str, check_edge: Callable[[str, str], None]
) -> NoReturn:
    """Explain a guarded UPDATE that changed no row of `what` (a device row, a rollout, a
    trial): it does not exist, or `state → to` is not an edge (check_edge raises); always
    raises."""
    if state is None:
        raise IllegalTransition(f"no {what} to move to {to}")
    check_edge(state, to)  # raises: the UPDATE only skips illegal edges
    raise IllegalTransition(f"{what}: {state} → {to} lost")


def sources(to: DeviceState) -> frozenset[DeviceState]:
    """Every state with an edge into `to`."""
    return _SOURCES[to]


_SOURCES: dict[DeviceState, frozenset[DeviceState]] = {
    to: frozenset(f for f, t in EDGES if t is to) for to in DeviceState
}


@functools.cache
def _check_all(to: DeviceState, frm: tuple[DeviceState, ...] | frozenset[DeviceState]) -> None:
    """Every `frm → to` edge is a row of TRANSITIONS (cached: the tables never change at run
    time, so an edge checked once stays legal)."""
    for f in frm:
        check(f, to)


@functools.cache
def _source_values(to: DeviceState) -> tuple[str, ...]:
    """The legal source states of `to`, sorted (one statement per target; cached like
    `_check_all`: every event moves a row)."""
    return tuple(sorted(s.value for s in sources(to)))


def move(
    tx: Connection,
    key: tuple[str, str],
    to: DeviceState,
    *,
    ts: float,
    detail: str | None = None,
    **columns: Any,
) -> None:
    """Move one device row (rollout id, device id) to `to`, with `detail` and extra columns.

    The edge is checked in the same statement (only a legal predecessor is updated); when no
    row changed, the row's actual state names the illegal edge.
    """
    if detail is not None:
        columns = {"detail": detail[:2000], **columns}
    if q.move_device(tx, key, to.value, _source_values(to), ts, columns):
        return
    refused(f"device {key[1]!r} in rollout {key[0]!r}", q.device_state(tx, key), to, check)


def move_all(
    tx: Connection,
    to: DeviceState,
    frm: tuple[DeviceState, ...] | frozenset[DeviceState],
    scope: Scope,
    *,
    ts: float,
    detail: str | None = None,
) -> int:
    """Move every row of `scope` (storage.queries.rollout_states: of_device, …) in one of the
    `frm` states to `to`; return how many. Every `frm → to` edge is checked first."""
    _check_all(to, frm)
    ordered = frm if isinstance(frm, tuple) else tuple(sorted(frm, key=lambda s: s.value))
    states = tuple(s.value for s in ordered)
    return q.move_devices(tx, to.value, states, scope, ts, detail[:2000] if detail else detail)


def move_rollout(
    tx: Connection, rollout_id: str, to: RolloutState, *, ts: float, **columns: Any
) -> None:
    """Move a rollout to `to` (with extra columns such as `reason`) if its table allows it."""
    allowed = tuple(f.value for f, t in ROLLOUT_EDGES if t is to)
    if q.move_rollout(tx, rollout_id, to.value, allowed, ts, columns):
        return
    refused(f"rollout {rollout_id!r}", q.rollout_state(tx, rollout_id), to, check_rollout)

"""Candidate trial states as a table, and the only writers of `candidate_trials.state`.

Same shape as states.py: every change of a trial's state goes through `move_trial` (one trial)
or `cancel_trials` (a rollout's open trials, chosen by their current state), each checking the
edge against TRIAL_TRANSITIONS and raising `IllegalTransition` naming from and to. The values
are the strings stored before the table existed, so no data changes.

A retried trial is the same trial again, not a new row: an edge back to `waiting` counted in
`attempts`, under a new generation when it starts again (docs/closed-loop.md, "Retries").
"""

from __future__ import annotations

import functools
from enum import StrEnum
from typing import Any

from controller.fleet.rollout.states import IllegalTransition, refused
from controller.storage.db import Connection
from controller.storage.queries import selection as sq
from controller.storage.queries.selection import Trial


class TrialState(StrEnum):
    """State of one candidate on one canary (`candidate_trials.state`)."""

    WAITING = "waiting"  # not started yet, or queued again after a retriable failure
    RUNNING = "running"  # the canary is pointed at the candidate
    ACTIVATED = "activated"  # the agent committed the candidate; its benchmark is due
    MEASURED = "measured"  # benchmark received
    FAILED = "failed"  # a final error, or a failure/timeout with no retries left
    CANCELLED = "cancelled"  # the rollout ended, or the canary left the selection


T = TrialState

# The state a trial row is created in (the column default of `candidate_trials.state`).
INITIAL = T.WAITING

# Why an event may reach a `waiting` trial: a retried trial keeps the generation of its last
# attempt until it starts again (next tick), and an event of that generation still applies.
_LATE = "late event of the previous attempt"

# (from, to, when): every edge a trial may take; anything else raises IllegalTransition.
TRIAL_TRANSITIONS: tuple[tuple[TrialState, TrialState, str], ...] = (
    (T.WAITING, T.RUNNING, "the canary is idle: pointed at the candidate, new generation"),
    (T.WAITING, T.WAITING, f"retry again: {_LATE}, a retriable error"),
    (T.WAITING, T.ACTIVATED, f"{_LATE}: agent reports active"),
    (T.WAITING, T.MEASURED, f"{_LATE}: benchmark"),
    (T.WAITING, T.FAILED, f"{_LATE}: a final error, or no retries left"),
    (T.WAITING, T.CANCELLED, "rollout ended, or the canary left the selection"),
    (T.RUNNING, T.ACTIVATED, "agent reports active"),
    (T.RUNNING, T.WAITING, "retry: transport error or timeout, retries left"),
    (T.RUNNING, T.MEASURED, "benchmark"),
    (T.RUNNING, T.FAILED, "self-test verdict, or error or timeout with no retries left"),
    (T.RUNNING, T.CANCELLED, "rollout ended, or the canary left the selection"),
    (T.ACTIVATED, T.ACTIVATED, "activation reported again"),
    (T.ACTIVATED, T.WAITING, "retry: transport error or timeout, retries left"),
    (T.ACTIVATED, T.MEASURED, "benchmark"),
    (T.ACTIVATED, T.FAILED, "error after commit, or timeout with no retries left"),
    (T.ACTIVATED, T.CANCELLED, "rollout ended, or the canary left the selection"),
)
TRIAL_EDGES: frozenset[tuple[TrialState, TrialState]] = frozenset(
    (f, t) for f, t, _ in TRIAL_TRANSITIONS
)

# States with no edge out: the trial has ended (a profile is decided once all its trials are).
DONE: frozenset[TrialState] = frozenset(TrialState) - {f for f, _ in TRIAL_EDGES}
# A trial not yet ended.
OPEN: frozenset[TrialState] = frozenset(TrialState) - DONE
# A trial on its canary now (the canary starts no other; its deadline runs).
BUSY: frozenset[TrialState] = frozenset({T.RUNNING, T.ACTIVATED})


def check_trial(frm: TrialState | str, to: TrialState | str) -> None:
    """Raise IllegalTransition unless `frm → to` is a row of TRIAL_TRANSITIONS."""
    if (frm, to) not in TRIAL_EDGES:  # str values compare and hash like their members
        raise IllegalTransition(f"illegal candidate trial transition {frm} → {to}")


def values(states: frozenset[TrialState]) -> tuple[str, ...]:
    """The stored values of `states`, sorted (one statement shape per set)."""
    return tuple(sorted(s.value for s in states))


@functools.cache
def _source_values(to: TrialState) -> tuple[str, ...]:
    """The legal source states of `to`, sorted."""
    return values(frozenset(f for f, t in TRIAL_EDGES if t is to))


def move_trial(
    tx: Connection,
    key: Trial,
    to: TrialState,
    *,
    ts: float,
    retry: bool = False,
    **columns: Any,
) -> None:
    """Move one trial (rollout id, device id, rank) to `to` with extra columns; `retry` counts
    one attempt more. The edge is checked in the UPDATE itself (only a legal predecessor is
    updated); when no row changed, the trial's actual state names the illegal edge."""
    if retry and to is not T.WAITING:
        raise IllegalTransition(f"a retry queues the trial again (waiting), not {to}")
    if sq.move_trial(tx, key, to.value, _source_values(to), ts, columns, retry=retry):
        return
    refused(f"candidate trial {key!r}", sq.trial_state(tx, key), to, check_trial)


def cancel_trials(
    tx: Connection, rollout_id: str, why: str, ts: float, *, gone_from: str | None = None
) -> int:
    """Cancel a rollout's open trials; with `gone_from` (a device state, `trialing`) only those
    whose canary is removed or no longer in that state. Returns how many."""
    for frm in OPEN:
        check_trial(frm, T.CANCELLED)
    if gone_from is None:
        return sq.cancel_open(tx, rollout_id, values(OPEN), T.CANCELLED.value, why, ts)
    return sq.cancel_gone(tx, rollout_id, gone_from, values(OPEN), T.CANCELLED.value, why, ts)

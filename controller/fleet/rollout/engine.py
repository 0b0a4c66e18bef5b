"""Rollout engine: waves, per-device timeouts and retries, gates, abort and rollback.

All state lives in the database (deployments + deployment_devices), so a controller restart
loses nothing: `tick()` is idempotent and is called by the service's reconcile loop. Events
from devices are applied at ingest (`on_event`, inside Fleet.record_event's transaction).

The device and rollout states, and every edge between them, are the tables in states.py; the
conditions that abort a rollout or advance its wave are the evaluators in evaluators.py. The
engine is split by concern: waves.py (per-device steps), events.py (device events and gates),
control.py (operator actions and status); `Rollouts` composes them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from controller.fleet.rollout.control import Control
from controller.fleet.rollout.evaluators import Counts, may_advance, should_abort
from controller.fleet.rollout.events import DeviceEvents
from controller.fleet.rollout.policy import Policy, PolicyError, Threshold, Wave
from controller.fleet.rollout.selection import Selection
from controller.fleet.rollout.states import (
    ACTIVE,
    DeviceState,
    RolloutState,
    move_all,
    move_rollout,
)
from controller.storage.db import Connection, now, to_json
from controller.storage.queries import rollout_states as scopes
from controller.storage.queries import rollouts as rq

if TYPE_CHECKING:
    from controller.fleet.registry import Fleet

log = logging.getLogger(__name__)

D, R = DeviceState, RolloutState


class Rollouts(DeviceEvents, Control):
    """Creates and drives rollouts; every method is one or a few short transactions."""

    def __init__(self, fleet: Fleet, clock: Callable[[], float] = now) -> None:
        """Work on `fleet`'s database; read time only through `clock` (tests pass a fake)."""
        self.fleet = fleet
        self.db = fleet.db
        self.clock = clock
        self.selection = Selection(self)
        # Which replica drives (recorded with each wave it starts); `edgefleet up --replica`.
        self.driver = ""

    # ------------------------------------------------------------------ creation
    def create(
        self,
        *,
        kind: str,
        model_id: int,
        target: str,
        policy: Policy,
        assignments: list[tuple[str, str | None, str]],
    ) -> str:
        """Persist a rollout over (device, artifact sha or None, reason) and start wave 0."""
        if not assignments:
            raise PolicyError(f"no device matches {target!r}")
        rollout_id = f"{'ro' if kind == 'rollout' else 'dep'}-{uuid.uuid4().hex[:12]}"
        # A stable pseudo-random order spreads profiles and device ids over the waves.
        order = sorted(
            assignments,
            key=lambda a: hashlib.sha256(f"{rollout_id}/{a[0]}".encode()).hexdigest(),
        )
        # Cumulative and never shrinking, even for a mix like `5d,10` on a small fleet.
        bounds = list(itertools.accumulate((w.size(len(order)) for w in policy.waves), max))
        ts = self.clock()
        with self.db.transaction() as tx:
            rq.create_rollout(tx, {
                "id": rollout_id, "model_id": model_id, "target": target, "created": ts,
                "kind": kind, "policy": to_json(policy.to_json()), "state": R.RUNNING.value,
                "wave": 0, "updated": ts,
            })  # fmt: skip
            for position, (device_id, sha, reason) in enumerate(order):
                # The newest rollout owns the device: an older one must not start it later.
                move_all(
                    tx,
                    D.SUPERSEDED,
                    (D.WAITING, D.BASELINING, D.RETRYING),
                    scopes.of_device(device_id),
                    ts=ts,
                    detail=f"taken by {rollout_id}",
                )
                wave = next(i for i, b in enumerate(bounds) if position < b)
                rq.add_device(tx, {
                    "deployment_id": rollout_id, "device_id": device_id, "artifact_sha256": sha,
                    "state": (D.WAITING if sha else D.SKIPPED).value, "detail": reason,
                    "updated": ts, "position": position, "wave": wave,
                })  # fmt: skip
            if policy.candidates and self.selection.plan(tx, rollout_id, model_id, policy):
                # Candidates are measured on canaries first; wave 0 starts once all are decided.
                rq.set_phase(tx, rollout_id, "selecting")
            else:
                self._start_wave(tx, rollout_id, 0, policy)
        return rollout_id

    # ------------------------------------------------------------------ publication
    def start_deadlines(self, tx: Connection, published: list[tuple[str, int]]) -> None:
        """Start the device timeout of the rows whose desired state (device, generation) just
        went out: the download pacer grants a device its turn by publishing it, so a device
        queued behind `--max-fetching` waits for the controller, not against its timeout."""
        if not published:
            return
        ts = self.clock()
        owner = rq.desired_owners(tx, [device_id for device_id, _ in published])
        timeout: dict[str, float] = {}
        for rid in set(owner.values()):
            policy = rq.policy_text(tx, rid)
            if policy is not None:
                timeout[rid] = Policy.from_json(json.loads(policy)).device_timeout_s
        rows = [
            (ts + timeout[owner[d]], owner[d], d, generation)
            for d, generation in published
            if owner.get(d) in timeout
        ]
        if not rows:
            return
        # Only the first publication of a generation starts it (a broker reconnect republishes).
        rq.start_deadlines(tx, rows)

    # ------------------------------------------------------------------ reconcile
    def tick(self, fence: Callable[[Connection], bool] | None = None) -> list[str]:
        """Advance every running rollout one step; return what happened (for the log).

        `fence(tx)` (a replica's leader lease) is checked inside each rollout's transaction:
        once it says False, this replica stops driving before changing anything.
        """
        notes: list[str] = []
        for row in rq.rollouts_in(self.db.conn, [s.value for s in ACTIVE]):
            try:
                with self.db.transaction() as tx:
                    if fence is not None and not fence(tx):
                        notes.append("no longer the leader: stopped driving rollouts")
                        return notes
                    notes += self._tick_one(tx, row)
            except Exception as exc:  # one broken rollout must not stop the others or publishing
                log.exception("rollout %s: tick failed", row["id"])
                notes.append(f"{row['id']}: tick failed: {type(exc).__name__}: {exc}")
        with self.db.transaction() as tx:
            # Ended rollouts still owe a verdict on devices that are rolling back.
            ts = self.clock()
            expired = move_all(
                tx,
                D.ROLLBACK_FAILED,
                (D.ROLLING_BACK,),
                scopes.deadline_before(ts),
                ts=ts,
                detail="rollback timed out (device offline?)",
            )
        if expired:
            notes.append(f"{expired} rollback(s) timed out")
        return notes

    def _tick_one(self, tx: Connection, rollout: dict[str, Any]) -> list[str]:
        """Baselines, retries, timeouts, the failure threshold and wave advance of one rollout."""
        rid = rollout["id"]
        # Re-read inside the transaction: a CLI pause/abort may have landed since the query.
        current = rq.state_and_wave(tx, rid)
        if current is None or current[0] not in ACTIVE:
            return []
        running = current[0] == R.RUNNING
        policy = Policy.from_json(json.loads(rollout["policy"]))
        notes = self._drive_devices(tx, rid, policy, running)
        wave = int(current[1])
        # One read for both: the abort check counts the whole rollout, the advance its waves
        # so far; nothing changes the rows between the two unless candidates are selected.
        every, so_far = rq.counts_up_to(tx, rid, wave)
        abort = should_abort(Counts(every), policy)
        if abort.met:
            self._stop(tx, rid, R.ABORTED, abort.why, policy)
            return [*notes, f"{rid}: aborted: {abort.why}"]
        if not running:
            return notes
        if rq.phase(tx, rid) == "selecting":
            complete, selected = self.selection.tick(tx, rid, policy)
            notes += selected
            if not complete:
                return notes
            rq.set_phase(tx, rid, "waves")
            self._start_wave(tx, rid, 0, policy)
            notes.append(f"{rid}: candidates selected; wave 0 started")
            # The selection and wave 0 moved rows since the counts were read: read again.
            return notes + self._advance(tx, rid, wave, policy, None)
        return notes + self._advance(tx, rid, wave, policy, so_far)

    def _advance(
        self, tx: Connection, rid: str, wave: int, policy: Policy, counts: dict[str, int] | None
    ) -> list[str]:
        """Start the next wave(s) while the waves so far are done; complete after the last.

        `counts`: the rows per state of waves up to `wave`, if read since the last change."""
        notes: list[str] = []
        while True:  # several waves may be done at once (empty, skipped or superseded ones)
            if counts is None:
                counts = _counts(tx, rid, up_to_wave=wave)
            if not may_advance(Counts(counts), policy):
                return notes
            counts = None  # starting a wave moves its rows
            if wave + 1 >= len(policy.waves):
                break
            wave += 1
            self._start_wave(tx, rid, wave, policy)
            notes.append(f"{rid}: wave {wave} started")
        summary = _summary(_counts(tx, rid))
        move_rollout(tx, rid, R.COMPLETED, ts=self.clock(), reason=summary)
        return [*notes, f"{rid}: completed ({summary})"]


def _counts(tx: Connection, rollout_id: str, up_to_wave: int | None = None) -> dict[str, int]:
    """Devices per state in one rollout (or in its waves up to `up_to_wave`)."""
    return rq.counts(tx, rollout_id, up_to_wave)


def _summary(counts: dict[str, int]) -> str:
    """`3 succeeded, 1 failed`."""
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def deploy_policy(benchmark_runs: int = 50) -> Policy:
    """A direct deployment: everything at once, no gates, never aborts on failures."""
    return Policy(
        waves=(Wave(percent=100.0),),
        max_failures=Threshold(percent=100.0),
        min_executed=1,
        gates=(),
        device_timeout_s=24 * 3600.0,
        retries=0,
        benchmark_runs=benchmark_runs,
    )

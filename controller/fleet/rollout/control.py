"""Operator control of rollouts (pause, resume, abort, rollback) and reading their status.

A part of `Rollouts` (engine.py). Rollout states change only through `states.move_rollout`,
device states through `states.move` / `states.move_all`.
"""

from __future__ import annotations

import json
from typing import Any

from controller.fleet.rollout.outcome import rollout_outcome
from controller.fleet.rollout.policy import Policy, PolicyError
from controller.fleet.rollout.states import (
    DONE,
    FAILED,
    IN_FLIGHT,
    DeviceState,
    RolloutState,
    move,
    move_all,
    move_rollout,
)
from controller.fleet.rollout.trial_states import TrialState
from controller.fleet.rollout.waves import WaveSteps
from controller.storage.db import Connection
from controller.storage.queries import rollout_states as scopes
from controller.storage.queries import rollouts as rq

D, R = DeviceState, RolloutState

# Device rows an ending rollout looks at: points back, cancels or leaves to a newer rollout.
ENDING: tuple[DeviceState, ...] = (*IN_FLIGHT, D.SUCCEEDED, D.TRIALING, D.OUTLIER, D.WAITING)
# Of those, the states in which the device runs (or may run) the rollout's model.
COMMITTED: frozenset[DeviceState] = frozenset(
    {D.ACTIVATED, D.SUCCEEDED, D.TRIALING, D.OUTLIER, D.WAITING}
)


class Control(WaveSteps):
    """Operator actions and status of rollouts (a part of Rollouts)."""

    def pause(self, rollout_id: str) -> dict[str, Any]:
        """Start no new devices or waves; devices already updating finish."""
        return self._set_state(rollout_id, R.PAUSED, allowed=(R.RUNNING,))

    def resume(self, rollout_id: str) -> dict[str, Any]:
        """Continue a paused rollout."""
        return self._set_state(rollout_id, R.RUNNING, allowed=(R.PAUSED,))

    def abort(self, rollout_id: str, reason: str = "aborted by operator") -> dict[str, Any]:
        """Stop and roll back every device this rollout changed."""
        row = self._get(rollout_id)
        if row["state"] not in (R.RUNNING, R.PAUSED):
            raise PolicyError(
                f"rollout {rollout_id} is {row['state']}; only a running or paused "
                "rollout can be aborted (use `rollout rollback`)"
            )
        return self._end(row, R.ABORTED, reason)

    def rollback(self, rollout_id: str, reason: str = "rolled back by operator") -> dict[str, Any]:
        """Return every device of the rollout to its previous model, even after completion."""
        row = self._get(rollout_id)
        if row["state"] == R.ROLLED_BACK:
            raise PolicyError(f"rollout {rollout_id} is already rolled back")
        return self._end(row, R.ROLLED_BACK, reason)

    def _end(self, row: dict[str, Any], state: RolloutState, reason: str) -> dict[str, Any]:
        """Operator's abort or rollback of the rollout in `row`, in one transaction."""
        with self.db.transaction() as tx:
            if rq.state(tx, row["id"]) != row["state"]:
                raise PolicyError(f"rollout {row['id']} changed state meanwhile; try again")
            self._stop(tx, row["id"], state, reason, Policy.from_json(json.loads(row["policy"])))
        return self.status(row["id"])

    def _stop(
        self,
        tx: Connection,
        rollout_id: str,
        state: RolloutState,
        reason: str,
        policy: Policy,
    ) -> None:
        """End a rollout: cancel devices not started, roll back every one it changed."""
        ts = self.clock()
        move_rollout(tx, rollout_id, state, ts=ts, reason=reason)
        # A canary ran candidates: whatever its state, it goes back to what it ran before.
        trialed = rq.trial_started(tx, rollout_id, TrialState.WAITING.value)
        move_all(
            tx,
            D.CANCELLED,
            (D.WAITING, D.BASELINING),
            scopes.untried_in(rollout_id, TrialState.WAITING.value),
            ts=ts,
            detail=reason,
        )
        self.selection.cancel(tx, rollout_id, reason)
        rows = rq.devices_in(tx, rollout_id, [s.value for s in ENDING])
        for device_id, previous, was in rows:
            key = (rollout_id, device_id)
            if was in (D.TRIALING, D.WAITING) and not trialed.get(device_id):
                move(tx, key, D.CANCELLED, ts=ts, detail=reason)
                continue
            owner = rq.desired_owner(tx, device_id)
            if owner is None or owner[0] != rollout_id:
                # A newer deployment took the device since: rolling back would undo that one.
                move(tx, key, D.SUPERSEDED, ts=ts, detail="taken by a newer one")
                continue
            move(tx, key, D.ROLLING_BACK, ts=ts, detail=reason)
            self._roll_back_device(tx, key, previous, policy, committed=was in COMMITTED)

    def _set_state(
        self, rollout_id: str, state: RolloutState, *, allowed: tuple[RolloutState, ...]
    ) -> dict[str, Any]:
        """Operator's pause or resume: refused with the rollout's state unless it is `allowed`."""
        self._get(rollout_id)
        with self.db.transaction() as tx:
            # Checked and written in one transaction: the service may end the rollout meanwhile.
            current = rq.state(tx, rollout_id)
            if current not in allowed:
                raise PolicyError(f"rollout {rollout_id} is {current}, not {' or '.join(allowed)}")
            move_rollout(tx, rollout_id, state, ts=self.clock())
        return self.status(rollout_id)

    # ------------------------------------------------------------------ reading
    def _get(self, rollout_id: str) -> dict[str, Any]:
        """The deployments row, or PolicyError naming the id."""
        row = rq.rollout(self.db.conn, rollout_id)
        if row is None:
            raise PolicyError(
                f"unknown deployment or rollout {rollout_id!r} (see `edgefleet rollout status`)"
            )
        return row

    def status(self, rollout_id: str) -> dict[str, Any]:
        """A rollout with its policy, counts per state, per-wave progress and devices."""
        row = self._get(rollout_id)
        policy = Policy.from_json(json.loads(row["policy"]))
        devices = rq.device_rows(self.db.conn, rollout_id)
        for d in devices:
            d["result"] = json.loads(d["result"]) if d["result"] else None
        counts: dict[str, int] = {}
        for d in devices:
            counts[d["state"]] = counts.get(d["state"], 0) + 1
        waves = []
        for i, wave in enumerate(policy.waves):
            members = [d for d in devices if d["wave"] == i]
            waves.append(
                {
                    "wave": i,
                    "size": wave.label(),
                    "devices": len(members),
                    "done": sum(d["state"] in DONE for d in members),
                    "succeeded": sum(d["state"] == D.SUCCEEDED for d in members),
                    "failed": sum(d["state"] in FAILED for d in members),
                }
            )
        model = rq.model_name(self.db.conn, row["model_id"])
        return {
            "id": row["id"],
            "kind": row["kind"],
            "model": f"{model['name']}:{model['version']}" if model else None,
            "target": row["target"],
            "state": row["state"],
            "phase": row["phase"],
            "reason": row["reason"],
            "wave": row["wave"],
            "created": row["created"],
            "updated": row["updated"],
            "policy": policy.describe(),
            "counts": counts,
            "outcome": rollout_outcome(row["state"], counts),
            "waves": waves,
            "devices": devices,
            "trials": self.selection.trials(rollout_id) if policy.candidates else [],
            "decisions": self.selection.decisions(rollout_id) if policy.candidates else [],
        }

    def list(self) -> list[dict[str, Any]]:
        """Every rollout and deployment, newest first, with counts per device state."""
        rows = rq.all_rollouts(self.db.conn)
        counts = rq.counts_of_all(self.db.conn)  # one GROUP BY, not one query per rollout
        for r in rows:
            r["counts"] = counts.get(r["id"], {})
            r["outcome"] = rollout_outcome(r["state"], r["counts"])
        return rows

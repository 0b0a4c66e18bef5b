"""Wave steps of the rollout engine: start a wave, point devices, baselines, retries, timeouts.

`WaveSteps` is the base of the engine's parts (events.py, control.py; `Rollouts` in engine.py
composes them): it declares the state they share, so each part sees the others' helpers typed.
Every device state change goes through `states.move` / `states.move_all`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from controller.fleet.rollout.policy import Policy
from controller.fleet.rollout.states import (
    UPDATING,
    DeviceState,
    move,
    move_all,
)
from controller.storage.db import Connection, Database, to_json
from controller.storage.queries import rollout_states as scopes
from controller.storage.queries import waves as wq

if TYPE_CHECKING:
    from controller.fleet.registry import Fleet
    from controller.fleet.rollout.selection import Selection

D = DeviceState

# How long to wait for a baseline benchmark before starting a device without one.
BASELINE_WAIT_S = 120.0
# States in which a newer rollout takes the device over when it points the device.
TAKEABLE: frozenset[DeviceState] = frozenset(
    {D.WAITING, D.BASELINING, D.TRIALING, D.PENDING, D.IN_PROGRESS, D.ACTIVATED, D.RETRYING,
     D.ROLLING_BACK}
)  # fmt: skip

_UPDATING_VALUES = tuple(s.value for s in UPDATING)


class WaveSteps:
    """Per-device steps of a rollout, and the state every part of the engine shares."""

    fleet: Fleet
    db: Database
    clock: Callable[[], float]  # the engine's only source of time (tests pass a fake)
    driver: str
    selection: Selection

    def _start_wave(self, tx: Connection, rollout_id: str, wave: int, policy: Policy) -> None:
        """Give every waiting device of `wave` its desired state (or ask for a baseline first)."""
        ts = self.clock()
        # Once per wave: a second start (two drivers at once) fails on the primary key and
        # rolls its whole transaction back.
        wq.start_wave(tx, rollout_id, wave, ts, self.driver)
        # A canary ran candidates since the rollout started: what it ran before is its previous.
        for device_id, sha, current, canary in wq.waiting_in_wave(tx, rollout_id, wave, D.WAITING):
            baseline = latest_benchmark(tx, device_id, current) if current else None
            wq.set_device(
                tx,
                (rollout_id, device_id),
                previous_sha256=current,
                baseline=to_json(baseline) if baseline else None,
            )
            # A canary serves a candidate now: a benchmark command would not measure `current`.
            ask = policy.needs_baseline and current and baseline is None and current != sha
            if ask and not canary:
                self._ask_baseline(tx, rollout_id, device_id)
            else:
                self._assign(tx, rollout_id, device_id, sha, policy, D.PENDING)

    def _ask_baseline(self, tx: Connection, rollout_id: str, device_id: str) -> None:
        """Queue a benchmark of the device's current model, the baseline for regression gates."""
        command_id = f"cmd-{uuid.uuid4().hex[:12]}"
        ts = self.clock()
        wq.add_command(tx, command_id, device_id, "benchmark", runs=50, warmup=5, created=ts)
        move(
            tx,
            (rollout_id, device_id),
            D.BASELINING,
            ts=ts,
            detail=f"measuring the current model first ({command_id})",
            deadline=ts + BASELINE_WAIT_S,
        )

    def _assign(
        self,
        tx: Connection,
        rollout_id: str,
        device_id: str,
        sha: str | None,
        policy: Policy,
        state: DeviceState | None,
        detail: str = "",
    ) -> int:
        """Point the device's desired state at `sha` under a new generation; supersede others.

        `state` None keeps the row's state (a rollback of a row its caller just moved). The
        rollout's own artifact goes out with the row's runtime options (threads, fallback);
        anything else (a previous model on rollback, None) without them.
        """
        ts = self.clock()
        artifact, threads, fallback = wq.row_options(tx, (rollout_id, device_id))
        mine = sha is not None and sha == artifact
        generation = self.point_device(
            tx,
            rollout_id,
            device_id,
            sha,
            threads=threads if mine else None,
            fallback=json.loads(fallback) if mine and fallback else None,
        )
        # The device timeout starts when this desired state is published (the download pacer
        # may hold it back behind --max-fetching): Rollouts.start_deadlines, at publication.
        deadline = None
        if state is None:
            wq.set_device(
                tx,
                (rollout_id, device_id),
                generation=generation,
                deadline=deadline,
                updated=ts,
                detail=detail,
            )
        else:
            move(
                tx,
                (rollout_id, device_id),
                state,
                ts=ts,
                detail=detail,
                generation=generation,
                deadline=deadline,
            )
        return generation

    def point_device(
        self,
        tx: Connection,
        rollout_id: str,
        device_id: str,
        sha: str | None,
        *,
        threads: int | None,
        fallback: dict[str, Any] | None,
    ) -> int:
        """Write the desired state, take the device from older rollouts; return the generation."""
        ts = self.clock()
        generation = set_desired(
            tx, device_id, sha, rollout_id, threads=threads, fallback=fallback, ts=ts
        )
        move_all(
            tx,
            D.SUPERSEDED,
            TAKEABLE,
            scopes.of_device_elsewhere(device_id, rollout_id),
            ts=ts,
        )
        return generation

    def skip_device(
        self,
        tx: Connection,
        rollout_id: str,
        device_id: str,
        why: str,
        *,
        removed: bool = False,
    ) -> None:
        """Leave a device out (no candidate won for its profile); a canary goes back first."""
        key = (rollout_id, device_id)
        row = wq.skip_info(tx, key)
        if row[0] == D.TRIALING and not removed:
            policy = Policy.from_json(json.loads(row[2]))
            move(tx, key, D.ROLLING_BACK, ts=self.clock(), detail=why)
            self._roll_back_device(tx, key, row[1], policy, committed=True)
        else:
            move(tx, key, D.SKIPPED, ts=self.clock(), detail=why)

    def _roll_back_device(
        self,
        tx: Connection,
        key: tuple[str, str],
        previous: str | None,
        policy: Policy,
        *,
        committed: bool,
    ) -> None:
        """Point a device back at the model it ran before this rollout (same rollout id).

        The caller has moved the row already (failed, gate_failed, rolling_back); this keeps
        that state. `committed`: the device switched to the rollout's model (callers know it
        from the state the row had before they moved it).
        """
        rollout_id, device_id = key
        known = previous and wq.artifact_known(tx, previous)
        if previous and not known and not committed:
            # Not switched yet: cancel the update; the device keeps serving what it has.
            self._assign(tx, rollout_id, device_id, None, policy, None, "update cancelled")
            return
        if previous and not known:
            # The controller never had that file: the agent still has it as `previous`.
            command_id = f"cmd-{uuid.uuid4().hex[:12]}"
            wq.add_command(tx, command_id, device_id, "rollback", runs=1, warmup=0,
                           created=self.clock())  # fmt: skip
            return
        detail = wq.detail(tx, key)
        if not previous:
            detail = f"{detail}; no previous model to return to".lstrip("; ")
        self._assign(tx, rollout_id, device_id, previous, policy, None, detail)

    def _drive_devices(self, tx: Connection, rid: str, policy: Policy, running: bool) -> list[str]:
        """One tick of each device row: baselines in, retries out, timeouts judged."""
        ts = self.clock()
        notes: list[str] = []
        # Only rows that may change now: baselines and retries (while running), and updates
        # whose deadline passed. Rows of the fleet waiting, updating in time or done are not
        # read, so a tick costs what its changing rows cost, not the rollout's size.
        waiting = (D.BASELINING.value, D.RETRYING.value) if running else ()
        rows = wq.rows_to_drive(tx, rid, waiting, _UPDATING_VALUES, ts)
        for device_id, sha, state, attempts, deadline, previous in rows:
            key = (rid, device_id)
            if state == D.BASELINING and running:
                baseline = latest_benchmark(tx, device_id, previous, since=ts - BASELINE_WAIT_S)
                if baseline is not None or (deadline and ts > deadline):
                    detail = "" if baseline else "no baseline measured in time"
                    wq.set_device(tx, key, baseline=to_json(baseline) if baseline else None)
                    self._assign(tx, rid, device_id, sha, policy, D.PENDING, detail)
            elif state == D.RETRYING and running:
                wq.add_attempt(tx, key)
                prior = wq.detail(tx, key)
                self._assign(tx, rid, device_id, sha, policy, D.PENDING, prior)
                notes.append(f"{rid}: retry {attempts + 1} of {device_id}")
            elif state in UPDATING and deadline and ts > deadline:
                why = f"timed out after {policy.device_timeout_s:g} s in state {state}"
                if attempts < policy.retries:
                    move(tx, key, D.RETRYING, ts=ts, detail=f"attempt {attempts + 1}: {why}")
                else:
                    move(tx, key, D.FAILED, ts=ts, detail=why)
                    # An offline device must not install the artifact when it comes back.
                    self._roll_back_device(
                        tx, key, previous, policy, committed=state == D.ACTIVATED
                    )
                    notes.append(f"{rid}: {device_id} {why}")
        return notes


def set_desired(
    tx: Connection,
    device_id: str,
    sha: str | None,
    deployment_id: str,
    *,
    threads: int | None = None,
    fallback: dict[str, Any] | None = None,
    ts: float,
) -> int:
    """Write a device's desired state (with runtime options) under a newer generation."""
    # Monotonic even when the device row was recreated or the database is new: the agent
    # ignores generations <= the last one it applied, so never go back.
    previous = wq.last_generation(tx, device_id)
    generation = max((previous or 0) + 1, int(ts * 1000))
    wq.set_desired(
        tx, device_id, generation, sha, deployment_id, threads,
        to_json(fallback) if fallback else None,
    )  # fmt: skip
    return generation


def latest_benchmark(
    tx: Connection, device_id: str, sha: str | None, since: float = 0.0
) -> dict[str, Any] | None:
    """The newest benchmark report of `sha` on this device (received after `since`)."""
    if not sha:
        return None
    # `since` is compared with the controller's receive time, not the device's clock.
    report = wq.latest_benchmark(tx, device_id, sha, since)
    return json.loads(report) if report else None

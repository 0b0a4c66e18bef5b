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
        tx.execute(
            "UPDATE deployments SET wave = ?, updated = ? WHERE id = ?", (wave, ts, rollout_id)
        )
        # Once per wave: a second start (two drivers at once) fails on the primary key and
        # rolls its whole transaction back.
        devices = tx.execute(
            "SELECT COUNT(*) FROM deployment_devices WHERE deployment_id = ? AND wave = ?",
            (rollout_id, wave),
        ).fetchone()[0]
        tx.execute(
            "INSERT INTO rollout_waves (rollout_id, wave, started, driver, devices) "
            "VALUES (?, ?, ?, ?, ?)",
            (rollout_id, wave, ts, self.driver, devices),
        )
        # A canary ran candidates since the rollout started: what it ran before is its previous.
        rows = tx.execute(
            "SELECT dd.device_id, dd.artifact_sha256, CASE WHEN EXISTS (SELECT 1 FROM "
            "candidate_trials t WHERE t.rollout_id = dd.deployment_id AND t.device_id = "
            "dd.device_id) THEN dd.previous_sha256 ELSE d.model_sha256 END, EXISTS (SELECT 1 "
            "FROM candidate_trials t WHERE t.rollout_id = dd.deployment_id AND t.device_id = "
            "dd.device_id) FROM deployment_devices dd LEFT JOIN devices d ON d.id = dd.device_id "
            f"WHERE dd.deployment_id = ? AND dd.wave = ? AND dd.state = '{D.WAITING}'",
            (rollout_id, wave),
        ).fetchall()
        for device_id, sha, current, canary in rows:
            baseline = latest_benchmark(tx, device_id, current) if current else None
            tx.execute(
                "UPDATE deployment_devices SET previous_sha256 = ?, baseline = ? "
                "WHERE deployment_id = ? AND device_id = ?",
                (current, to_json(baseline) if baseline else None, rollout_id, device_id),
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
        tx.execute(
            "INSERT INTO commands (id, device_id, action, runs, warmup, created) "
            "VALUES (?, ?, 'benchmark', 50, 5, ?)",
            (command_id, device_id, ts),
        )
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
        artifact, threads, fallback = tx.execute(
            "SELECT artifact_sha256, threads, fallback FROM deployment_devices "
            "WHERE deployment_id = ? AND device_id = ?",
            (rollout_id, device_id),
        ).fetchone()
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
            tx.execute(
                "UPDATE deployment_devices SET generation = ?, deadline = ?, updated = ?, "
                "detail = ? WHERE deployment_id = ? AND device_id = ?",
                (generation, deadline, ts, detail, rollout_id, device_id),
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
        row = tx.execute(
            "SELECT dd.state, dd.previous_sha256, d.policy FROM deployment_devices dd "
            "JOIN deployments d ON d.id = dd.deployment_id "
            "WHERE dd.deployment_id = ? AND dd.device_id = ?",
            (rollout_id, device_id),
        ).fetchone()
        key = (rollout_id, device_id)
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
        known = (
            previous
            and tx.execute("SELECT 1 FROM artifacts WHERE sha256 = ?", (previous,)).fetchone()
        )
        if previous and not known and not committed:
            # Not switched yet: cancel the update; the device keeps serving what it has.
            self._assign(tx, rollout_id, device_id, None, policy, None, "update cancelled")
            return
        if previous and not known:
            # The controller never had that file: the agent still has it as `previous`.
            tx.execute(
                "INSERT INTO commands (id, device_id, action, runs, warmup, created) "
                "VALUES (?, ?, 'rollback', 1, 0, ?)",
                (f"cmd-{uuid.uuid4().hex[:12]}", device_id, self.clock()),
            )
            return
        detail = tx.execute(
            "SELECT detail FROM deployment_devices WHERE deployment_id = ? AND device_id = ?", key
        ).fetchone()[0]
        if not previous:
            detail = f"{detail}; no previous model to return to".lstrip("; ")
        self._assign(tx, rollout_id, device_id, previous, policy, None, detail)

    def _drive_devices(self, tx: Connection, rid: str, policy: Policy, running: bool) -> list[str]:
        """One tick of each device row: baselines in, retries out, timeouts judged."""
        ts = self.clock()
        notes: list[str] = []
        rows = tx.execute(
            "SELECT device_id, artifact_sha256, state, attempts, deadline, previous_sha256 "
            "FROM deployment_devices WHERE deployment_id = ?",
            (rid,),
        ).fetchall()
        for device_id, sha, state, attempts, deadline, previous in rows:
            key = (rid, device_id)
            if state == D.BASELINING and running:
                baseline = latest_benchmark(tx, device_id, previous, since=ts - BASELINE_WAIT_S)
                if baseline is not None or (deadline and ts > deadline):
                    detail = "" if baseline else "no baseline measured in time"
                    tx.execute(
                        "UPDATE deployment_devices SET baseline = ? "
                        "WHERE deployment_id = ? AND device_id = ?",
                        (to_json(baseline) if baseline else None, *key),
                    )
                    self._assign(tx, rid, device_id, sha, policy, D.PENDING, detail)
            elif state == D.RETRYING and running:
                tx.execute(
                    "UPDATE deployment_devices SET attempts = attempts + 1 "
                    "WHERE deployment_id = ? AND device_id = ?",
                    key,
                )
                prior = tx.execute(
                    "SELECT detail FROM deployment_devices WHERE deployment_id = ? "
                    "AND device_id = ?",
                    key,
                ).fetchone()[0]
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
    previous = tx.execute(
        "SELECT CASE WHEN desired_generation > reported_generation THEN desired_generation "
        "ELSE reported_generation END FROM devices WHERE id = ?",
        (device_id,),
    ).fetchone()
    generation = max((previous[0] if previous else 0) + 1, int(ts * 1000))
    tx.execute(
        "UPDATE devices SET desired_generation = ?, desired_sha256 = ?, "
        "desired_deployment_id = ?, desired_threads = ?, desired_fallback = ? WHERE id = ?",
        (
            generation,
            sha,
            deployment_id,
            threads,
            to_json(fallback) if fallback else None,
            device_id,
        ),
    )
    return generation


def latest_benchmark(
    tx: Connection, device_id: str, sha: str | None, since: float = 0.0
) -> dict[str, Any] | None:
    """The newest benchmark report of `sha` on this device (received after `since`)."""
    if not sha:
        return None
    # `since` is compared with the controller's receive time, not the device's clock.
    row = tx.execute(
        "SELECT b.report FROM benchmarks b JOIN events e "
        "ON e.device_id = b.device_id AND e.event_id = b.event_id "
        "WHERE b.device_id = ? AND b.model_sha256 = ? AND e.received >= ? "
        "ORDER BY e.received DESC LIMIT 1",
        (device_id, sha, since),
    ).fetchone()
    return json.loads(row[0]) if row else None

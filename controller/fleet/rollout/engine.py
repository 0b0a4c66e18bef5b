"""Rollout engine: waves, per-device timeouts and retries, gates, abort and rollback.

All state lives in the database (deployments + deployment_devices), so a controller restart
loses nothing: `tick()` is idempotent and is called by the service's reconcile loop. Events
from devices are applied at ingest (`on_event`, inside Fleet.record_event's transaction).

Device states: waiting → (baselining) → pending → in_progress → activated → succeeded, or
failed / gate_failed / retrying; after an abort or rollback: cancelled, rolling_back,
rolled_back, rollback_failed; superseded when a newer deployment takes the device; skipped when
the model has no artifact for the device's profile.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.protocol import Event
from controller.fleet.rollout.outliers import EXCUSABLE_GATES, Outlier, classify
from controller.fleet.rollout.policy import RETRIABLE_STAGES, Policy, PolicyError, Threshold, Wave
from controller.fleet.rollout.selection import Selection
from controller.storage.db import Connection, now, to_json

if TYPE_CHECKING:
    from controller.fleet.registry import Fleet

log = logging.getLogger(__name__)

# Device states that end a device's part in a wave (it no longer holds the wave back).
DONE = frozenset(
    {
        "succeeded",
        "failed",
        "gate_failed",
        "skipped",
        "superseded",
        "cancelled",
        "rolled_back",
        "rollback_failed",
        "rolling_back",
        "outlier",
    }
)
# Device states that count as executed for the failure threshold, and which of them failed.
EXECUTED = frozenset({"succeeded", "failed", "gate_failed"})
FAILED = frozenset({"failed", "gate_failed"})
# The desired state of these devices points at the rollout's artifact.
IN_FLIGHT = ("pending", "in_progress", "activated", "retrying")
# How long to wait for a baseline benchmark before starting a device without one.
BASELINE_WAIT_S = 120.0
ROLLOUT_STATES = ("running", "paused", "completed", "aborted", "rolled_back")


class Rollouts:
    """Creates and drives rollouts; every method is one or a few short transactions."""

    def __init__(self, fleet: Fleet) -> None:
        """Work on `fleet`'s database."""
        self.fleet = fleet
        self.db = fleet.db
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
        ts = now()
        with self.db.transaction() as tx:
            tx.execute(
                "INSERT INTO deployments (id, model_id, target, created, kind, policy, state, "
                "wave, updated) VALUES (?, ?, ?, ?, ?, ?, 'running', 0, ?)",
                (rollout_id, model_id, target, ts, kind, to_json(policy.to_json()), ts),
            )
            for position, (device_id, sha, reason) in enumerate(order):
                # The newest rollout owns the device: an older one must not start it later.
                tx.execute(
                    "UPDATE deployment_devices SET state = 'superseded', updated = ?, "
                    "detail = ? WHERE device_id = ? "
                    "AND state IN ('waiting', 'baselining', 'retrying')",
                    (ts, f"taken by {rollout_id}", device_id),
                )
                wave = next(i for i, b in enumerate(bounds) if position < b)
                tx.execute(
                    "INSERT INTO deployment_devices (deployment_id, device_id, artifact_sha256, "
                    "generation, state, detail, updated, position, wave) "
                    "VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?)",
                    (
                        rollout_id,
                        device_id,
                        sha,
                        "waiting" if sha else "skipped",
                        reason,
                        ts,
                        position,
                        wave,
                    ),
                )
            if policy.candidates and self.selection.plan(tx, rollout_id, model_id, policy):
                # Candidates are measured on canaries first; wave 0 starts once all are decided.
                tx.execute("UPDATE deployments SET phase = 'selecting' WHERE id = ?", (rollout_id,))
            else:
                self._start_wave(tx, rollout_id, 0, policy)
        return rollout_id

    def _start_wave(self, tx: Connection, rollout_id: str, wave: int, policy: Policy) -> None:
        """Give every waiting device of `wave` its desired state (or ask for a baseline first)."""
        tx.execute(
            "UPDATE deployments SET wave = ?, updated = ? WHERE id = ?", (wave, now(), rollout_id)
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
            (rollout_id, wave, now(), self.driver, devices),
        )
        # A canary ran candidates since the rollout started: what it ran before is its previous.
        rows = tx.execute(
            "SELECT dd.device_id, dd.artifact_sha256, CASE WHEN EXISTS (SELECT 1 FROM "
            "candidate_trials t WHERE t.rollout_id = dd.deployment_id AND t.device_id = "
            "dd.device_id) THEN dd.previous_sha256 ELSE d.model_sha256 END, EXISTS (SELECT 1 "
            "FROM candidate_trials t WHERE t.rollout_id = dd.deployment_id AND t.device_id = "
            "dd.device_id) FROM deployment_devices dd LEFT JOIN devices d ON d.id = dd.device_id "
            "WHERE dd.deployment_id = ? AND dd.wave = ? AND dd.state = 'waiting'",
            (rollout_id, wave),
        ).fetchall()
        for device_id, sha, current, canary in rows:
            baseline = _latest_benchmark(tx, device_id, current) if current else None
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
                self._assign(tx, rollout_id, device_id, sha, policy, "pending")

    def _ask_baseline(self, tx: Connection, rollout_id: str, device_id: str) -> None:
        """Queue a benchmark of the device's current model, the baseline for regression gates."""
        command_id = f"cmd-{uuid.uuid4().hex[:12]}"
        ts = now()
        tx.execute(
            "INSERT INTO commands (id, device_id, action, runs, warmup, created) "
            "VALUES (?, ?, 'benchmark', 50, 5, ?)",
            (command_id, device_id, ts),
        )
        tx.execute(
            "UPDATE deployment_devices SET state = 'baselining', deadline = ?, updated = ?, "
            "detail = ? WHERE deployment_id = ? AND device_id = ?",
            (
                ts + BASELINE_WAIT_S,
                ts,
                f"measuring the current model first ({command_id})",
                rollout_id,
                device_id,
            ),
        )

    def _assign(
        self,
        tx: Connection,
        rollout_id: str,
        device_id: str,
        sha: str | None,
        policy: Policy,
        state: str,
        detail: str = "",
    ) -> int:
        """Point the device's desired state at `sha` under a new generation; supersede others.

        The rollout's own artifact goes out with the row's runtime options (threads, fallback);
        anything else (a previous model on rollback, None) without them.
        """
        ts = now()
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
        tx.execute(
            "UPDATE deployment_devices SET generation = ?, state = ?, deadline = ?, updated = ?, "
            "detail = ? WHERE deployment_id = ? AND device_id = ?",
            (generation, state, ts + policy.device_timeout_s, ts, detail, rollout_id, device_id),
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
        generation = set_desired(tx, device_id, sha, rollout_id, threads=threads, fallback=fallback)
        tx.execute(
            "UPDATE deployment_devices SET state = 'superseded', updated = ? "
            "WHERE device_id = ? AND deployment_id != ? AND state NOT IN "
            "('succeeded', 'failed', 'gate_failed', 'skipped', 'superseded', 'cancelled', "
            "'rolled_back', 'rollback_failed', 'outlier')",
            (now(), device_id, rollout_id),
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
        if row[0] == "trialing" and not removed:
            policy = Policy.from_json(json.loads(row[2]))
            self._set_row(tx, key, "rolling_back", why)
            self._roll_back_device(tx, key, row[1], policy, "rolling_back", committed=True)
        else:
            self._set_row(tx, key, "skipped", why)

    # ------------------------------------------------------------------ ingest
    def on_event(self, tx: Connection, event: Event) -> None:
        """Apply a device event to its rollout row (same transaction as storing the event)."""
        if not event.deployment_id or event.generation is None:
            return
        row = tx.execute(
            "SELECT dd.state, dd.attempts, dd.baseline, dd.previous_sha256, d.policy, d.state "
            "FROM deployment_devices dd JOIN deployments d ON d.id = dd.deployment_id "
            "WHERE dd.deployment_id = ? AND dd.device_id = ? AND dd.generation = ?",
            (event.deployment_id, event.device_id, event.generation),
        ).fetchone()
        if row is None:
            return  # an old generation (retried since) or an unknown deployment
        state, attempts, baseline, previous, policy_json, _ = row
        policy = Policy.from_json(json.loads(policy_json))
        key = (event.deployment_id, event.device_id)
        if state == "trialing":
            report = _report_dict(event) if event.benchmark is not None else None
            self.selection.on_event(tx, event, report, policy)
            return
        if event.kind == "fallback":
            tx.execute(
                "UPDATE deployment_devices SET fell_back = ?, updated = ? "
                "WHERE deployment_id = ? AND device_id = ?",
                (event.message[:2000], now(), *key),
            )
            return
        if state == "rolling_back":
            # `idle`: a device with no previous model was told to stop (desired artifact None).
            if event.kind == "update" and event.state in ("active", "idle"):
                self._set_row(tx, key, "rolled_back", f"back on {_short(previous)}")
            elif event.kind == "error":
                self._set_row(tx, key, "rollback_failed", event.message)
            return
        if state not in ("pending", "in_progress", "activated"):
            return
        if event.kind == "update" and event.state == "active":
            self._set_row(tx, key, "activated", event.message)
        elif event.kind == "error":
            stage = event.stage
            tx.execute(
                "UPDATE deployment_devices SET stage = ? WHERE deployment_id = ? AND device_id = ?",
                (stage, *key),
            )
            if (stage in RETRIABLE_STAGES or stage is None) and attempts < policy.retries:
                self._set_row(tx, key, "retrying", f"attempt {attempts + 1}: {event.message}")
            elif stage == "active":
                # Committed, then broke (e.g. its benchmark failed): it serves the new model,
                # so treat it as a gate failure and point it back.
                self._set_row(tx, key, "failed", event.message)
                self._roll_back_device(tx, key, previous, policy, "failed", committed=True)
            else:
                # The agent kept its previous model and will not retry this generation; its
                # desired state is left alone (pointing it back would cost a needless round
                # trip and benchmark on every failed device).
                self._set_row(tx, key, "failed", event.message)
        elif event.kind == "benchmark" and event.benchmark is not None:
            report = _report_dict(event)
            base = json.loads(baseline) if baseline else None
            violations = [v for g in policy.gates if (v := g.violation(report, base))]
            tx.execute(
                "UPDATE deployment_devices SET result = ? "
                "WHERE deployment_id = ? AND device_id = ?",
                (to_json(report), *key),
            )
            outlier = self._outlier(tx, key, policy, report, base) if violations else None
            if outlier is not None and outlier.explained:
                # The device's conditions explain the breach: not the model's regression.
                tx.execute(
                    "UPDATE deployment_devices SET outlier = ? "
                    "WHERE deployment_id = ? AND device_id = ?",
                    (outlier.reason, *key),
                )
                self._set_row(
                    tx,
                    key,
                    "outlier",
                    f"{'; '.join(violations)}; {outlier.label()}: kept, not a model failure",
                )
            elif violations:
                self._set_row(tx, key, "gate_failed", "; ".join(violations))
                self._roll_back_device(tx, key, previous, policy, "gate_failed", committed=True)
            else:
                note = ""
                if policy.needs_baseline and base is None:
                    note = "no baseline for the previous model: regression gates not judged"
                self._set_row(tx, key, "succeeded", note or "gates passed")

    @staticmethod
    def _outlier(
        tx: Connection,
        key: tuple[str, str],
        policy: Policy,
        report: dict[str, Any],
        baseline: dict[str, Any] | None,
    ) -> Outlier | None:
        """An explained outlier excuses a gate breach only when the peers show it is the device.

        Only latency and energy gates are excused (conditions do not change memory), and only
        when at least 2 devices of the profile on the same artifact measured it and most of them
        are within those gates.
        """
        broken = [g for g in policy.gates if g.violation(report, baseline)]
        if not broken or any(g.metric not in EXCUSABLE_GATES for g in broken):
            return None
        peers = [
            (json.loads(result), json.loads(base) if base else None)
            for result, base in tx.execute(
                "SELECT dd.result, dd.baseline FROM deployment_devices dd "
                "JOIN devices dv ON dv.id = dd.device_id WHERE dd.deployment_id = ? "
                "AND dd.device_id != ? AND dd.result IS NOT NULL AND dd.artifact_sha256 = "
                "(SELECT artifact_sha256 FROM deployment_devices WHERE deployment_id = ? AND "
                "device_id = ?) AND dv.profile = (SELECT profile FROM devices WHERE id = ?)",
                (*key, *key, key[1]),
            )
        ]
        within = sum(not any(g.violation(r, b) for g in broken) for r, b in peers)
        if len(peers) < 2 or within * 2 <= len(peers):
            return None
        return classify(report, [r for r, _ in peers], baseline=baseline, breached=True)

    @staticmethod
    def _set_row(tx: Connection, key: tuple[str, str], state: str, detail: str = "") -> None:
        """Set one device row's state and detail."""
        tx.execute(
            "UPDATE deployment_devices SET state = ?, detail = ?, updated = ? "
            "WHERE deployment_id = ? AND device_id = ?",
            (state, detail[:2000], now(), *key),
        )

    def _roll_back_device(
        self,
        tx: Connection,
        key: tuple[str, str],
        previous: str | None,
        policy: Policy,
        state: str,
        *,
        committed: bool,
    ) -> None:
        """Point a device back at the model it ran before this rollout (same rollout id).

        `committed`: the device switched to the rollout's model (callers know it from the state
        the row had before they changed it).
        """
        rollout_id, device_id = key
        known = (
            previous
            and tx.execute("SELECT 1 FROM artifacts WHERE sha256 = ?", (previous,)).fetchone()
        )
        if previous and not known and not committed:
            # Not switched yet: cancel the update; the device keeps serving what it has.
            self._assign(tx, rollout_id, device_id, None, policy, state, "update cancelled")
            return
        if previous and not known:
            # The controller never had that file: the agent still has it as `previous`.
            tx.execute(
                "INSERT INTO commands (id, device_id, action, runs, warmup, created) "
                "VALUES (?, ?, 'rollback', 1, 0, ?)",
                (f"cmd-{uuid.uuid4().hex[:12]}", device_id, now()),
            )
            return
        detail = tx.execute(
            "SELECT detail FROM deployment_devices WHERE deployment_id = ? AND device_id = ?", key
        ).fetchone()[0]
        if not previous:
            detail = f"{detail}; no previous model to return to".lstrip("; ")
        self._assign(tx, rollout_id, device_id, previous, policy, state, detail)

    # ------------------------------------------------------------------ reconcile
    def tick(self, fence: Callable[[Connection], bool] | None = None) -> list[str]:
        """Advance every running rollout one step; return what happened (for the log).

        `fence(tx)` (a replica's leader lease) is checked inside each rollout's transaction:
        once it says False, this replica stops driving before changing anything.
        """
        notes: list[str] = []
        for row in self.db.query("SELECT * FROM deployments WHERE state IN ('running', 'paused')"):
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
            expired = tx.execute(
                "UPDATE deployment_devices SET state = 'rollback_failed', updated = ?, "
                "detail = 'rollback timed out (device offline?)' "
                "WHERE state = 'rolling_back' AND deadline < ?",
                (now(), now()),
            ).rowcount
        if expired:
            notes.append(f"{expired} rollback(s) timed out")
        return notes

    def _tick_one(self, tx: Connection, rollout: dict[str, Any]) -> list[str]:
        """Baselines, retries, timeouts, the failure threshold and wave advance of one rollout."""
        rid, running = rollout["id"], rollout["state"] == "running"
        # Re-read inside the transaction: a CLI pause/abort may have landed since the query.
        current = tx.execute("SELECT state, wave FROM deployments WHERE id = ?", (rid,)).fetchone()
        if current is None or current[0] not in ("running", "paused"):
            return []
        running = current[0] == "running"
        policy = Policy.from_json(json.loads(rollout["policy"]))
        ts = now()
        notes: list[str] = []
        rows = tx.execute(
            "SELECT device_id, artifact_sha256, state, attempts, deadline, previous_sha256, "
            "generation, wave FROM deployment_devices WHERE deployment_id = ?",
            (rid,),
        ).fetchall()
        for device_id, sha, state, attempts, deadline, previous, _gen, _wave in rows:
            key = (rid, device_id)
            if state == "baselining" and running:
                baseline = _latest_benchmark(tx, device_id, previous, since=ts - BASELINE_WAIT_S)
                if baseline is not None or (deadline and ts > deadline):
                    detail = "" if baseline else "no baseline measured in time"
                    tx.execute(
                        "UPDATE deployment_devices SET baseline = ? "
                        "WHERE deployment_id = ? AND device_id = ?",
                        (to_json(baseline) if baseline else None, *key),
                    )
                    self._assign(tx, rid, device_id, sha, policy, "pending", detail)
            elif state == "retrying" and running:
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
                self._assign(tx, rid, device_id, sha, policy, "pending", prior)
                notes.append(f"{rid}: retry {attempts + 1} of {device_id}")
            elif state in ("pending", "in_progress", "activated") and deadline and ts > deadline:
                why = f"timed out after {policy.device_timeout_s:g} s in state {state}"
                if attempts < policy.retries:
                    self._set_row(tx, key, "retrying", f"attempt {attempts + 1}: {why}")
                else:
                    self._set_row(tx, key, "failed", why)
                    # An offline device must not install the artifact when it comes back.
                    self._roll_back_device(
                        tx, key, previous, policy, "failed", committed=state == "activated"
                    )
                    notes.append(f"{rid}: {device_id} {why}")
        counts = _counts(tx, rid)
        executed = sum(counts.get(s, 0) for s in EXECUTED)
        failures = sum(counts.get(s, 0) for s in FAILED)
        if executed >= policy.min_executed and policy.max_failures.exceeded(failures, executed):
            reason = (
                f"{failures} of {executed} executed devices failed "
                f"(threshold {policy.max_failures.label()}, minimum executed {policy.min_executed})"
            )
            self._stop(tx, rid, "aborted", reason, policy)
            return [*notes, f"{rid}: aborted: {reason}"]
        if not running:
            return notes
        phase = tx.execute("SELECT phase FROM deployments WHERE id = ?", (rid,)).fetchone()[0]
        if phase == "selecting":
            complete, selected = self.selection.tick(tx, rid, policy)
            notes += selected
            if not complete:
                return notes
            tx.execute("UPDATE deployments SET phase = 'waves' WHERE id = ?", (rid,))
            self._start_wave(tx, rid, 0, policy)
            notes.append(f"{rid}: candidates selected; wave 0 started")
        wave = int(current[1])
        while True:  # several waves may be done at once (empty, skipped or superseded ones)
            open_in_wave = tx.execute(
                "SELECT COUNT(*) FROM deployment_devices WHERE deployment_id = ? AND wave <= ? "
                f"AND state NOT IN ({','.join('?' * len(DONE))})",
                (rid, wave, *sorted(DONE)),
            ).fetchone()[0]
            if open_in_wave:
                return notes
            if wave + 1 >= len(policy.waves):
                break
            wave += 1
            self._start_wave(tx, rid, wave, policy)
            notes.append(f"{rid}: wave {wave} started")
        counts = _counts(tx, rid)
        tx.execute(
            "UPDATE deployments SET state = 'completed', reason = ?, updated = ? WHERE id = ?",
            (_summary(counts), now(), rid),
        )
        return [*notes, f"{rid}: completed ({_summary(counts)})"]

    # ------------------------------------------------------------------ operator actions
    def pause(self, rollout_id: str) -> dict[str, Any]:
        """Start no new devices or waves; devices already updating finish."""
        return self._set_state(rollout_id, "paused", allowed=("running",))

    def resume(self, rollout_id: str) -> dict[str, Any]:
        """Continue a paused rollout."""
        return self._set_state(rollout_id, "running", allowed=("paused",))

    def abort(self, rollout_id: str, reason: str = "aborted by operator") -> dict[str, Any]:
        """Stop and roll back every device this rollout changed."""
        row = self._get(rollout_id)
        if row["state"] not in ("running", "paused"):
            raise PolicyError(
                f"rollout {rollout_id} is {row['state']}; only a running or paused "
                "rollout can be aborted (use `rollout rollback`)"
            )
        return self._end(row, "aborted", reason)

    def rollback(self, rollout_id: str, reason: str = "rolled back by operator") -> dict[str, Any]:
        """Return every device of the rollout to its previous model, even after completion."""
        row = self._get(rollout_id)
        if row["state"] == "rolled_back":
            raise PolicyError(f"rollout {rollout_id} is already rolled back")
        return self._end(row, "rolled_back", reason)

    def _end(self, row: dict[str, Any], state: str, reason: str) -> dict[str, Any]:
        """Operator's abort or rollback of the rollout in `row`, in one transaction."""
        with self.db.transaction() as tx:
            current = tx.execute("SELECT state FROM deployments WHERE id = ?", (row["id"],))
            if current.fetchone()[0] != row["state"]:
                raise PolicyError(f"rollout {row['id']} changed state meanwhile; try again")
            self._stop(tx, row["id"], state, reason, Policy.from_json(json.loads(row["policy"])))
        return self.status(row["id"])

    def _stop(
        self,
        tx: Connection,
        rollout_id: str,
        state: str,
        reason: str,
        policy: Policy,
    ) -> None:
        """End a rollout: cancel devices not started, roll back every one it changed."""
        tx.execute(
            "UPDATE deployments SET state = ?, reason = ?, updated = ? WHERE id = ?",
            (state, reason, now(), rollout_id),
        )
        # A canary ran candidates: whatever its state, it goes back to what it ran before.
        trialed = {
            d: started
            for d, started in tx.execute(
                "SELECT device_id, MAX(CASE WHEN state != 'waiting' THEN 1 ELSE 0 END) "
                "FROM candidate_trials WHERE rollout_id = ? GROUP BY device_id",
                (rollout_id,),
            )
        }
        tx.execute(
            "UPDATE deployment_devices SET state = 'cancelled', updated = ?, detail = ? "
            "WHERE deployment_id = ? AND state IN ('waiting', 'baselining') AND device_id NOT IN "
            "(SELECT device_id FROM candidate_trials WHERE rollout_id = ? AND state != 'waiting')",
            (now(), reason, rollout_id, rollout_id),
        )
        self.selection.cancel(tx, rollout_id, reason)
        targets = [*IN_FLIGHT, "succeeded", "trialing", "outlier", "waiting"]
        rows = tx.execute(
            "SELECT device_id, previous_sha256, state FROM deployment_devices "
            f"WHERE deployment_id = ? AND state IN ({','.join('?' * len(targets))})",
            (rollout_id, *targets),
        ).fetchall()
        for device_id, previous, was in rows:
            if was in ("trialing", "waiting") and not trialed.get(device_id):
                self._set_row(tx, (rollout_id, device_id), "cancelled", reason)
                continue
            owner = tx.execute(
                "SELECT desired_deployment_id FROM devices WHERE id = ?", (device_id,)
            ).fetchone()
            if owner is None or owner[0] != rollout_id:
                # A newer deployment took the device since: rolling back would undo that one.
                self._set_row(tx, (rollout_id, device_id), "superseded", "taken by a newer one")
                continue
            self._set_row(tx, (rollout_id, device_id), "rolling_back", reason)
            self._roll_back_device(
                tx,
                (rollout_id, device_id),
                previous,
                policy,
                "rolling_back",
                committed=was in ("activated", "succeeded", "trialing", "outlier", "waiting"),
            )

    def _set_state(
        self, rollout_id: str, state: str, *, allowed: tuple[str, ...]
    ) -> dict[str, Any]:
        """Guarded state change of a rollout."""
        self._get(rollout_id)
        with self.db.transaction() as tx:
            # Checked and written in one transaction: the service may end the rollout meanwhile.
            current = tx.execute(
                "SELECT state FROM deployments WHERE id = ?", (rollout_id,)
            ).fetchone()[0]
            if current not in allowed:
                raise PolicyError(f"rollout {rollout_id} is {current}, not {' or '.join(allowed)}")
            tx.execute(
                "UPDATE deployments SET state = ?, updated = ? WHERE id = ?",
                (state, now(), rollout_id),
            )
        return self.status(rollout_id)

    # ------------------------------------------------------------------ reading
    def _get(self, rollout_id: str) -> dict[str, Any]:
        """The deployments row, or PolicyError naming the id."""
        row = self.db.query_one("SELECT * FROM deployments WHERE id = ?", (rollout_id,))
        if row is None:
            raise PolicyError(
                f"unknown deployment or rollout {rollout_id!r} (see `edgefleet rollout status`)"
            )
        return row

    def status(self, rollout_id: str) -> dict[str, Any]:
        """A rollout with its policy, counts per state, per-wave progress and devices."""
        row = self._get(rollout_id)
        policy = Policy.from_json(json.loads(row["policy"]))
        devices = self.db.query(
            "SELECT device_id, wave, artifact_sha256, previous_sha256, generation, state, "
            "attempts, stage, detail, result, updated, threads, outlier, fell_back "
            "FROM deployment_devices "
            "WHERE deployment_id = ? ORDER BY position",
            (rollout_id,),
        )
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
                    "succeeded": sum(d["state"] == "succeeded" for d in members),
                    "failed": sum(d["state"] in FAILED for d in members),
                }
            )
        model = self.db.query_one(
            "SELECT name, version FROM models WHERE id = ?", (row["model_id"],)
        )
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
            "waves": waves,
            "devices": devices,
            "trials": self.selection.trials(rollout_id) if policy.candidates else [],
            "decisions": self.selection.decisions(rollout_id) if policy.candidates else [],
        }

    def list(self) -> list[dict[str, Any]]:
        """Every rollout and deployment, newest first, with counts per device state."""
        rows = self.db.query(
            "SELECT d.id, d.kind, d.state, d.wave, d.target, d.created, d.reason, "
            "m.name || ':' || m.version AS model FROM deployments d "
            "JOIN models m ON m.id = d.model_id ORDER BY d.created DESC"
        )
        for r in rows:
            r["counts"] = {
                s: n
                for s, n in self.db.conn.execute(
                    "SELECT state, COUNT(*) FROM deployment_devices WHERE deployment_id = ? "
                    "GROUP BY state",
                    (r["id"],),
                )
            }
        return rows


def set_desired(
    tx: Connection,
    device_id: str,
    sha: str | None,
    deployment_id: str,
    *,
    threads: int | None = None,
    fallback: dict[str, Any] | None = None,
) -> int:
    """Write a device's desired state (with runtime options) under a newer generation."""
    # Monotonic even when the device row was recreated or the database is new: the agent
    # ignores generations <= the last one it applied, so never go back.
    previous = tx.execute(
        "SELECT CASE WHEN desired_generation > reported_generation THEN desired_generation "
        "ELSE reported_generation END FROM devices WHERE id = ?",
        (device_id,),
    ).fetchone()
    generation = max((previous[0] if previous else 0) + 1, int(now() * 1000))
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


def _latest_benchmark(
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


def _report_dict(event: Event) -> dict[str, Any]:
    """The benchmark fields the gates read."""
    from agent.protocol.schema import encode

    return dict(encode(event.benchmark))


def _counts(tx: Connection, rollout_id: str) -> dict[str, int]:
    """Devices per state in one rollout."""
    return dict(
        tx.execute(
            "SELECT state, COUNT(*) FROM deployment_devices WHERE deployment_id = ? GROUP BY state",
            (rollout_id,),
        ).fetchall()
    )


def _summary(counts: dict[str, int]) -> str:
    """`3 succeeded, 1 failed`."""
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def _short(sha: str | None) -> str:
    """First 12 hex digits, or 'nothing'."""
    return sha[:12] if sha else "nothing"


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

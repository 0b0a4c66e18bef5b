"""Selection phase of a rollout: candidates tried on canaries, then the winner per profile.

State lives in `candidate_trials` and `candidate_decisions`; every step runs inside the rollout
engine's transactions, so a controller restart resumes a selection where it stood
(docs/closed-loop.md).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from agent.protocol import Event
from controller.fleet.rollout.decide import Candidate, Trial, decide
from controller.fleet.rollout.policy import RETRIABLE_STAGES, Policy
from controller.fleet.rollout.states import DeviceState, move, sql_in
from controller.storage.db import Connection, to_json

if TYPE_CHECKING:
    from controller.fleet.rollout.engine import Rollouts

D = DeviceState

# Trial states that end a trial.
TRIAL_DONE = frozenset({"measured", "failed", "cancelled"})


class Selection:
    """Plans, drives and decides the candidate trials of rollouts."""

    def __init__(self, rollouts: Rollouts) -> None:
        """Work through the rollout engine (its assignment and desired-state helpers)."""
        self.rollouts = rollouts

    # ------------------------------------------------------------------ planning
    def plan(self, tx: Connection, rollout_id: str, model_id: int, policy: Policy) -> int:
        """Create the trials of every profile with 2+ candidates; return how many profiles."""
        rows = tx.execute(
            "SELECT dd.device_id, dv.profile, dv.online FROM deployment_devices dd "
            "JOIN devices dv ON dv.id = dd.device_id WHERE dd.deployment_id = ? "
            f"AND dd.state = '{D.WAITING}' ORDER BY dd.position",
            (rollout_id,),
        ).fetchall()
        by_profile: dict[str, list[tuple[str, int]]] = {}
        for device_id, profile, online in rows:
            if profile:
                by_profile.setdefault(profile, []).append((device_id, online))
        planned = 0
        ts = self.rollouts.clock()
        for profile, devices in sorted(by_profile.items()):
            candidates = tx.execute(
                "SELECT rank, sha256, threads FROM model_candidates "
                "WHERE model_id = ? AND profile = ? ORDER BY rank LIMIT ?",
                (model_id, profile, policy.candidates),
            ).fetchall()
            if len(candidates) < 2:
                continue
            # Online devices first (stable within each group), then the rollout's own order.
            canaries = [d for d, _ in sorted(devices, key=lambda d: not d[1])][: policy.canaries]
            for device_id in canaries:
                current = tx.execute(
                    "SELECT model_sha256 FROM devices WHERE id = ?", (device_id,)
                ).fetchone()[0]
                move(
                    tx,
                    (rollout_id, device_id),
                    D.TRIALING,
                    ts=ts,
                    detail=f"canary: measuring {len(candidates)} candidates",
                    previous_sha256=current,
                )
                tx.executemany(
                    "INSERT INTO candidate_trials (rollout_id, profile, device_id, rank, sha256, "
                    "threads, updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(rollout_id, profile, device_id, r, s, t, ts) for r, s, t in candidates],
                )
            planned += 1
        return planned

    # ------------------------------------------------------------------ driving
    def tick(self, tx: Connection, rollout_id: str, policy: Policy) -> tuple[bool, list[str]]:
        """Time out trials, start each idle canary's next trial, decide finished profiles.

        Returns (selection complete, notes).
        """
        ts = self.rollouts.clock()
        notes: list[str] = []
        # A canary taken by a newer rollout, removed, or ended otherwise leaves the selection:
        # its open trials end here, so this rollout never points the device again.
        gone = tx.execute(
            "UPDATE candidate_trials SET state = 'cancelled', detail = ?, updated = ? "
            "WHERE rollout_id = ? AND state IN ('waiting', 'running', 'activated') AND ("
            "device_id NOT IN (SELECT id FROM devices) OR device_id NOT IN (SELECT device_id "
            f"FROM deployment_devices WHERE deployment_id = ? AND state = '{D.TRIALING}'))",
            ("the canary left the selection (taken by a newer rollout or removed)", ts,
             rollout_id, rollout_id),
        ).rowcount  # fmt: skip
        if gone:
            notes.append(f"{rollout_id}: {gone} trial(s) cancelled: canary gone")
        expired = tx.execute(
            "SELECT device_id, rank, state FROM candidate_trials WHERE rollout_id = ? "
            "AND state IN ('running', 'activated') AND deadline < ?",
            (rollout_id, ts),
        ).fetchall()
        for device_id, rank, state in expired:
            why = f"timed out after {policy.device_timeout_s:g} s in state {state}"
            self._fail_trial(tx, rollout_id, device_id, rank, why, policy, retriable=True)
            notes.append(f"{rollout_id}: trial #{rank} on {device_id} timed out")
        busy = {
            d
            for (d,) in tx.execute(
                "SELECT DISTINCT device_id FROM candidate_trials WHERE rollout_id = ? "
                "AND state IN ('running', 'activated')",
                (rollout_id,),
            )
        }
        waiting = tx.execute(
            "SELECT device_id, MIN(rank) FROM candidate_trials WHERE rollout_id = ? "
            "AND state = 'waiting' GROUP BY device_id",
            (rollout_id,),
        ).fetchall()
        for device_id, rank in waiting:
            if device_id not in busy:
                self._start_trial(tx, rollout_id, device_id, rank, policy)
                notes.append(f"{rollout_id}: trial #{rank} on {device_id}")
        open_profiles = {
            p
            for (p,) in tx.execute(
                "SELECT DISTINCT profile FROM candidate_trials WHERE rollout_id = ? "
                f"AND state NOT IN ({','.join('?' * len(TRIAL_DONE))})",
                (rollout_id, *sorted(TRIAL_DONE)),
            )
        }
        decided = {
            p
            for (p,) in tx.execute(
                "SELECT profile FROM candidate_decisions WHERE rollout_id = ?", (rollout_id,)
            )
        }
        profiles = {
            p
            for (p,) in tx.execute(
                "SELECT DISTINCT profile FROM candidate_trials WHERE rollout_id = ?", (rollout_id,)
            )
        }
        for profile in sorted(profiles - open_profiles - decided):
            notes.append(self._decide(tx, rollout_id, profile, policy))
        return not open_profiles, notes

    def _start_trial(
        self, tx: Connection, rollout_id: str, device_id: str, rank: int, policy: Policy
    ) -> None:
        """Point the canary at candidate `rank` (its own generation) and wait for its benchmark."""
        sha, threads = tx.execute(
            "SELECT sha256, threads FROM candidate_trials WHERE rollout_id = ? AND device_id = ? "
            "AND rank = ?",
            (rollout_id, device_id, rank),
        ).fetchone()
        generation = self.rollouts.point_device(
            tx, rollout_id, device_id, sha, threads=threads, fallback=None
        )
        ts = self.rollouts.clock()
        tx.execute(
            "UPDATE candidate_trials SET state = 'running', generation = ?, deadline = NULL, "
            "updated = ? WHERE rollout_id = ? AND device_id = ? AND rank = ?",
            (generation, ts, rollout_id, device_id, rank),
        )
        tx.execute(
            "UPDATE deployment_devices SET generation = ?, detail = ?, updated = ? "
            "WHERE deployment_id = ? AND device_id = ?",
            (generation, f"canary: measuring candidate #{rank}", ts, rollout_id, device_id),
        )

    def _end_trial(
        self,
        tx: Connection,
        rollout_id: str,
        device_id: str,
        rank: int,
        state: str,
        detail: str,
        result: dict[str, Any] | None = None,
    ) -> None:
        """Record a trial's end."""
        tx.execute(
            "UPDATE candidate_trials SET state = ?, detail = ?, result = ?, updated = ? "
            "WHERE rollout_id = ? AND device_id = ? AND rank = ?",
            (
                state,
                detail[:2000],
                to_json(result) if result is not None else None,
                self.rollouts.clock(),
                rollout_id,
                device_id,
                rank,
            ),
        )

    def _fail_trial(
        self,
        tx: Connection,
        rollout_id: str,
        device_id: str,
        rank: int,
        why: str,
        policy: Policy,
        *,
        retriable: bool,
    ) -> None:
        """End a trial as failed, or queue it again (new generation) while retries are left."""
        attempts = tx.execute(
            "SELECT attempts FROM candidate_trials WHERE rollout_id = ? AND device_id = ? "
            "AND rank = ?",
            (rollout_id, device_id, rank),
        ).fetchone()[0]
        if retriable and attempts < policy.retries:
            tx.execute(
                "UPDATE candidate_trials SET state = 'waiting', attempts = attempts + 1, "
                "detail = ?, updated = ? WHERE rollout_id = ? AND device_id = ? AND rank = ?",
                (
                    f"attempt {attempts + 1}: {why}"[:2000],
                    self.rollouts.clock(),
                    rollout_id,
                    device_id,
                    rank,
                ),
            )
        else:
            self._end_trial(tx, rollout_id, device_id, rank, "failed", why)

    def on_event(
        self, tx: Connection, event: Event, report: dict[str, Any] | None, policy: Policy
    ) -> None:
        """Apply a canary's event to the trial of its generation."""
        row = tx.execute(
            "SELECT rank, state FROM candidate_trials WHERE rollout_id = ? AND device_id = ? "
            "AND generation = ?",
            (event.deployment_id, event.device_id, event.generation),
        ).fetchone()
        if row is None or row[1] in TRIAL_DONE:
            return
        rank = row[0]
        key = (event.deployment_id or "", event.device_id, rank)
        if event.kind == "update" and event.state == "active":
            tx.execute(
                "UPDATE candidate_trials SET state = 'activated', detail = ?, updated = ? "
                "WHERE rollout_id = ? AND device_id = ? AND rank = ?",
                (event.message[:2000], self.rollouts.clock(), *key),
            )
        elif event.kind == "error":
            stage = f" (stage {event.stage})" if event.stage else ""
            # Transport failures are retried like in the waves; a self-test verdict is final.
            retriable = event.stage in RETRIABLE_STAGES or event.stage is None
            self._fail_trial(tx, *key, f"{event.message}{stage}", policy, retriable=retriable)
        elif event.kind == "benchmark" and report is not None:
            self._end_trial(tx, *key, "measured", "benchmarked", report)

    def cancel(self, tx: Connection, rollout_id: str, reason: str) -> None:
        """End every trial not yet finished (the rollout was aborted or rolled back)."""
        tx.execute(
            "UPDATE candidate_trials SET state = 'cancelled', detail = ?, updated = ? "
            "WHERE rollout_id = ? AND state IN ('waiting', 'running', 'activated')",
            (reason[:2000], self.rollouts.clock(), rollout_id),
        )

    # ------------------------------------------------------------------ deciding
    def candidates(self, tx: Connection, rollout_id: str, profile: str) -> list[Candidate]:
        """The profile's candidates of this rollout with their trials."""
        model_id = tx.execute(
            "SELECT model_id FROM deployments WHERE id = ?", (rollout_id,)
        ).fetchone()[0]
        out: dict[int, Candidate] = {}
        # What was trialed (sha, threads) decides; the registry adds the recipe and host numbers.
        for rank, sha, threads, recipe, host in tx.execute(
            "SELECT DISTINCT t.rank, t.sha256, t.threads, c.recipe, c.host FROM candidate_trials t "
            "LEFT JOIN model_candidates c ON c.model_id = ? AND c.profile = t.profile "
            "AND c.rank = t.rank WHERE t.rollout_id = ? AND t.profile = ? ORDER BY t.rank",
            (model_id, rollout_id, profile),
        ):
            out[rank] = Candidate(rank, sha, recipe or "?", threads, json.loads(host or "{}"))
        for device_id, rank, state, result, detail in tx.execute(
            "SELECT device_id, rank, state, result, detail FROM candidate_trials "
            "WHERE rollout_id = ? AND profile = ? ORDER BY device_id, rank",
            (rollout_id, profile),
        ):
            if rank in out:
                parsed = json.loads(result) if result else None
                out[rank].trials.append(Trial(device_id, state, parsed, detail))
        return [out[r] for r in sorted(out)]

    def _decide(self, tx: Connection, rollout_id: str, profile: str, policy: Policy) -> str:
        """Decide one profile, store the explanation and point its rollout rows at the winner."""
        candidates = self.candidates(tx, rollout_id, profile)
        budget = self._fallback_budget(profile, policy)
        explanation = decide(candidates, policy, fallback_budget_ms=budget)
        explanation["profile"] = profile
        for c in candidates:  # keep the outlier verdicts with the trials
            for t in c.trials:
                if t.outlier:
                    tx.execute(
                        "UPDATE candidate_trials SET outlier = ? WHERE rollout_id = ? "
                        "AND device_id = ? AND rank = ?",
                        (t.outlier, rollout_id, t.device_id, c.rank),
                    )
        by_rank = {c.rank: c for c in candidates}
        winner = by_rank.get(explanation["winner"]) if explanation["winner"] else None
        fallback = by_rank.get(explanation["fallback"]) if explanation["fallback"] else None
        tx.execute(
            "INSERT INTO candidate_decisions (rollout_id, profile, winner_rank, sha256, threads, "
            "fallback_rank, explanation, decided) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rollout_id,
                profile,
                winner.rank if winner else None,
                winner.sha256 if winner else None,
                winner.threads if winner else None,
                fallback.rank if fallback else None,
                to_json(explanation),
                self.rollouts.clock(),
            ),
        )
        # The profile's devices, and its canaries even if since removed or re-profiled.
        members = tx.execute(
            "SELECT dd.device_id, dv.id IS NOT NULL, EXISTS (SELECT 1 FROM candidate_trials t "
            "WHERE t.rollout_id = dd.deployment_id AND t.device_id = dd.device_id) "
            "FROM deployment_devices dd LEFT JOIN devices dv ON dv.id = dd.device_id "
            f"WHERE dd.deployment_id = ? AND dd.state IN {sql_in((D.WAITING, D.TRIALING))} AND "
            "(dv.profile = ? OR EXISTS (SELECT 1 FROM candidate_trials t WHERE t.rollout_id = "
            "dd.deployment_id AND t.device_id = dd.device_id AND t.profile = ?))",
            (rollout_id, profile, profile),
        ).fetchall()
        for device_id, _, _ in [m for m in members if not m[1]]:
            self.rollouts.skip_device(tx, rollout_id, device_id, "device removed", removed=True)
        devices = [d for d, exists, _ in members if exists]
        canaries = {d for d, exists, trialed in members if exists and trialed}
        if winner is None:
            why = "no candidate passed on the canaries: " + "; ".join(
                f"{e['label']}: {e['why']}" for e in explanation["candidates"]
            )
            for device_id in devices:
                self.rollouts.skip_device(tx, rollout_id, device_id, why)
            return f"{rollout_id}: {profile}: no candidate selected"
        fallback_json = (
            to_json(
                {
                    "sha256": fallback.sha256,
                    "threads": fallback.threads,
                    "latency_ms": budget,
                    "window_s": policy.fallback_window_s,
                }
            )
            if fallback is not None
            else None
        )
        for device_id in devices:
            # Canaries join wave 0: they must not sit on their last candidate until a later wave.
            move(
                tx,
                (rollout_id, device_id),
                D.WAITING,
                ts=self.rollouts.clock(),
                detail=f"selected {winner.label()} on the canaries",
                artifact_sha256=winner.sha256,
                threads=winner.threads,
                fallback=fallback_json,
                **({"wave": 0} if device_id in canaries else {}),
            )
        return f"{rollout_id}: {profile}: selected {winner.label()}"

    def _fallback_budget(self, profile: str, policy: Policy) -> float | None:
        """The p95 a fallback holds: the rollout's p95_ms gate, else the profile's budget."""
        gate = next((g.limit for g in policy.gates if g.metric == "p95_ms"), None)
        if gate is not None:
            return gate
        known = self.rollouts.fleet.profiles.get(profile)
        budget = known.budgets.latency_ms if known else 0.0
        return budget or None

    # ------------------------------------------------------------------ reading
    def decisions(self, rollout_id: str) -> list[dict[str, Any]]:
        """Stored decisions of a rollout, one per profile, with their explanations."""
        rows = self.rollouts.db.query(
            "SELECT profile, winner_rank, sha256, threads, fallback_rank, explanation, decided "
            "FROM candidate_decisions WHERE rollout_id = ? ORDER BY profile",
            (rollout_id,),
        )
        for r in rows:
            r["explanation"] = json.loads(r["explanation"])
        return rows

    def trials(self, rollout_id: str) -> list[dict[str, Any]]:
        """Every trial of a rollout (for `rollout status`)."""
        rows = self.rollouts.db.query(
            "SELECT profile, device_id, rank, sha256, threads, state, generation, detail, "
            "outlier, result FROM candidate_trials WHERE rollout_id = ? "
            "ORDER BY profile, device_id, rank",
            (rollout_id,),
        )
        for r in rows:
            r["result"] = json.loads(r["result"]) if r["result"] else None
        return rows

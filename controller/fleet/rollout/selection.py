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
from controller.fleet.rollout.states import DeviceState, move
from controller.fleet.rollout.trial_states import (
    BUSY,
    DONE,
    TrialState,
    cancel_trials,
    move_trial,
    values,
)
from controller.storage.db import Connection, to_json
from controller.storage.queries import selection as sq
from controller.storage.queries import waves as wq

if TYPE_CHECKING:
    from controller.fleet.rollout.engine import Rollouts

D, T = DeviceState, TrialState


class Selection:
    """Plans, drives and decides the candidate trials of rollouts."""

    def __init__(self, rollouts: Rollouts) -> None:
        """Work through the rollout engine (its assignment and desired-state helpers)."""
        self.rollouts = rollouts

    # ------------------------------------------------------------------ planning
    def plan(self, tx: Connection, rollout_id: str, model_id: int, policy: Policy) -> int:
        """Create the trials of every profile with 2+ candidates; return how many profiles."""
        by_profile: dict[str, list[tuple[str, int]]] = {}
        for device_id, profile, online in sq.waiting_devices(tx, rollout_id, D.WAITING):
            if profile:
                by_profile.setdefault(profile, []).append((device_id, online))
        planned = 0
        ts = self.rollouts.clock()
        for profile, devices in sorted(by_profile.items()):
            candidates = sq.top_candidates(tx, model_id, profile, policy.candidates)
            if len(candidates) < 2:
                continue
            # Online devices first (stable within each group), then the rollout's own order.
            canaries = [d for d, _ in sorted(devices, key=lambda d: not d[1])][: policy.canaries]
            for device_id in canaries:
                current = sq.device_model(tx, device_id)
                move(
                    tx,
                    (rollout_id, device_id),
                    D.TRIALING,
                    ts=ts,
                    detail=f"canary: measuring {len(candidates)} candidates",
                    previous_sha256=current,
                )
                sq.add_trials(
                    tx,
                    [
                        {"rollout_id": rollout_id, "profile": profile, "device_id": device_id,
                         "rank": r, "sha256": s, "threads": t, "updated": ts}
                        for r, s, t in candidates
                    ],
                )  # fmt: skip
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
        why = "the canary left the selection (taken by a newer rollout or removed)"
        gone = cancel_trials(tx, rollout_id, why, ts, gone_from=D.TRIALING.value)
        if gone:
            notes.append(f"{rollout_id}: {gone} trial(s) cancelled: canary gone")
        for device_id, rank, state in sq.expired(tx, rollout_id, values(BUSY), ts):
            why = f"timed out after {policy.device_timeout_s:g} s in state {state}"
            self._fail_trial(tx, rollout_id, device_id, rank, why, policy, retriable=True)
            notes.append(f"{rollout_id}: trial #{rank} on {device_id} timed out")
        busy = sq.busy_devices(tx, rollout_id, values(BUSY))
        for device_id, rank in sq.next_waiting(tx, rollout_id, T.WAITING.value):
            if device_id not in busy:
                self._start_trial(tx, rollout_id, device_id, rank, policy)
                notes.append(f"{rollout_id}: trial #{rank} on {device_id}")
        open_profiles = sq.profiles(tx, rollout_id, not_in=values(DONE))
        decided = sq.decided_profiles(tx, rollout_id)
        profiles = sq.profiles(tx, rollout_id)
        for profile in sorted(profiles - open_profiles - decided):
            notes.append(self._decide(tx, rollout_id, profile, policy))
        return not open_profiles, notes

    def _start_trial(
        self, tx: Connection, rollout_id: str, device_id: str, rank: int, policy: Policy
    ) -> None:
        """Point the canary at candidate `rank` (its own generation) and wait for its benchmark."""
        key = (rollout_id, device_id, rank)
        found = sq.trial(tx, key)
        generation = self.rollouts.point_device(
            tx, rollout_id, device_id, found["sha256"], threads=found["threads"], fallback=None
        )
        ts = self.rollouts.clock()
        move_trial(tx, key, T.RUNNING, ts=ts, generation=generation, deadline=None)
        wq.set_device(
            tx,
            (rollout_id, device_id),
            generation=generation,
            detail=f"canary: measuring candidate #{rank}",
            updated=ts,
        )

    def _end_trial(
        self,
        tx: Connection,
        rollout_id: str,
        device_id: str,
        rank: int,
        state: TrialState,
        detail: str,
        result: dict[str, Any] | None = None,
    ) -> None:
        """Record a trial's end."""
        move_trial(
            tx,
            (rollout_id, device_id, rank),
            state,
            ts=self.rollouts.clock(),
            detail=detail[:2000],
            result=to_json(result) if result is not None else None,
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
        """End a trial as failed, or queue the same trial again (back to waiting, one attempt
        more; it starts under a new generation) while retries are left."""
        key = (rollout_id, device_id, rank)
        attempts = int(sq.trial(tx, key)["attempts"])
        if retriable and attempts < policy.retries:
            detail = f"attempt {attempts + 1}: {why}"[:2000]
            move_trial(tx, key, T.WAITING, ts=self.rollouts.clock(), retry=True, detail=detail)
        else:
            self._end_trial(tx, rollout_id, device_id, rank, T.FAILED, why)

    def on_event(
        self, tx: Connection, event: Event, report: dict[str, Any] | None, policy: Policy
    ) -> None:
        """Apply a canary's event to the trial of its generation."""
        row = sq.trial_of_generation(
            tx, event.deployment_id or "", event.device_id, event.generation
        )
        if row is None or row[1] in DONE:
            return
        rank = row[0]
        key = (event.deployment_id or "", event.device_id, rank)
        if event.kind == "update" and event.state == "active":
            move_trial(tx, key, T.ACTIVATED, ts=self.rollouts.clock(), detail=event.message[:2000])
        elif event.kind == "error":
            stage = f" (stage {event.stage})" if event.stage else ""
            # Transport failures are retried like in the waves; a self-test verdict is final.
            retriable = event.stage in RETRIABLE_STAGES or event.stage is None
            self._fail_trial(tx, *key, f"{event.message}{stage}", policy, retriable=retriable)
        elif event.kind == "benchmark" and report is not None:
            self._end_trial(tx, *key, T.MEASURED, "benchmarked", report)

    def cancel(self, tx: Connection, rollout_id: str, reason: str) -> None:
        """End every trial not yet finished (the rollout was aborted or rolled back)."""
        cancel_trials(tx, rollout_id, reason[:2000], self.rollouts.clock())

    # ------------------------------------------------------------------ deciding
    def candidates(self, tx: Connection, rollout_id: str, profile: str) -> list[Candidate]:
        """The profile's candidates of this rollout with their trials."""
        out: dict[int, Candidate] = {}
        # What was trialed (sha, threads) decides; the registry adds the recipe and host numbers.
        for rank, sha, threads, recipe, host in sq.trialed_candidates(tx, rollout_id, profile):
            out[rank] = Candidate(rank, sha, recipe or "?", threads, json.loads(host or "{}"))
        for device_id, rank, state, result, detail in sq.profile_trials(tx, rollout_id, profile):
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
                    sq.set_trial(tx, (rollout_id, t.device_id, c.rank), outlier=t.outlier)
        by_rank = {c.rank: c for c in candidates}
        winner = by_rank.get(explanation["winner"]) if explanation["winner"] else None
        fallback = by_rank.get(explanation["fallback"]) if explanation["fallback"] else None
        sq.add_decision(
            tx,
            {
                "rollout_id": rollout_id,
                "profile": profile,
                "winner_rank": winner.rank if winner else None,
                "sha256": winner.sha256 if winner else None,
                "threads": winner.threads if winner else None,
                "fallback_rank": fallback.rank if fallback else None,
                "explanation": to_json(explanation),
                "decided": self.rollouts.clock(),
            },
        )
        # The profile's devices, and its canaries even if since removed or re-profiled.
        members = sq.members(tx, rollout_id, profile, (D.WAITING, D.TRIALING))
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
        rows = sq.decisions(self.rollouts.db.conn, rollout_id)
        for r in rows:
            r["explanation"] = json.loads(r["explanation"])
        return rows

    def trials(self, rollout_id: str) -> list[dict[str, Any]]:
        """Every trial of a rollout (for `rollout status`)."""
        rows = sq.trials(self.rollouts.db.conn, rollout_id)
        for r in rows:
            r["result"] = json.loads(r["result"]) if r["result"] else None
        return rows

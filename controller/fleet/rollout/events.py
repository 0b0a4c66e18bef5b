"""Device events applied to rollout rows: activation, errors and retries, benchmarks and gates.

A part of `Rollouts` (engine.py), called at ingest inside Fleet.record_event's transaction.
"""

from __future__ import annotations

import json
from typing import Any

from agent.protocol import Event
from agent.protocol.schema import encode
from controller.fleet.rollout.evaluators import broken, judge
from controller.fleet.rollout.outliers import EXCUSABLE_GATES, Outlier, classify
from controller.fleet.rollout.policy import RETRIABLE_STAGES, Policy
from controller.fleet.rollout.states import UPDATING, DeviceState, move
from controller.fleet.rollout.waves import WaveSteps
from controller.storage.db import Connection, to_json
from controller.storage.queries import rollouts as rq

D = DeviceState


class DeviceEvents(WaveSteps):
    """What a device's event does to its rollout row (a part of Rollouts)."""

    def on_event(self, tx: Connection, event: Event) -> None:
        """Apply a device event to its rollout row (same transaction as storing the event)."""
        if not event.deployment_id or event.generation is None:
            return
        row = rq.device_for_event(tx, event.deployment_id, event.device_id, event.generation)
        if row is None:
            return  # an old generation (retried since) or an unknown deployment
        state, attempts, baseline, previous, policy_json = row
        policy = Policy.from_json(json.loads(policy_json))
        key = (event.deployment_id, event.device_id)
        ts = self.clock()
        if state == D.TRIALING:
            report = report_dict(event) if event.benchmark is not None else None
            self.selection.on_event(tx, event, report, policy)
            return
        if event.kind == "fallback":
            rq.set_device_columns(tx, key, fell_back=event.message[:2000], updated=ts)
            return
        if state == D.ROLLING_BACK:
            # `idle`: a device with no previous model was told to stop (desired artifact None).
            if event.kind == "update" and event.state in ("active", "idle"):
                move(tx, key, D.ROLLED_BACK, ts=ts, detail=f"back on {_short(previous)}")
            elif event.kind == "error":
                move(tx, key, D.ROLLBACK_FAILED, ts=ts, detail=event.message)
            return
        if state not in UPDATING:
            return
        if event.kind == "update" and event.state == "active":
            move(tx, key, D.ACTIVATED, ts=ts, detail=event.message)
        elif event.kind == "error":
            self._on_error(tx, key, event, attempts, previous, policy)
        elif event.kind == "benchmark" and event.benchmark is not None:
            base = json.loads(baseline) if baseline else None
            self._on_benchmark(tx, key, report_dict(event), base, previous, policy)

    def _on_error(
        self,
        tx: Connection,
        key: tuple[str, str],
        event: Event,
        attempts: int,
        previous: str | None,
        policy: Policy,
    ) -> None:
        """An update error: retried (transport, retries left), or failed for good."""
        ts = self.clock()
        stage = event.stage
        rq.set_device_columns(tx, key, stage=stage)
        if (stage in RETRIABLE_STAGES or stage is None) and attempts < policy.retries:
            move(tx, key, D.RETRYING, ts=ts, detail=f"attempt {attempts + 1}: {event.message}")
        elif stage == "active":
            # Committed, then broke (e.g. its benchmark failed): it serves the new model,
            # so treat it as a gate failure and point it back.
            move(tx, key, D.FAILED, ts=ts, detail=event.message)
            self._roll_back_device(tx, key, previous, policy, committed=True)
        else:
            # The agent kept its previous model and will not retry this generation; its
            # desired state is left alone (pointing it back would cost a needless round
            # trip and benchmark on every failed device).
            move(tx, key, D.FAILED, ts=ts, detail=event.message)

    def _on_benchmark(
        self,
        tx: Connection,
        key: tuple[str, str],
        report: dict[str, Any],
        base: dict[str, Any] | None,
        previous: str | None,
        policy: Policy,
    ) -> None:
        """The post-activation benchmark: gates judged; succeeded, outlier or gate_failed."""
        ts = self.clock()
        verdict = judge(policy.gates, report, base)
        violations = verdict.violations
        rq.set_device_columns(tx, key, result=to_json(report))
        outlier = self._outlier(tx, key, policy, report, base) if violations else None
        if outlier is not None and outlier.explained:
            # The device's conditions explain the breach: not the model's regression.
            rq.set_device_columns(tx, key, outlier=outlier.reason)
            why = f"{'; '.join(violations)}; {outlier.label()}: kept, not a model failure"
            move(tx, key, D.OUTLIER, ts=ts, detail=why)
        elif violations:
            move(tx, key, D.GATE_FAILED, ts=ts, detail="; ".join(violations))
            self._roll_back_device(tx, key, previous, policy, committed=True)
        else:
            move(tx, key, D.SUCCEEDED, ts=ts, detail=verdict.note or "gates passed")

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
        gates = broken(policy.gates, report, baseline)
        if not gates or any(g.metric not in EXCUSABLE_GATES for g in gates):
            return None
        peers = [
            (json.loads(result), json.loads(base) if base else None)
            for result, base in rq.peer_results(tx, key)
        ]
        within = sum(not broken(tuple(gates), r, b) for r, b in peers)
        if len(peers) < 2 or within * 2 <= len(peers):
            return None
        return classify(report, [r for r, _ in peers], baseline=baseline, breached=True)


def report_dict(event: Event) -> dict[str, Any]:
    """The benchmark fields the gates read."""
    assert event.benchmark is not None
    return dict(encode(event.benchmark))


def _short(sha: str | None) -> str:
    """First 12 hex digits, or 'nothing'."""
    return sha[:12] if sha else "nothing"

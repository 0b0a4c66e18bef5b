"""The selection decision: Pareto front of candidates measured on canaries, winner and fallback.

Pure functions over plain dicts, so the rules are unit-tested without a database or a broker
(docs/closed-loop.md, "The selection phase of a rollout").
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from controller.fleet.rollout.outliers import environment_anomaly
from controller.fleet.rollout.policy import Policy

# Metrics compared between candidates, all "lower is better", in tie-break order.
METRICS = ("p95_ms", "energy_mj", "peak_rss_mb", "accuracy_drop")
# Which metric each --objective optimizes.
OBJECTIVE_METRIC = {
    "latency": "p95_ms",
    "energy": "energy_mj",
    "memory": "peak_rss_mb",
    "accuracy": "accuracy_drop",
}
# Values within 5 % of the best count as a tie (benchmark noise on a device is about that).
TIE = 0.05
# A fallback must be meaningfully lighter than the winner: this much less energy per inference.
FALLBACK_MARGIN = 0.05


@dataclass
class Trial:
    """One candidate measured (or not) on one canary."""

    device_id: str
    state: str  # waiting | running | activated | measured | failed | cancelled
    result: dict[str, Any] | None = None
    detail: str = ""
    outlier: str | None = None


@dataclass
class Candidate:
    """One ranked candidate of a profile with its host numbers and its trials."""

    rank: int
    sha256: str
    recipe: str
    threads: int | None
    host: dict[str, Any] = field(default_factory=dict)
    trials: list[Trial] = field(default_factory=list)

    def label(self) -> str:
        """`#2 int8 t4`: rank, recipe and threads."""
        threads = f" t{self.threads}" if self.threads else ""
        return f"#{self.rank} {self.recipe}{threads}"


def accuracy_drop(host: dict[str, Any]) -> float | None:
    """Host accuracy drop in points, else top-1 disagreement in points, else None."""
    drop = host.get("accuracy_drop_points")
    if drop is not None:
        return float(drop)
    agreement = host.get("top1_agreement")
    return (1.0 - float(agreement)) * 100.0 if agreement is not None else None


def flag_outliers(candidates: list[Candidate]) -> dict[str, str]:
    """Canaries with a trial run under conditions unlike the other canaries': device -> reason.

    A flagged canary is left out of every candidate's medians (by `_metrics`), not only of the
    trial that ran hot, so all candidates are compared on the same canaries.
    """
    measured = [t for c in candidates for t in c.trials if t.result is not None]
    flagged: dict[str, str] = {}
    for trial in measured:
        assert trial.result is not None
        peers = [t.result for t in measured if t.device_id != trial.device_id and t.result]
        reason = environment_anomaly(trial.result, peers)
        if reason and trial.device_id not in flagged:
            flagged[trial.device_id] = reason
    for c in candidates:
        for t in c.trials:
            t.outlier = flagged.get(t.device_id)
    return flagged


def drop_lost_canaries(candidates: list[Candidate], notes: list[str]) -> None:
    """Leave out canaries that measured nothing: removed, taken by another rollout, or offline.

    A canary whose every trial was cancelled or timed out says nothing about the candidates;
    requiring it would disqualify all of them.
    """
    trials = [t for c in candidates for t in c.trials]
    lost = {
        d
        for d in {t.device_id for t in trials}
        if all(
            t.state == "cancelled" or (t.state == "failed" and t.detail.startswith("timed out"))
            for t in trials
            if t.device_id == d
        )
    }
    if lost:
        notes.append(f"left out canaries that measured nothing: {', '.join(sorted(lost))}")
        for c in candidates:
            c.trials = [t for t in c.trials if t.device_id not in lost]


def _metrics(candidate: Candidate, notes: list[str]) -> dict[str, float] | None:
    """Median metrics over the candidate's non-outlier measured trials (all, if every one is)."""
    results = [t for t in candidate.trials if t.result is not None]
    if not results:
        return None
    usable = [t for t in results if not t.outlier] or results
    if len(usable) < len(results):
        dropped = ", ".join(f"{t.device_id} ({t.outlier})" for t in results if t.outlier)
        notes.append(f"{candidate.label()}: left out outlier measurements: {dropped}")
    values = {
        "p95_ms": statistics.median(float(t.result["p95_ms"]) for t in usable if t.result),
        "p50_ms": statistics.median(float(t.result["p50_ms"]) for t in usable if t.result),
        "peak_rss_mb": statistics.median(
            float(t.result["peak_rss_mb"]) for t in usable if t.result
        ),
        "energy_mj": statistics.median(
            float(t.result["energy_mj_per_inference"]) for t in usable if t.result
        ),
    }
    drop = accuracy_drop(candidate.host)
    values["accuracy_drop"] = drop if drop is not None else 0.0
    return values


def _report_for_gates(metrics: dict[str, float]) -> dict[str, float]:
    """The medians under the benchmark field names the gates read."""
    return {
        "p95_ms": metrics["p95_ms"],
        "p50_ms": metrics["p50_ms"],
        "peak_rss_mb": metrics["peak_rss_mb"],
        "energy_mj_per_inference": metrics["energy_mj"],
    }


def _dominates(a: dict[str, float], b: dict[str, float]) -> bool:
    """a is no worse than b on every metric and strictly better on one."""
    return all(a[m] <= b[m] for m in METRICS) and any(a[m] < b[m] for m in METRICS)


def _fmt(metrics: dict[str, float]) -> str:
    """`p95 1.23 ms, 4.5 mJ, 56 MB, drop 0.3`."""
    return (
        f"p95 {metrics['p95_ms']:.3f} ms, {metrics['energy_mj']:.3f} mJ, "
        f"{metrics['peak_rss_mb']:.1f} MB, drop {metrics['accuracy_drop']:.2f}"
    )


def decide(
    candidates: list[Candidate], policy: Policy, *, fallback_budget_ms: float | None = None
) -> dict[str, Any]:
    """Judge every candidate; return the explanation with `winner` and `fallback` ranks (or None).

    Each candidate entry has `verdict` (won | front | dominated | gate | failed | accuracy |
    unmeasured | fallback) and `why`, the sentence `models explain` prints.
    """
    notes: list[str] = []
    drop_lost_canaries(candidates, notes)
    flag_outliers(candidates)
    entries: dict[int, dict[str, Any]] = {}
    eligible: dict[int, dict[str, float]] = {}
    budget = policy.max_accuracy_drop
    for c in candidates:
        metrics = _metrics(c, notes)
        failed = [t for t in c.trials if t.state == "failed"]
        entry: dict[str, Any] = {
            "rank": c.rank,
            "sha256": c.sha256,
            "recipe": c.recipe,
            "threads": c.threads,
            "label": c.label(),
            "host": c.host,
            "metrics": metrics,
            "trials": [
                {
                    "device_id": t.device_id,
                    "state": t.state,
                    "detail": t.detail,
                    "outlier": t.outlier,
                    "result": t.result,
                }
                for t in c.trials
            ],
        }
        entries[c.rank] = entry
        if failed:
            entry["verdict"] = "failed"
            entry["why"] = "; ".join(f"failed on {t.device_id}: {t.detail}" for t in failed)
            continue
        if metrics is None or any(t.result is None for t in c.trials if t.state != "cancelled"):
            entry["verdict"] = "unmeasured"
            entry["why"] = "not measured on every canary: " + "; ".join(
                f"{t.device_id} {t.state} {t.detail}".strip() for t in c.trials if not t.result
            )
            continue
        drop = accuracy_drop(c.host)
        if budget is not None and drop is not None and drop > budget:
            entry["verdict"] = "accuracy"
            entry["why"] = f"accuracy drop {drop:.2f} points over the budget of {budget:g}"
            continue
        report = _report_for_gates(metrics)
        broken = [v for g in policy.gates if not g.relative if (v := g.violation(report, None))]
        if broken:
            entry["verdict"] = "gate"
            entry["why"] = "; ".join(broken)
            continue
        eligible[c.rank] = metrics
    front = [r for r in eligible if not any(_dominates(eligible[o], eligible[r]) for o in eligible)]
    for rank in eligible:
        if rank not in front:
            by = min(
                (o for o in eligible if _dominates(eligible[o], eligible[rank])),
                key=lambda o: eligible[o]["p95_ms"],
            )
            entries[rank]["verdict"] = "dominated"
            entries[rank]["why"] = (
                f"dominated by {entries[by]['label']}: {_fmt(eligible[by])} "
                f"vs {_fmt(eligible[rank])}"
            )
    winner = _pick(front, eligible, policy.objective)
    if winner is not None:
        objective = OBJECTIVE_METRIC[policy.objective]
        entries[winner]["verdict"] = "won"
        entries[winner]["why"] = (
            f"Pareto-best on {policy.objective} ({objective}) among {len(front)} on the front: "
            f"{_fmt(eligible[winner])}"
        )
        for rank in front:
            if rank != winner:
                entries[rank]["verdict"] = "front"
                entries[rank]["why"] = (
                    f"on the Pareto front but {objective} {eligible[rank][objective]:.3f} vs "
                    f"{eligible[winner][objective]:.3f} for {entries[winner]['label']} "
                    f"(objective {policy.objective}): {_fmt(eligible[rank])}"
                )
    fallback = None
    if policy.fallback and winner is not None:
        fallback, note = _fallback(winner, eligible, entries, fallback_budget_ms)
        notes.append(note)
    return {
        "winner": winner,
        "fallback": fallback,
        "fallback_budget_ms": fallback_budget_ms if fallback is not None else None,
        "objective": policy.objective,
        "front": sorted(front),
        "candidates": [entries[c.rank] for c in candidates],
        "notes": notes,
    }


def _pick(front: list[int], eligible: dict[int, dict[str, float]], objective: str) -> int | None:
    """The front's best on the objective; values within TIE tie, settled by METRICS then rank."""
    if not front:
        return None
    key = OBJECTIVE_METRIC[objective]
    best = min(eligible[r][key] for r in front)
    # abs(): an accuracy drop can be negative (a quantized variant scoring higher).
    tied = [r for r in front if eligible[r][key] - best <= TIE * abs(best) + 1e-12]
    others = [m for m in METRICS if m != key]
    return min(tied, key=lambda r: (*(eligible[r][m] for m in others), r))


def _fallback(
    winner: int,
    eligible: dict[int, dict[str, float]],
    entries: dict[int, dict[str, Any]],
    budget_ms: float | None,
) -> tuple[int | None, str]:
    """The lightest eligible candidate: least energy per inference, below the winner's by a margin.

    Energy per inference is busy cores × time, the work the device does per request. A lighter
    variant degrades less when the device is throttled or its cores are shared, which is when
    the fallback is needed; the fastest variant on an idle canary is often the heaviest.
    """
    if budget_ms is None:
        return None, "no fallback: neither a p95_ms gate nor a profile latency budget to hold"
    limit = eligible[winner]["energy_mj"] * (1 - FALLBACK_MARGIN)
    lighter = [r for r in eligible if r != winner and eligible[r]["energy_mj"] < limit]
    if not lighter:
        return None, (
            f"no fallback: no eligible candidate needs {FALLBACK_MARGIN:.0%} less energy per "
            f"inference than the winner {entries[winner]['label']}"
        )
    rank = min(
        lighter,
        key=lambda r: (eligible[r]["energy_mj"], eligible[r]["peak_rss_mb"], eligible[r]["p95_ms"]),
    )
    entries[rank]["fallback"] = True
    entries[rank]["why"] += (
        f"; shipped as the fallback ({eligible[rank]['energy_mj']:.3f} vs "
        f"{eligible[winner]['energy_mj']:.3f} mJ per inference), switched to when the "
        f"served p95 stays over {budget_ms:g} ms"
    )
    return rank, f"fallback {entries[rank]['label']} for p95 over {budget_ms:g} ms"

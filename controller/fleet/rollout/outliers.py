"""Outlier devices: a slow measurement explained by the device's conditions, not by the model.

A benchmark report carries its `environment` (governor, clock, temperature). A device that runs
hot, throttled or under another governor than its peers measures slow for reasons that have
nothing to do with the model; judging the model on it would roll back a good model or promote
the wrong candidate (docs/closed-loop.md, "Outliers").
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from controller.storage.queries import rollouts as rq

# At or above this SoC temperature boards throttle (Raspberry Pi firmware: 80 °C soft limit;
# Jetson and phone SoCs start near there too).
HOT_C = 80.0
# A current clock below this share of the maximum (or of the peers' median) means throttling or
# a power-saving governor.
CLOCK_FRACTION = 0.85
# Gates a device's conditions can explain (latency and energy); memory does not depend on them.
EXCUSABLE_GATES = frozenset(
    {"p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "energy_mj", "power_w",
     "p50_regression", "p95_regression", "p99_regression", "energy_regression"}
)  # fmt: skip
# Robust z-score (median / MAD × 1.4826) above which a value is an outlier (Iglewicz-Hoaglin).
OUTLIER_Z = 3.5
# MAD floor as a share of the median, so identical peers do not make every small wobble infinite.
MAD_FLOOR = 0.02


@dataclass(frozen=True)
class Outlier:
    """Why a device's measurement is not the model's: `explained` when its conditions say why."""

    reason: str
    explained: bool

    def label(self) -> str:
        """`outlier: <reason>` or `outlier (unexplained): <reason>`."""
        return f"outlier{'' if self.explained else ' (unexplained)'}: {self.reason}"


def _env(report: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The environment dict of a benchmark report (empty when it has none)."""
    env = (report or {}).get("environment")
    return env if isinstance(env, Mapping) else {}


def _number(value: Any) -> float | None:
    """A positive float, or None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def environment_anomaly(
    report: Mapping[str, Any],
    peers: Iterable[Mapping[str, Any]] = (),
    baseline: Mapping[str, Any] | None = None,
) -> str | None:
    """What in this report's conditions differs from normal (peers, its own baseline), or None."""
    env = _env(report)
    peer_envs = [_env(p) for p in peers]
    reasons: list[str] = []
    governor = env.get("governor")
    governors = Counter(e.get("governor") for e in peer_envs if e.get("governor"))
    if governor and governors:
        usual, count = governors.most_common(1)[0]
        if governor != usual and count * 2 > sum(governors.values()):
            reasons.append(f"CPU governor {governor} (peers: {usual})")
    base_governor = _env(baseline).get("governor")
    if governor and base_governor and governor != base_governor and not reasons:
        reasons.append(f"CPU governor {governor} (was {base_governor} for the baseline)")
    clock, top = _number(env.get("cpu_freq_mhz")), _number(env.get("cpu_max_freq_mhz"))
    peer_clocks = [c for e in peer_envs if (c := _number(e.get("cpu_freq_mhz")))]
    # Only under `performance` must the clock sit at its maximum; ondemand/schedutil idle low.
    if clock and top and governor == "performance" and clock < CLOCK_FRACTION * top:
        reasons.append(f"clock {clock:.0f} MHz of {top:.0f} MHz max")
    elif clock and peer_clocks and clock < CLOCK_FRACTION * statistics.median(peer_clocks):
        reasons.append(f"clock {clock:.0f} MHz vs peers' {statistics.median(peer_clocks):.0f} MHz")
    temperature = env.get("temperature_c")
    if isinstance(temperature, int | float) and temperature >= HOT_C:
        reasons.append(f"temperature {temperature:.1f} °C (throttles from {HOT_C:g} °C)")
    return "; ".join(reasons) or None


def robust_z(value: float, peers: list[float]) -> float | None:
    """Robust SDs `value` lies above the peers' median (None with fewer than 3 peers)."""
    if len(peers) < 3:
        return None
    median = statistics.median(peers)
    mad = statistics.median(abs(p - median) for p in peers) * 1.4826
    mad = max(mad, MAD_FLOOR * abs(median), 1e-9)
    return (value - median) / mad


def classify(
    report: Mapping[str, Any],
    peers: list[Mapping[str, Any]],
    *,
    metric: str = "p95_ms",
    baseline: Mapping[str, Any] | None = None,
    breached: bool = False,
) -> Outlier | None:
    """An Outlier when this report is slow for its conditions; None when it is the model's number.

    `breached`: the caller already knows the report broke a gate; then an anomalous environment is
    enough. Otherwise the value must also be a robust outlier among the peers' values.
    """
    anomaly = environment_anomaly(report, peers, baseline)
    value = _number(report.get(metric))
    z = None
    if value is not None:
        z = robust_z(value, [v for p in peers if (v := _number(p.get(metric))) is not None])
    slow = breached or (z is not None and z > OUTLIER_Z)
    if not slow:
        return None
    if anomaly:
        return Outlier(anomaly, explained=True)
    if z is not None and z > OUTLIER_Z:
        return Outlier(f"{metric} {value:.3f} is {z:.1f} robust SDs above its peers", False)
    return None


def fleet_outliers(db: Any, profile: str | None = None) -> list[dict[str, Any]]:
    """Devices whose newest benchmark of their current model is an outlier among their profile.

    `db` is the controller's Database. Peers are the other devices of the same profile on the
    same model, each with its newest benchmark of it.
    """
    rows = rq.latest_benchmarks(db.conn, profile)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        r["report"] = json.loads(r["report"])
        groups.setdefault((r["profile"] or "", r["model_sha256"]), []).append(r)
    out = []
    for (group_profile, sha), members in sorted(groups.items()):
        for r in members:
            peers = [m["report"] for m in members if m is not r]
            verdict = classify(r["report"], peers)
            if verdict is None:
                continue
            values = [float(p["p95_ms"]) for p in peers]
            out.append(
                {
                    "device_id": r["device_id"],
                    "profile": group_profile,
                    "model_sha256": sha,
                    "p95_ms": float(r["report"]["p95_ms"]),
                    "peers_p95_ms": statistics.median(values) if values else None,
                    "peers": len(peers),
                    "explained": verdict.explained,
                    "reason": verdict.reason,
                }
            )
    return out

"""Rollout policy: waves, failure threshold, performance gates, timeouts; parsed strictly."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from controller.errors import FleetError


class PolicyError(FleetError):
    """A wave list, threshold, gate or duration the operator wrote that we cannot accept."""


# Benchmark fields a gate may name (BenchmarkReport); `<name>_regression` compares the same field
# with the previous model's baseline on the same device.
GATE_METRICS: dict[str, str] = {
    "p50_ms": "p50_ms",
    "p90_ms": "p90_ms",
    "p95_ms": "p95_ms",
    "p99_ms": "p99_ms",
    "mean_ms": "mean_ms",
    "peak_rss_mb": "peak_rss_mb",
    "power_w": "power_w",
    "energy_mj": "energy_mj_per_inference",
}
REGRESSION_METRICS: dict[str, str] = {
    "p50_regression": "p50_ms",
    "p95_regression": "p95_ms",
    "p99_regression": "p99_ms",
    "peak_rss_regression": "peak_rss_mb",
    "energy_regression": "energy_mj_per_inference",
}

# Update stages where a failure is worth retrying (transport), unlike a self-test verdict.
RETRIABLE_STAGES = frozenset({"fetching", "verifying", "idle"})
# What the selection phase optimizes among the Pareto-best candidates (docs/closed-loop.md).
OBJECTIVES = ("latency", "energy", "memory", "accuracy")

_GATE_RE = re.compile(r"^\s*([a-z0-9_]+)\s*<=\s*([0-9]*\.?[0-9]+)\s*(%?)\s*$")
_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass(frozen=True)
class Wave:
    """A cumulative wave size: a percentage of the target devices, or a device count."""

    percent: float | None = None
    count: int | None = None

    def size(self, total: int) -> int:
        """Cumulative number of devices this wave covers (at least 1 when there are devices)."""
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        return min(total, max(1 if total else 0, math.ceil(total * self.percent / 100.0)))

    def label(self) -> str:
        """How the operator wrote it."""
        return f"{self.count}d" if self.count is not None else f"{self.percent:g}%"


@dataclass(frozen=True)
class Threshold:
    """Most failures tolerated: a percentage of executed devices, or an absolute count."""

    percent: float | None = None
    count: int | None = None

    def exceeded(self, failures: int, executed: int) -> bool:
        """True when `failures` out of `executed` passes the threshold."""
        if self.count is not None:
            return failures > self.count
        assert self.percent is not None
        return executed > 0 and failures * 100.0 / executed > self.percent

    def label(self) -> str:
        """How the operator wrote it."""
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


@dataclass(frozen=True)
class Gate:
    """`metric <= limit`: an absolute budget, or a relative regression against the baseline."""

    metric: str
    limit: float

    @property
    def relative(self) -> bool:
        """True for `*_regression` gates (limit is a percentage)."""
        return self.metric in REGRESSION_METRICS

    def label(self) -> str:
        """How the operator wrote it."""
        return f"{self.metric}<={self.limit:g}{'%' if self.relative else ''}"

    def violation(self, report: dict[str, Any], baseline: dict[str, Any] | None) -> str | None:
        """Why this benchmark breaks the gate, or None when it passes (or cannot be judged)."""
        if self.relative:
            key = REGRESSION_METRICS[self.metric]
            if baseline is None or not baseline.get(key):
                return None  # no baseline: recorded as unjudged by the caller
            change = (float(report[key]) / float(baseline[key]) - 1.0) * 100.0
            if change > self.limit:
                return (
                    f"{key} {float(report[key]):.3f} is {change:+.1f}% vs baseline "
                    f"{float(baseline[key]):.3f} (gate {self.label()})"
                )
            return None
        value = float(report[GATE_METRICS[self.metric]])
        if value > self.limit:
            return (
                f"{GATE_METRICS[self.metric]} {value:.3f} over {self.limit:g} (gate {self.label()})"
            )
        return None


@dataclass(frozen=True)
class Policy:
    """Everything that decides how a rollout proceeds; stored as JSON with the rollout."""

    waves: tuple[Wave, ...] = (Wave(percent=100.0),)
    max_failures: Threshold = field(default_factory=lambda: Threshold(percent=0.0))
    min_executed: int = 1
    gates: tuple[Gate, ...] = ()
    device_timeout_s: float = 600.0
    retries: int = 0
    benchmark_runs: int = 50
    # Closed loop (docs/closed-loop.md): measure the top `candidates` per profile on `canaries`
    # devices first and promote the Pareto-best on `objective`; ship a fallback with `fallback`.
    candidates: int = 0
    canaries: int = 1
    objective: str = "latency"
    fallback: bool = False
    fallback_window_s: float = 60.0
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        """Check the combination (each part was checked when parsed)."""
        if not self.waves:
            raise PolicyError("--waves: at least one wave is needed")
        if self.min_executed < 1:
            raise PolicyError(f"--min-executed: must be >= 1, got {self.min_executed}")
        if self.retries < 0:
            raise PolicyError(f"--retries: must be >= 0, got {self.retries}")
        if self.device_timeout_s <= 0:
            raise PolicyError("--device-timeout: must be > 0")
        if self.benchmark_runs < 1:
            raise PolicyError(f"--benchmark-runs: must be >= 1, got {self.benchmark_runs}")
        if self.candidates < 0 or self.candidates == 1:
            raise PolicyError(
                f"--candidates: must be 2 or more (0 = no selection), got {self.candidates}"
            )
        if self.canaries < 1:
            raise PolicyError(f"--canaries: must be >= 1, got {self.canaries}")
        if self.objective not in OBJECTIVES:
            raise PolicyError(
                f"--objective: {self.objective!r} is not one of {', '.join(OBJECTIVES)}"
            )
        if self.fallback and not self.candidates:
            raise PolicyError(
                "--fallback: needs --candidates (the fallback is a measured candidate)"
            )
        if not 1.0 <= self.fallback_window_s <= 86400.0:
            raise PolicyError(
                f"--fallback-window: must be 1 s..24 h, got {self.fallback_window_s:g} s"
            )
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise PolicyError(f"--max-accuracy-drop: must be >= 0, got {self.max_accuracy_drop}")

    @property
    def needs_baseline(self) -> bool:
        """True when a gate compares against the previous model's measurement."""
        return any(g.relative for g in self.gates)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (stored in deployments.policy)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Policy:
        """Inverse of to_json."""
        if not data:
            return cls()
        return cls(
            waves=tuple(Wave(**w) for w in data["waves"]),
            max_failures=Threshold(**data["max_failures"]),
            min_executed=int(data["min_executed"]),
            gates=tuple(Gate(**g) for g in data["gates"]),
            device_timeout_s=float(data["device_timeout_s"]),
            retries=int(data["retries"]),
            benchmark_runs=int(data.get("benchmark_runs", 50)),
            candidates=int(data.get("candidates", 0)),
            canaries=int(data.get("canaries", 1)),
            objective=str(data.get("objective", "latency")),
            fallback=bool(data.get("fallback", False)),
            fallback_window_s=float(data.get("fallback_window_s", 60.0)),
            max_accuracy_drop=data.get("max_accuracy_drop"),
        )

    def describe(self) -> dict[str, Any]:
        """Human-readable summary for `rollout status`."""
        return {
            "waves": [w.label() for w in self.waves],
            "max_failures": self.max_failures.label(),
            "min_executed": self.min_executed,
            "gates": [g.label() for g in self.gates],
            "device_timeout_s": self.device_timeout_s,
            "retries": self.retries,
            **(
                {
                    "candidates": self.candidates,
                    "canaries": self.canaries,
                    "objective": self.objective,
                    "fallback": self.fallback,
                    "fallback_window_s": self.fallback_window_s,
                    "max_accuracy_drop": self.max_accuracy_drop,
                }
                if self.candidates
                else {}
            ),
        }


def parse_waves(text: str) -> tuple[Wave, ...]:
    """`10,50,100` (percent), `10%,100%`, or device counts `1d,10d,100%`; strictly increasing."""
    waves: list[Wave] = []
    for raw in text.split(","):
        item = raw.strip()
        try:
            if item.endswith("d"):
                wave = Wave(count=int(item[:-1]))
                if wave.count is not None and wave.count < 1:
                    raise ValueError
            else:
                pct = float(item.rstrip("%"))
                if not 0 < pct <= 100:
                    raise ValueError
                wave = Wave(percent=pct)
        except ValueError:
            raise PolicyError(
                f"--waves: {item!r} is not a percentage in (0, 100] or a device count like '5d'"
            ) from None
        waves.append(wave)
    if not waves:
        raise PolicyError("--waves: empty")
    for kind in ("percent", "count"):
        sizes = [getattr(w, kind) for w in waves if getattr(w, kind) is not None]
        if sizes != sorted(set(sizes)):
            raise PolicyError(f"--waves: {text!r} must grow strictly from wave to wave")
    if waves[-1].percent != 100.0:
        waves.append(Wave(percent=100.0))  # a rollout always ends covering every target
    return tuple(waves)


def parse_threshold(text: str) -> Threshold:
    """`5%` (of executed devices) or `3` (devices)."""
    item = text.strip()
    try:
        if item.endswith("%"):
            pct = float(item[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return Threshold(percent=pct)
        count = int(item)
        if count < 0:
            raise ValueError
        return Threshold(count=count)
    except ValueError:
        raise PolicyError(
            f"--max-failures: {text!r} is not a percentage like '5%' or a count like '3'"
        ) from None


def parse_gate(text: str) -> Gate:
    """`p95_ms<=40`, `peak_rss_mb<=300`, `p95_regression<=10%`."""
    match = _GATE_RE.match(text)
    if not match:
        raise PolicyError(f"--gate: {text!r} is not of the form METRIC<=NUMBER[%]")
    metric, number, pct = match.group(1), float(match.group(2)), match.group(3)
    if not math.isfinite(number):
        raise PolicyError(f"--gate: {text!r}: the limit is too large")
    if metric in REGRESSION_METRICS:
        if not pct:
            raise PolicyError(f"--gate: {text!r}: a regression gate takes a percentage, e.g. 10%")
    elif metric in GATE_METRICS:
        if pct:
            raise PolicyError(f"--gate: {text!r}: {metric} is absolute; drop the '%'")
    else:
        known = ", ".join([*GATE_METRICS, *REGRESSION_METRICS])
        raise PolicyError(f"--gate: unknown metric {metric!r} (known: {known})")
    return Gate(metric=metric, limit=number)


def parse_duration(text: str, option: str = "--device-timeout") -> float:
    """`90`, `90s`, `10m`, `1h`, `500ms` → seconds."""
    match = _DURATION_RE.match(text)
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)] if match else 0.0
    if not 0 < seconds < math.inf:  # 400 nines overflow to inf: never times out
        raise PolicyError(f"{option}: {text!r} is not a duration like 90s, 10m or 1h")
    return seconds


def policy_from_options(
    *,
    waves: str,
    max_failures: str,
    min_executed: int,
    gates: list[str] | tuple[str, ...],
    device_timeout: str,
    retries: int,
    benchmark_runs: int,
    candidates: int = 0,
    canaries: int = 1,
    objective: str = "latency",
    fallback: bool = False,
    fallback_window: str = "60s",
    max_accuracy_drop: float | None = None,
) -> Policy:
    """A Policy from `rollout start`'s options as written (CLI and HTTP API alike)."""
    return Policy(
        waves=parse_waves(waves),
        max_failures=parse_threshold(max_failures),
        min_executed=min_executed,
        gates=tuple(parse_gate(g) for g in gates),
        device_timeout_s=parse_duration(device_timeout),
        retries=retries,
        benchmark_runs=benchmark_runs,
        candidates=candidates,
        canaries=canaries,
        objective=objective,
        fallback=fallback,
        fallback_window_s=parse_duration(fallback_window, "--fallback-window"),
        max_accuracy_drop=max_accuracy_drop,
    )

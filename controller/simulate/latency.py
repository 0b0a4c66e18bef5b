"""Update latency of simulated devices: a fixed-bucket histogram that merges across processes.

Each device's update time (its desired state received → its verdict, active or failed) goes
into one of a fixed set of log-spaced buckets, so a process keeps ~60 integers whatever its
device count, and the shards of a sharded simulation add their buckets up (a quantile of the
merged buckets is the quantile of all devices, to the bucket's width: ±12 %).
"""

from __future__ import annotations

import bisect
import math
from typing import Any

# Bucket upper bounds in seconds: 10 ms to ~1 h, each 1.25× the one below.
_RATIO = 1.25
BOUNDS_S: tuple[float, ...] = tuple(0.01 * _RATIO**i for i in range(58))


class LatencyHistogram:
    """Counts per bucket plus count, sum and max, in seconds."""

    __slots__ = ("buckets", "count", "max_s", "sum_s")

    def __init__(self) -> None:
        """Empty."""
        self.buckets = [0] * (len(BOUNDS_S) + 1)  # the last one: above the largest bound
        self.count = 0
        self.sum_s = 0.0
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        """Count one update that took `seconds`."""
        seconds = max(0.0, seconds)
        self.buckets[bisect.bisect_left(BOUNDS_S, seconds)] += 1
        self.count += 1
        self.sum_s += seconds
        self.max_s = max(self.max_s, seconds)

    def to_json(self) -> dict[str, Any]:
        """The raw figures (what a shard sends its parent)."""
        return {"buckets": self.buckets, "count": self.count, "sum_s": self.sum_s,
                "max_s": self.max_s}  # fmt: skip

    @classmethod
    def merged(cls, parts: list[dict[str, Any]]) -> LatencyHistogram:
        """The histogram of several shards' to_json() figures."""
        out = cls()
        for part in parts:
            out.buckets = [a + b for a, b in zip(out.buckets, part["buckets"], strict=True)]
            out.count += part["count"]
            out.sum_s += part["sum_s"]
            out.max_s = max(out.max_s, part["max_s"])
        return out

    def quantile(self, q: float) -> float:
        """The upper bound of the bucket holding quantile `q` (the max for the top bucket)."""
        if not self.count:
            return math.nan
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank and n:
                return min(BOUNDS_S[i], self.max_s) if i < len(BOUNDS_S) else self.max_s
        return self.max_s

    def summary(self) -> dict[str, Any]:
        """count, mean, p50, p95, p99, max in seconds (None without updates): JSON-ready."""
        if not self.count:
            return {"count": 0, "mean_s": None, "p50_s": None, "p95_s": None, "p99_s": None,
                    "max_s": None}  # fmt: skip
        return {
            "count": self.count,
            "mean_s": round(self.sum_s / self.count, 3),
            "p50_s": round(self.quantile(0.50), 3),
            "p95_s": round(self.quantile(0.95), 3),
            "p99_s": round(self.quantile(0.99), 3),
            "max_s": round(self.max_s, 3),
        }

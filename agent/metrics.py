"""Serving metrics of the agent: exact interval latency statistics and process figures.

`ServingMetrics` is the inference service's observer: every served request, interpreter invoke
and error is counted here, and the telemetry reporter takes one `IntervalStats` per telemetry
interval with `snapshot_and_reset()`. Percentiles are computed exactly like agent/benchmark.py
(numpy's default linear interpolation), so a served p99 and a benchmark p99 mean the same thing.
"""

from __future__ import annotations

import bisect
import random
import threading
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import psutil

from agent.memory import peak_rss_mb, rss_mb
from agent.protocol import BUCKET_COUNT, LATENCY_BUCKETS_MS, LatencyStats

# Raw latencies kept per interval for exact percentiles: 100,000 doubles are 800 KB, and cover
# 10,000 requests/s at the default 10 s telemetry interval. Past that, buckets, mean and max stay
# exact and the percentiles come from a uniform reservoir sample of this size (Algorithm R), whose
# p99 is within a fraction of a percentile rank of the true one (1,000 samples above p99).
MAX_EXACT_LATENCIES = 100_000


_INF = float("inf")


def _bucket_counts(latencies: np.ndarray) -> np.ndarray:
    """Non-negative counts per LATENCY_BUCKETS_MS bound (latency <= bound), then +Inf."""
    # side="left": the first bound >= latency, so a latency equal to a bound counts in it.
    index = np.searchsorted(np.asarray(LATENCY_BUCKETS_MS), latencies, side="left")
    return np.bincount(index, minlength=BUCKET_COUNT)


def _ordered_percentiles(sample: np.ndarray, max_ms: float) -> tuple[float, float, float]:
    """p50, p90, p99 as agent/benchmark.py computes them, clamped to p50 <= p90 <= p99 <= max.

    The clamp only guards against one-ulp rounding in the interpolation (and a reservoir sample
    whose values all lie below the exact max cannot exceed it anyway).
    """
    p50, p90, p99 = (float(v) for v in np.percentile(sample, [50, 90, 99]))
    p99 = min(p99, max_ms)
    p90 = min(p90, p99)
    return min(p50, p90), p90, p99


def _checked(latencies: np.ndarray) -> np.ndarray:
    """The latencies as float64, refusing NaN, infinities and negative values."""
    if latencies.size and not (np.isfinite(latencies).all() and (latencies >= 0).all()):
        raise ValueError("latencies must be finite and >= 0")
    return latencies


def latency_stats(latencies_ms: Sequence[float] | np.ndarray) -> LatencyStats:
    """Exact p50/p90/p99 (as agent/benchmark.py), mean, max and bucket counts of latencies."""
    values = _checked(np.asarray(latencies_ms, dtype=np.float64))
    if values.size == 0:
        raise ValueError("latency_stats needs at least one latency")
    max_ms = float(values.max())
    p50, p90, p99 = _ordered_percentiles(values, max_ms)
    return LatencyStats(
        count=int(values.size),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=float(values.mean()),
        max_ms=max_ms,
        buckets=tuple(int(n) for n in _bucket_counts(values)),
    )


@dataclass(frozen=True)
class IntervalStats:
    """What the inference service did between two snapshots (monotonic start and end)."""

    served: LatencyStats | None
    requests: int
    invocations: int
    cache_hits: int
    errors: int
    started: float
    ended: float
    # True when the interval exceeded MAX_EXACT_LATENCIES requests: percentiles are then from a
    # uniform reservoir sample (buckets, mean, max and counts stay exact).
    sampled: bool = False

    @property
    def seconds(self) -> float:
        """Length of the interval in seconds."""
        return max(0.0, self.ended - self.started)


class ServingMetrics:
    """Thread-safe InferenceObserver: counts requests, invokes and errors per interval."""

    def __init__(self, max_exact: int = MAX_EXACT_LATENCIES, *, seed: int | None = None) -> None:
        """Start the first interval now; `max_exact` bounds the raw latencies kept."""
        if max_exact < 1:
            raise ValueError(f"max_exact must be >= 1, got {max_exact}")
        self._max_exact = max_exact
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        """Begin an empty interval at `now` (caller holds the lock or owns the object)."""
        self._latencies: array[float] = array("d")
        self._requests = 0
        self._invocations = 0
        self._cache_hits = 0
        self._errors = 0
        self._started = now
        # Exact aggregates kept only once the interval overflows the raw latency buffer.
        self._overflow_buckets: list[int] | None = None
        self._overflow_sum = 0.0
        self._overflow_max = 0.0

    # ------------------------------------------------------------------ hot path

    def observe_request(self, latency_ms: float, *, cache_hit: bool = False) -> None:
        """Record one served request and its end-to-end latency (a lock and an append).

        A latency that is negative, NaN or infinite is a caller bug: it is counted as an error
        instead, so one bad value cannot spoil the interval's statistics.
        """
        if not 0.0 <= latency_ms < _INF:
            self.observe_error()
            return
        with self._lock:
            self._requests += 1
            if cache_hit:
                self._cache_hits += 1
            if self._requests <= self._max_exact:
                self._latencies.append(latency_ms)
            else:
                self._observe_past_capacity(latency_ms)

    def observe_invocation(self, batch_size: int) -> None:
        """Record one interpreter invoke (serving `batch_size` requests)."""
        with self._lock:
            self._invocations += 1

    def observe_error(self) -> None:
        """Record one request that failed."""
        with self._lock:
            self._errors += 1

    def _observe_past_capacity(self, latency_ms: float) -> None:
        """Exact buckets/sum/max plus reservoir sampling once the buffer is full (lock held)."""
        if self._overflow_buckets is None:
            # Once per interval: freeze the exact aggregates of the buffer before samples in it
            # start being replaced.
            full = np.frombuffer(self._latencies, dtype=np.float64)
            self._overflow_buckets = [int(n) for n in _bucket_counts(full)]
            self._overflow_sum = float(full.sum())
            self._overflow_max = float(full.max())
        self._overflow_buckets[bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms)] += 1
        self._overflow_sum += latency_ms
        if latency_ms > self._overflow_max:
            self._overflow_max = latency_ms
        # Algorithm R: the n-th value replaces a random slot with probability max_exact / n.
        slot = self._random.randrange(self._requests)
        if slot < self._max_exact:
            self._latencies[slot] = latency_ms

    # ------------------------------------------------------------------ interval

    def snapshot_and_reset(self) -> IntervalStats:
        """Close the current interval, start the next one, and return the closed one's stats."""
        now = time.monotonic()
        with self._lock:
            latencies = self._latencies
            requests, invocations = self._requests, self._invocations
            cache_hits, errors, started = self._cache_hits, self._errors, self._started
            overflow = self._overflow_buckets
            overflow_sum, overflow_max = self._overflow_sum, self._overflow_max
            self._reset(now)
        # The statistics are computed outside the lock: the service never waits for them.
        served = None
        if requests:
            values = np.frombuffer(latencies, dtype=np.float64)
            if overflow is None:
                served = latency_stats(values)
            else:
                p50, p90, p99 = _ordered_percentiles(values, overflow_max)
                served = LatencyStats(
                    count=requests,
                    p50_ms=p50,
                    p90_ms=p90,
                    p99_ms=p99,
                    mean_ms=overflow_sum / requests,
                    max_ms=overflow_max,
                    buckets=tuple(overflow),
                )
        return IntervalStats(
            served=served,
            requests=requests,
            invocations=invocations,
            cache_hits=cache_hits,
            errors=errors,
            started=started,
            ended=now,
            sampled=overflow is not None,
        )


@dataclass(frozen=True)
class ProcessSample:
    """Memory and CPU of the agent process at one moment."""

    rss_mb: float
    peak_rss_mb: float
    # psutil's convention: 100 = one core fully busy, so it can exceed 100 on a multi-core CPU.
    cpu_percent: float


class ProcessSampler:
    """RSS, peak RSS (VmHWM, see agent/memory.py) and CPU % of this process since the last call."""

    def __init__(self) -> None:
        """Prime psutil's CPU counter so the first sample covers the time since construction."""
        self._process = psutil.Process()
        self._process.cpu_percent(interval=None)

    def sample(self) -> ProcessSample:
        """The current figures; CPU % is averaged over the time since the previous sample."""
        cpu = self._process.cpu_percent(interval=None)
        return ProcessSample(rss_mb=rss_mb(), peak_rss_mb=peak_rss_mb(), cpu_percent=max(0.0, cpu))

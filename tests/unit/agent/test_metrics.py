"""Tests for agent.metrics: exact interval statistics, thread safety, bounded memory."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest

from agent.metrics import (
    IntervalStats,
    ProcessSampler,
    ServingMetrics,
    latency_stats,
)
from agent.protocol import BUCKET_COUNT, LATENCY_BUCKETS_MS, LatencyStats

pytestmark = pytest.mark.agent


def expected_buckets(values: np.ndarray) -> list[int]:
    """Bucket counts computed the slow, obvious way: first bound >= latency, else +Inf."""
    counts = [0] * BUCKET_COUNT
    for v in values:
        index = next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if v <= b), BUCKET_COUNT - 1)
        counts[index] += 1
    return counts


@pytest.mark.parametrize("n", [1, 2, 7, 100, 5_001])
def test_latency_stats_match_numpy_and_benchmark(n: int) -> None:
    """p50/p90/p99 equal np.percentile's (agent/benchmark.py's method); mean, max exact."""
    rng = np.random.default_rng(n)
    values = rng.lognormal(mean=0.5, sigma=1.2, size=n)
    stats = latency_stats(values.tolist())
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    assert (stats.p50_ms, stats.p90_ms, stats.p99_ms) == pytest.approx((p50, p90, p99), rel=1e-12)
    assert stats.mean_ms == pytest.approx(values.mean(), rel=1e-12)
    assert stats.max_ms == values.max()
    assert stats.count == n
    assert list(stats.buckets) == expected_buckets(values)
    assert sum(stats.buckets) == n


def test_bucket_edges_count_latency_equal_to_a_bound_in_that_bound() -> None:
    """latency <= bound: 1.0 goes to the 1.0 bucket, 1.0000001 to 1.5, huge ones to +Inf."""
    stats = latency_stats([0.0, 0.1, 1.0, 1.0000001, LATENCY_BUCKETS_MS[-1], 1e9])
    one = LATENCY_BUCKETS_MS.index(1.0)
    assert stats.buckets[0] == 2  # 0.0 and 0.1
    assert stats.buckets[one] == 1
    assert stats.buckets[one + 1] == 1
    assert stats.buckets[-2] == 1  # exactly the last bound
    assert stats.buckets[-1] == 1  # +Inf


def test_latency_stats_refuses_empty_and_invalid() -> None:
    """No latencies is not a statistic; NaN and negative values are caller bugs."""
    with pytest.raises(ValueError, match="at least one"):
        latency_stats([])
    with pytest.raises(ValueError, match="finite"):
        latency_stats([1.0, float("nan")])
    with pytest.raises(ValueError, match=">= 0"):
        latency_stats([-1.0])


def test_interval_snapshot_counts_and_resets() -> None:
    """One snapshot holds everything observed since the last; the next interval starts empty."""
    metrics = ServingMetrics()
    for latency in (1.0, 2.0, 3.0, 4.0):
        metrics.observe_request(latency, cache_hit=latency == 4.0)
    metrics.observe_invocation(2)
    metrics.observe_invocation(1)
    metrics.observe_error()
    first = metrics.snapshot_and_reset()
    assert isinstance(first, IntervalStats)
    assert (first.requests, first.invocations, first.cache_hits, first.errors) == (4, 2, 1, 1)
    assert first.served == latency_stats([1.0, 2.0, 3.0, 4.0])
    assert first.ended >= first.started and not first.sampled

    second = metrics.snapshot_and_reset()
    assert second.served is None
    assert (second.requests, second.invocations, second.cache_hits, second.errors) == (0, 0, 0, 0)
    assert second.started == first.ended  # intervals tile: no gap, no overlap


def test_invalid_latency_is_counted_as_an_error_not_a_statistic() -> None:
    """A NaN or negative latency must not make the whole interval's record unbuildable."""
    metrics = ServingMetrics()
    metrics.observe_request(float("nan"))
    metrics.observe_request(-3.0)
    metrics.observe_request(float("inf"))
    metrics.observe_request(2.0)
    stats = metrics.snapshot_and_reset()
    assert stats.errors == 3
    assert stats.requests == 1
    assert stats.served is not None and stats.served.max_ms == 2.0


def test_concurrent_observers_lose_nothing() -> None:
    """N threads observing while another snapshots: the sum over snapshots is exact."""
    metrics = ServingMetrics()
    threads_n, per_thread = 8, 5_000
    start = threading.Barrier(threads_n + 1)
    snapshots: list[IntervalStats] = []
    done = threading.Event()

    def serve(worker: int) -> None:
        """Observe per_thread requests with latencies that identify the worker."""
        start.wait()
        for i in range(per_thread):
            metrics.observe_request(worker + i / per_thread, cache_hit=i % 10 == 0)
            if i % 4 == 0:
                metrics.observe_invocation(4)
        metrics.observe_error()

    def snapshot() -> None:
        """Take snapshots while the workers run."""
        start.wait()
        while not done.is_set():
            snapshots.append(metrics.snapshot_and_reset())

    workers = [threading.Thread(target=serve, args=(w,)) for w in range(threads_n)]
    taker = threading.Thread(target=snapshot)
    for thread in [*workers, taker]:
        thread.start()
    for thread in workers:
        thread.join()
    done.set()
    taker.join()
    snapshots.append(metrics.snapshot_and_reset())

    total = threads_n * per_thread
    assert sum(s.requests for s in snapshots) == total
    assert sum(s.served.count for s in snapshots if s.served) == total
    assert sum(s.cache_hits for s in snapshots) == total // 10
    assert sum(s.invocations for s in snapshots) == threads_n * (per_thread // 4)
    assert sum(s.errors for s in snapshots) == threads_n
    merged = np.sum([s.served.buckets for s in snapshots if s.served], axis=0)
    all_values = np.array([w + i / per_thread for w in range(threads_n) for i in range(per_thread)])
    assert merged.tolist() == expected_buckets(all_values)
    for earlier, later in itertools.pairwise(snapshots):
        assert later.started == earlier.ended


def test_past_capacity_buckets_mean_max_stay_exact_percentiles_sampled() -> None:
    """Memory is bounded: past max_exact the buffer is a reservoir, aggregates stay exact."""
    rng = np.random.default_rng(7)
    values = rng.exponential(scale=3.0, size=50_000)
    values[12_345] = 999.0  # the maximum arrives long after the buffer filled
    metrics = ServingMetrics(max_exact=5_000, seed=1)
    for v in values:
        metrics.observe_request(float(v))
    assert len(metrics._latencies) == 5_000  # bounded memory
    stats = metrics.snapshot_and_reset()
    served = stats.served
    assert served is not None and stats.sampled
    assert served.count == 50_000 == stats.requests
    assert list(served.buckets) == expected_buckets(values)
    assert served.mean_ms == pytest.approx(values.mean(), rel=1e-9)
    assert served.max_ms == 999.0
    # A uniform sample of 5,000 puts each percentile within a few rank-percent of the truth.
    for q, got in ((50, served.p50_ms), (90, served.p90_ms), (99, served.p99_ms)):
        rank = (values < got).mean() * 100
        assert abs(rank - q) < 2.0, (q, rank)
    assert served.p50_ms <= served.p90_ms <= served.p99_ms <= served.max_ms


def test_single_request_interval_is_consistent() -> None:
    """One request: every percentile is that latency, and it validates as LatencyStats."""
    metrics = ServingMetrics()
    metrics.observe_request(0.25)
    served = metrics.snapshot_and_reset().served
    assert isinstance(served, LatencyStats)
    assert served.p50_ms == served.p99_ms == served.max_ms == served.mean_ms == 0.25


def test_observe_request_cost_is_small() -> None:
    """The hot path stays a lock and an append: far below an inference (< 20 µs per call)."""
    metrics = ServingMetrics()
    observe = metrics.observe_request
    calls = 20_000
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter_ns()
        for _ in range(calls):
            observe(1.0)
        best = min(best, (time.perf_counter_ns() - started) / calls)
    assert best < 20_000, f"observe_request costs {best:.0f} ns"


def test_process_sampler_reports_this_process() -> None:
    """RSS within peak RSS, both plausible; CPU % reflects work done since the last sample."""
    sampler = ProcessSampler()
    started = time.monotonic()
    idle = sampler.sample()
    assert 1.0 < idle.rss_mb <= idle.peak_rss_mb
    burned = 0.2
    deadline = time.process_time() + burned
    while time.process_time() < deadline:
        pass  # burn CPU so the next sample sees a busy process
    busy = sampler.sample()
    wall = time.monotonic() - started
    # The sampler's interval lies inside `wall`, so it saw at least `burned` CPU-seconds over
    # at most `wall` seconds (less one 10 ms clock tick of /proc's resolution). Judged against
    # the wall time measured here, not a fixed 20 %: on a loaded machine 0.2 s of CPU can take
    # seconds of wall time, and a fixed floor failed there while the sampler was right.
    assert busy.cpu_percent >= 100.0 * (burned - 0.01) / wall
    assert busy.rss_mb <= busy.peak_rss_mb

"""Synthesized self-test and benchmark figures: the simulation's model of a device class."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import firmware_profiles
from agent.protocol import BenchmarkReport

# ---- synthesized measurements (docs/simulate.md, "Benchmark model") -------------------------
MIB = 1024 * 1024
# p50 per MiB of model on a 4-core device: a round figure near the real agent's measurement
# (MobileNetV2 int8, 3.9 MB, 10-13 ms on one x86 thread with litert; bench/RESULTS.md). It is
# a load generator's number, not a prediction for any board.
LATENCY_MS_PER_MB = 10.0
REFERENCE_CORES = 4
# Fixed per-invoke cost (interpreter dispatch), so a 5 KB model is not reported as 0 ms.
LATENCY_FLOOR_MS = 0.05
# Seeded per device and model: a fleet shows spread, and a rerun shows the same numbers.
LATENCY_NOISE = 0.03
# Benchmark distribution relative to p50: an assumed, typical right-skewed shape.
LATENCY_SHAPE = {
    "p90_ms": 1.06,
    "p95_ms": 1.09,
    "p99_ms": 1.18,
    "mean_ms": 1.02,
    "std_ms": 0.04,
    "min_ms": 0.96,
    "max_ms": 1.35,
    "first_inference_ms": 2.5,
}
# Idle agent RSS and per-MB model cost: 45-48 MB idle, +18.5 MB for a 3.94 MB model with
# XNNPACK's repacked weights (bench/RESULTS.md).
RSS_BASE_MB = 46.0
RSS_PER_MODEL_MB = 4.7
# Interpreter init: mmap + allocate; a few ms plus a little per MB.
INIT_BASE_MS = 2.0
INIT_MS_PER_MB = 0.8
# Threads the simulated benchmark uses when the desired state names none (the demo agents use
# 1); the threads used are also the busy cores of the power estimate.
BENCH_THREADS = 1


def synth_figures(
    profile: firmware_profiles.Profile, size: int, key: str, slow: float = 1.0
) -> tuple[float, float]:
    """(p50 ms, peak RSS MB) of a model on a device class: linear in size, inverse in cores."""
    size_mb = size / MIB
    noise = 1.0 + random.Random(key).uniform(-LATENCY_NOISE, LATENCY_NOISE)
    scale = REFERENCE_CORES / profile.cpu.cores
    p50 = (LATENCY_FLOOR_MS + LATENCY_MS_PER_MB * size_mb) * scale * slow * noise
    return p50, RSS_BASE_MB + RSS_PER_MODEL_MB * size_mb


def synth_report(
    profile: firmware_profiles.Profile,
    sha256: str,
    size: int,
    p50: float,
    peak_mb: float,
    *,
    runs: int,
    warmup: int,
    threads: int | None = None,
) -> BenchmarkReport:
    """A complete BenchmarkReport from the profile: shaped latencies, estimated power.

    `threads` (None: BENCH_THREADS) is reported and, capped at the cores, is the busy cores of
    the power estimate: energy per inference shows what more threads cost (`p50` already
    includes their speed-up).
    """
    figures: dict[str, Any] = {
        name: round(p50 * factor, 4) for name, factor in LATENCY_SHAPE.items()
    }
    threads = threads or BENCH_THREADS
    power_w = profile.power.estimate_w(busy_cores=min(threads, profile.cpu.cores))
    return BenchmarkReport(
        model_sha256=sha256,
        runtime=profile.runtime.name,
        runtime_version=profile.runtime.version,
        threads=threads,
        runs=runs,
        warmup=warmup,
        init_ms=round(INIT_BASE_MS + INIT_MS_PER_MB * size / MIB, 3),
        p50_ms=round(p50, 4),
        peak_rss_mb=round(peak_mb, 2),
        rss_mb=round(peak_mb - 0.5, 2),
        power_w=round(power_w, 3),
        energy_mj_per_inference=round(power_w * figures["mean_ms"], 4),
        power_source="estimated:profile",
        power_estimated=True,
        **figures,
    )


def derived_event_id(base: str, suffix: str) -> str:
    """`base-suffix`, hashed down to the protocol's 64 characters when longer (as the daemon)."""
    text = f"{base}-{suffix}"
    if len(text) <= 64:
        return text
    return f"{hashlib.sha256(base.encode()).hexdigest()[:40]}-{suffix}"[:64]

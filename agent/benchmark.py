"""Model benchmark with the same measurement as TFLite's benchmark_model, plus memory and power.

`benchmark_model` loads a file and reports init time, first inference, latency percentiles over
timed runs, peak RSS and energy. `benchmark_interpreter` is the timing loop alone, for a model
the agent already has loaded.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import psutil

from agent.memory import peak_rss_mb
from agent.power import PowerSource, detect_power_source
from agent.runtime import Interpreter, load_interpreter, random_inputs, runtime_info

_MIB = 1024 * 1024  # MB in reports means MiB, as in benchmark_model's memory lines
_HASH_CHUNK = 1024 * 1024  # hash in 1 MiB reads: bounded memory for any model size


class InterpreterBenchmark(TypedDict):
    """benchmark_interpreter's result: BenchmarkResult minus the model and runtime fields."""

    runs: int
    warmup: int
    init_ms: float
    first_inference_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    peak_rss_mb: float
    rss_mb: float
    power_w: float
    energy_mj_per_inference: float
    power_source: str
    power_estimated: bool


@dataclass
class BenchmarkResult:
    """Everything `edgefleet-agent benchmark` and the agent report about one model."""

    model_path: str
    model_sha256: str
    model_bytes: int
    runtime: str
    runtime_version: str
    threads: int | None
    runs: int
    warmup: int
    init_ms: float
    first_inference_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    peak_rss_mb: float
    rss_mb: float
    power_w: float
    energy_mj_per_inference: float
    power_source: str
    power_estimated: bool

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready dict with exactly the dataclass fields."""
        return asdict(self)


def _set_inputs(interpreter: Interpreter, inputs: list[np.ndarray]) -> None:
    """Copy inputs into the input tensors once; they stay put across invokes."""
    details = interpreter.get_input_details()
    if len(inputs) != len(details):
        raise ValueError(f"model has {len(details)} inputs, got {len(inputs)} arrays")
    for detail, array in zip(details, inputs, strict=True):
        interpreter.set_tensor(detail["index"], array)


class BenchmarkCancelled(Exception):
    """The benchmark was stopped from outside (the agent is shutting down)."""


def _timed_invokes(
    interpreter: Interpreter, runs: int, stop: threading.Event | None = None
) -> list[int]:
    """Nanoseconds of each of `runs` invokes; nothing but the clock and invoke in the loop.

    With `stop`, the flag is read between invokes (outside the timed span), so SIGTERM is
    answered after at most one more inference.
    """
    invoke = interpreter.invoke
    clock = time.perf_counter_ns
    samples = [0] * runs
    if stop is None:
        for i in range(runs):
            started = clock()
            invoke()
            samples[i] = clock() - started
        return samples
    stopped = stop.is_set
    for i in range(runs):
        if stopped():
            raise BenchmarkCancelled(f"stopped after {i} of {runs} timed runs")
        started = clock()
        invoke()
        samples[i] = clock() - started
    return samples


def benchmark_interpreter(
    interpreter: Interpreter,
    *,
    runs: int = 50,
    warmup: int = 5,
    inputs: list[np.ndarray] | None = None,
    power_source: PowerSource | None = None,
    seed: int = 0,
    init_ms: float = 0.0,
    stop: threading.Event | None = None,
) -> InterpreterBenchmark:
    """Time one first invoke, `warmup` untimed invokes, then `runs` timed invokes.

    Inputs are set once (random ones from `seed` unless given), as benchmark_model does. Energy
    covers the timed runs only; without power_source, detect_power_source() for one thread.
    init_ms is passed through (the caller's load time; 0.0 = not measured). The caller must
    not use the interpreter from another thread meanwhile: its inputs are overwritten.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    _set_inputs(interpreter, inputs if inputs is not None else random_inputs(interpreter, seed))
    source = power_source if power_source is not None else detect_power_source()

    started = time.perf_counter_ns()
    interpreter.invoke()
    first_ns = time.perf_counter_ns() - started
    for _ in range(warmup):
        if stop is not None and stop.is_set():
            raise BenchmarkCancelled("stopped during warm-up")
        interpreter.invoke()

    process = psutil.Process()
    rss_before = _rss_bytes(process)
    token = source.start()
    try:
        samples = _timed_invokes(interpreter, runs, stop)
    finally:
        energy = source.stop(token)
    rss_after = _rss_bytes(process)
    peak = max(rss_before, rss_after, _max_rss_bytes())

    latency_ms = np.asarray(samples, dtype=np.float64) / 1e6
    p50, p90, p95, p99 = (float(v) for v in np.percentile(latency_ms, [50, 90, 95, 99]))
    return InterpreterBenchmark(
        runs=runs,
        warmup=warmup,
        init_ms=init_ms,
        first_inference_ms=first_ns / 1e6,
        p50_ms=p50,
        p90_ms=p90,
        p95_ms=p95,
        p99_ms=p99,
        mean_ms=float(latency_ms.mean()),
        std_ms=float(latency_ms.std()),  # population std, like benchmark_model's Stat
        min_ms=float(latency_ms.min()),
        max_ms=float(latency_ms.max()),
        peak_rss_mb=peak / _MIB,
        rss_mb=rss_after / _MIB,
        power_w=energy.watts,
        energy_mj_per_inference=energy.joules * 1e3 / runs,
        power_source=energy.source,
        power_estimated=energy.estimated,
    )


def file_sha256(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _rss_bytes(process: psutil.Process) -> int:
    """Current resident set size of this process."""
    return int(process.memory_info().rss)


def _max_rss_bytes() -> int:
    """The kernel's high-water mark of this process image's RSS (catches peaks between samples).

    VmHWM, not ru_maxrss: on Linux ru_maxrss survives execve, so an agent started by a big
    parent would report the parent's peak (agent/memory.py).
    """
    return int(peak_rss_mb() * _MIB)


def benchmark_model(
    path: str | os.PathLike[str],
    *,
    runs: int = 50,
    warmup: int = 5,
    threads: int | None = None,
    power_source: PowerSource | None = None,
) -> BenchmarkResult:
    """Load `path` (timed as init), then benchmark it like TFLite's benchmark_model."""
    model_path = os.fspath(path)
    sha256, size = file_sha256(model_path)
    info = runtime_info()
    process = psutil.Process()

    started = time.perf_counter_ns()
    interpreter = load_interpreter(model_path, num_threads=threads)
    init_ns = time.perf_counter_ns() - started
    rss_after_load = _rss_bytes(process)

    if power_source is None:
        # threads=None lets the runtime choose; the estimate then caps at the usable cores.
        power_source = detect_power_source(threads=threads or os.cpu_count() or 1)
    timing = benchmark_interpreter(
        interpreter, runs=runs, warmup=warmup, power_source=power_source, init_ms=init_ns / 1e6
    )
    timing["peak_rss_mb"] = max(timing["peak_rss_mb"], rss_after_load / _MIB)
    return BenchmarkResult(
        model_path=model_path,
        model_sha256=sha256,
        model_bytes=size,
        runtime=info.name,
        runtime_version=info.version,
        threads=threads,
        **timing,
    )


def _duration(ms: float) -> str:
    """A latency with a unit that keeps 3–4 significant digits (µs below 1 ms)."""
    return f"{ms * 1e3:.2f} µs" if ms < 1.0 else f"{ms:.3f} ms"


def format_result(result: BenchmarkResult) -> str:
    """Human summary in the spirit of benchmark_model's closing lines."""
    r = result
    threads = "runtime default" if r.threads is None else str(r.threads)
    estimated = ", estimated" if r.power_estimated and r.power_source != "estimated" else ""
    rows = [
        ("Model", f"{Path(r.model_path).name} ({r.model_bytes} bytes)"),
        ("sha256", r.model_sha256),
        ("Runtime", f"{r.runtime} {r.runtime_version}, threads: {threads}"),
        ("Init", _duration(r.init_ms)),
        ("First inference", _duration(r.first_inference_ms)),
        ("Runs", f"{r.runs} timed after {r.warmup} warm-up"),
        (
            "Latency",
            " ".join(
                f"{name} {_duration(v)}"
                for name, v in (
                    ("p50", r.p50_ms),
                    ("p90", r.p90_ms),
                    ("p95", r.p95_ms),
                    ("p99", r.p99_ms),
                )
            ),
        ),
        (
            "",
            f"mean {_duration(r.mean_ms)} ± {_duration(r.std_ms)}, "
            f"min {_duration(r.min_ms)}, max {_duration(r.max_ms)}",
        ),
        ("Memory", f"peak RSS {r.peak_rss_mb:.1f} MB, RSS now {r.rss_mb:.1f} MB"),
        (
            "Power",
            f"{r.power_w:.2f} W ({r.power_source}{estimated}), "
            f"{r.energy_mj_per_inference:.4g} mJ/inference",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)

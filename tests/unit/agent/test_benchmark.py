"""Tests for agent.benchmark: result fields, the timed window and the summary table."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any

import numpy as np
import pytest

from agent.benchmark import (
    BenchmarkResult,
    benchmark_interpreter,
    benchmark_model,
    format_result,
)
from agent.power import EnergyReading, EstimatedSource, PowerModel
from agent.runtime import ModelLoadError, runtime_info
from tests.paths import TEST_DATA

pytestmark = pytest.mark.agent

DATA = TEST_DATA

# The wire format (agent/protocol BenchmarkReport) parses these names strictly: keep them exact.
RESULT_FIELDS = [
    "model_path", "model_sha256", "model_bytes", "runtime", "runtime_version", "threads",
    "runs", "warmup", "init_ms", "first_inference_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms",
    "mean_ms", "std_ms", "min_ms", "max_ms", "peak_rss_mb", "rss_mb", "power_w",
    "energy_mj_per_inference", "power_source", "power_estimated",
]  # fmt: skip


class CountingInterpreter:
    """Wraps a real interpreter and counts invokes and set_tensor calls."""

    def __init__(self, inner: Any) -> None:
        """Wrap `inner`."""
        self.inner = inner
        self.invokes = 0
        self.sets = 0

    def invoke(self) -> None:
        """Count, then invoke for real."""
        self.invokes += 1
        self.inner.invoke()

    def set_tensor(self, index: int, value: np.ndarray) -> None:
        """Count, then set for real."""
        self.sets += 1
        self.inner.set_tensor(index, value)

    def __getattr__(self, name: str) -> Any:
        """Everything else goes to the real interpreter."""
        return getattr(self.inner, name)


class RecordingSource:
    """A power source that records how many invokes had happened at start() and stop()."""

    name = "recording"
    estimated = False

    def __init__(self, interpreter: CountingInterpreter) -> None:
        """Watch this interpreter's invoke counter."""
        self.interpreter = interpreter
        self.at_start = self.at_stop = -1

    def start(self) -> object:
        """Note the invoke count."""
        self.at_start = self.interpreter.invokes
        return "token"

    def stop(self, token: object) -> EnergyReading:
        """Note the invoke count; 2 J over 0.5 s."""
        assert token == "token"
        self.at_stop = self.interpreter.invokes
        return EnergyReading(joules=2.0, seconds=0.5, source="recording", estimated=False)


@pytest.fixture
def loaded() -> Any:
    """A real interpreter on the fp32 fixture."""
    from agent.runtime import load_interpreter

    return load_interpreter(DATA / "tiny_fp32.tflite", num_threads=1)


@pytest.mark.parametrize("name", ["tiny_fp32.tflite", "tiny_int8.tflite"])
def test_benchmark_model_fields_are_sane(name: str) -> None:
    """Ordering of percentiles, counts, hash, runtime and memory all hold on a real model."""
    path = DATA / name
    result = benchmark_model(path, runs=30, warmup=3, threads=1, power_source=EstimatedSource())
    assert [f.name for f in dataclasses.fields(BenchmarkResult)] == RESULT_FIELDS
    assert result.model_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert result.model_bytes == path.stat().st_size
    assert (result.runtime, result.runtime_version) == (
        runtime_info().name,
        runtime_info().version,
    )
    assert (result.threads, result.runs, result.warmup) == (1, 30, 3)
    assert result.init_ms > 0 and result.first_inference_ms > 0
    assert (
        0
        < result.min_ms
        <= result.p50_ms
        <= result.p90_ms
        <= result.p95_ms
        <= result.p99_ms
        <= result.max_ms
    )
    assert result.min_ms <= result.mean_ms <= result.max_ms
    assert result.std_ms >= 0
    assert result.peak_rss_mb >= result.rss_mb > 1.0
    assert result.power_estimated is True and result.power_source == "estimated"
    assert result.power_w >= 2.0  # the default model's idle watts
    assert result.energy_mj_per_inference > 0
    as_dict = result.to_dict()
    assert list(as_dict) == RESULT_FIELDS
    json.dumps(as_dict)  # JSON-ready


def test_benchmark_model_rejects_broken_file() -> None:
    """Load failures surface as ModelLoadError (the CLI turns them into exit code 1)."""
    with pytest.raises(ModelLoadError):
        benchmark_model(DATA / "garbage.tflite", runs=1)


def test_timed_window_covers_exactly_the_timed_runs(loaded: Any) -> None:
    """1 first + warmup untimed invokes, then runs timed ones inside start()..stop()."""
    counting = CountingInterpreter(loaded)
    source = RecordingSource(counting)
    result = benchmark_interpreter(counting, runs=7, warmup=4, power_source=source, init_ms=3.5)
    assert counting.invokes == 1 + 4 + 7
    assert (source.at_start, source.at_stop) == (1 + 4, 1 + 4 + 7)
    assert counting.sets == 1  # inputs set once, not per invoke
    assert result["runs"] == 7 and result["warmup"] == 4
    assert result["init_ms"] == 3.5  # passed through for callers that measured their own load
    assert result["power_w"] == pytest.approx(4.0)
    assert result["energy_mj_per_inference"] == pytest.approx(2000.0 / 7)
    assert (result["power_source"], result["power_estimated"]) == ("recording", False)
    assert result["peak_rss_mb"] >= result["rss_mb"] > 0


def test_statistics_match_numpy_on_known_latencies(
    loaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a fake clock advancing 1, 2, ... 20 ms per timed invoke, the stats are exact."""
    counting = CountingInterpreter(loaded)
    clock_ns = [0]

    def fake_clock() -> int:
        return clock_ns[0]

    def slow_invoke() -> None:
        counting.invokes += 1
        clock_ns[0] += counting.invokes * 1_000_000  # invoke k takes k ms

    counting.invoke = slow_invoke  # type: ignore[method-assign]
    monkeypatch.setattr(time, "perf_counter_ns", fake_clock)
    source = RecordingSource(counting)
    result = benchmark_interpreter(counting, runs=20, warmup=2, power_source=source)
    expected = np.arange(4, 24, dtype=np.float64)  # invokes 4..23 are the timed ones
    assert result["first_inference_ms"] == pytest.approx(1.0)
    assert result["min_ms"] == pytest.approx(4.0) and result["max_ms"] == pytest.approx(23.0)
    for key, q in (("p50_ms", 50), ("p90_ms", 90), ("p95_ms", 95), ("p99_ms", 99)):
        assert result[key] == pytest.approx(float(np.percentile(expected, q)))  # type: ignore[literal-required]
    assert result["mean_ms"] == pytest.approx(expected.mean())
    assert result["std_ms"] == pytest.approx(expected.std())


def test_given_inputs_are_used(loaded: Any) -> None:
    """Caller-supplied inputs go into the model instead of random ones."""
    zeros = [np.zeros((1, 8, 8, 1), dtype=np.float32)]
    counting = CountingInterpreter(loaded)
    benchmark_interpreter(counting, runs=1, warmup=0, inputs=zeros, power_source=EstimatedSource())
    index = loaded.get_input_details()[0]["index"]
    assert np.array_equal(loaded.get_tensor(index), zeros[0])


@pytest.mark.parametrize(("runs", "warmup"), [(0, 1), (-1, 0), (1, -1)])
def test_bad_counts_are_rejected(loaded: Any, runs: int, warmup: int) -> None:
    """runs >= 1 and warmup >= 0."""
    with pytest.raises(ValueError):
        benchmark_interpreter(loaded, runs=runs, warmup=warmup, power_source=EstimatedSource())


def test_format_result_shows_the_numbers() -> None:
    """The summary names the model, runtime, percentiles, memory and power (and 'estimated')."""
    result = benchmark_model(
        DATA / "tiny_int8.tflite",
        runs=5,
        warmup=1,
        power_source=EstimatedSource(PowerModel(1.0, 1.0)),
    )
    text = format_result(result)
    for needle in (
        "tiny_int8.tflite",
        result.model_sha256,
        f"{result.runtime} {result.runtime_version}",
        "threads: runtime default",
        "p50",
        "p99",
        "peak RSS",
        "estimated",
        "mJ/inference",
    ):
        assert needle in text


def test_timing_fields_are_exactly_the_measured_fields_of_the_wire_report() -> None:
    """The agent passes benchmark_interpreter's dict straight into BenchmarkReport."""
    import dataclasses

    from agent.benchmark import InterpreterBenchmark
    from agent.protocol import BenchmarkReport

    # Identity fields and the environment snapshot are added by the daemon, not measured here.
    identity = {"model_sha256", "runtime", "runtime_version", "threads", "environment"}
    wire = {f.name for f in dataclasses.fields(BenchmarkReport)} - identity
    assert set(InterpreterBenchmark.__annotations__) == wire

"""Measure a variant against the fp32 reference: accuracy/fidelity, size, latency, goldens."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.errors import GoldenMismatchError
from converters.interpreter import HostModel, load_host_model
from converters.sparsity import compressed_size, weight_sparsity

# Latency sampling: at least this many timed runs, more until this much time has been spent,
# never more than the cap (keeps MobileNet-sized fp32 models under ~2 s per variant).
LATENCY_MIN_RUNS = 10
LATENCY_MAX_RUNS = 200
LATENCY_TARGET_S = 0.5
LATENCY_WARMUP_RUNS = 3
# A handful of golden samples keeps the .npz tiny while covering several classes.
GOLDEN_SAMPLES = 4
# Float outputs may differ across runtimes (XNNPACK vs reference kernels, fused ops): allow a
# relative error of 1e-3 of the output range; integer outputs may differ by one quantization step.
FLOAT_RELATIVE_TOLERANCE = 1e-3
INTEGER_TOLERANCE_STEPS = 1


@dataclass(frozen=True)
class Evaluation:
    """How one variant compares with the reference on validation data, and how fast it runs."""

    samples: int
    size_bytes: int
    accuracy: float | None
    reference_accuracy: float | None
    top1_agreement: float
    cosine_similarity: float
    max_abs_error: float
    latency_ms_median: float
    latency_ms_p95: float
    latency_runs: int
    # Measured from the file: gzip -9 size, and the zero share of its kernels (pruning shows here).
    compressed_bytes: int | None = None
    weight_sparsity: float | None = None

    @property
    def accuracy_drop_points(self) -> float | None:
        """Reference minus variant top-1 accuracy, in percentage points (None without labels)."""
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return (self.reference_accuracy - self.accuracy) * 100.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, with the accuracy drop included."""
        return {**asdict(self), "accuracy_drop_points": self.accuracy_drop_points}


def _flatten(outputs: np.ndarray) -> np.ndarray:
    """(N, ...) → (N, features) as float64 for the metrics."""
    return outputs.reshape(outputs.shape[0], -1).astype(np.float64)


def fidelity(outputs: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """(top-1 agreement, mean cosine similarity, max abs error) of outputs vs reference outputs."""
    a, b = _flatten(outputs), _flatten(reference)
    if a.shape != b.shape:
        raise ValueError(f"Output shape {outputs.shape} differs from reference {reference.shape}")
    agreement = float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
    return agreement, float(np.mean(cos)), float(np.max(np.abs(a - b)))


def top1_accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose arg-max output equals the label."""
    return float(np.mean(_flatten(outputs).argmax(axis=1) == labels))


def host_latency(model: HostModel, sample: np.ndarray) -> tuple[float, float, int]:
    """(median ms, p95 ms, runs) of single invokes of `sample` on the host interpreter."""
    raw = model.quantize_input(sample[:1])
    for _ in range(LATENCY_WARMUP_RUNS):
        model.invoke_raw(raw)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < LATENCY_MAX_RUNS and (
        len(times) < LATENCY_MIN_RUNS or time.perf_counter() - started < LATENCY_TARGET_S
    ):
        t0 = time.perf_counter()
        model.invoke_raw(raw)
        times.append((time.perf_counter() - t0) * 1000.0)
    arr = np.array(times)
    return float(np.median(arr)), float(np.percentile(arr, 95)), len(times)


def interleaved_latency(
    models: dict[str, Path], sample: np.ndarray, *, rounds: int = 7, runs_per_round: int = 10
) -> dict[str, float]:
    """Median ms per model, timing the models in turn so that load changes hit all of them.

    Timing variants one after another lets a busy moment on a shared machine decide the
    winner; interleaving rounds and taking the median per model removes that bias.
    """
    hosts = {key: load_host_model(path, num_threads=1) for key, path in models.items()}
    raws = {key: host.quantize_input(sample[:1]) for key, host in hosts.items()}
    for key, host in hosts.items():
        for _ in range(LATENCY_WARMUP_RUNS):
            host.invoke_raw(raws[key])
    times: dict[str, list[float]] = {key: [] for key in hosts}
    for _ in range(rounds):
        for key, host in hosts.items():
            for _ in range(runs_per_round):
                t0 = time.perf_counter()
                host.invoke_raw(raws[key])
                times[key].append((time.perf_counter() - t0) * 1000.0)
    return {key: float(np.median(v)) for key, v in times.items()}


def evaluate_variant(
    model: Path | bytes,
    x_val: np.ndarray,
    reference_outputs: np.ndarray,
    *,
    y_val: np.ndarray | None = None,
    reference_accuracy: float | None = None,
) -> Evaluation:
    """Run the variant on `x_val` with the real interpreter and compare it with the reference."""
    host = load_host_model(model, num_threads=1)
    outputs = host.predict(x_val)
    agreement, cos, max_err = fidelity(outputs, reference_outputs)
    accuracy = top1_accuracy(outputs, y_val) if y_val is not None else None
    if y_val is not None and reference_accuracy is None:
        reference_accuracy = top1_accuracy(reference_outputs, y_val)
    median, p95, runs = host_latency(host, x_val)
    data = bytes(model) if isinstance(model, bytes | bytearray) else Path(model).read_bytes()
    return Evaluation(
        samples=int(x_val.shape[0]),
        size_bytes=len(data),
        accuracy=accuracy,
        reference_accuracy=reference_accuracy if y_val is not None else None,
        top1_agreement=agreement,
        cosine_similarity=cos,
        max_abs_error=max_err,
        latency_ms_median=median,
        latency_ms_p95=p95,
        latency_runs=runs,
        compressed_bytes=compressed_size(data),
        weight_sparsity=weight_sparsity(data).weight_sparsity,
    )


def write_golden(model: Path | bytes, x: np.ndarray, out_path: Path) -> Path:
    """Save a few inputs, as the device feeds them, and the outputs this model gives, as .npz.

    Keys: `inputs` and `outputs` in the model's own dtypes (already quantized), their
    (scale, zero_point), and `atol`, the tolerance a self-test should allow per output element.
    For Vela-compiled artifacts pass the int8 model before compilation: the host cannot run the
    ethos-u op, and the NPU is designed to match TF Lite's int8 reference kernels.
    """
    host = load_host_model(model, num_threads=1)
    samples = x[:GOLDEN_SAMPLES]
    raw_in = np.stack([host.quantize_input(samples[i : i + 1])[0] for i in range(len(samples))])
    raw_out = np.stack([host.invoke_raw(raw_in[i : i + 1])[0] for i in range(len(samples))])
    if raw_out.dtype.kind == "f":
        span = float(np.max(np.abs(raw_out))) if raw_out.size else 0.0
        atol = FLOAT_RELATIVE_TOLERANCE * max(span, 1.0)
    else:
        atol = float(INTEGER_TOLERANCE_STEPS)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as fh:
        np.savez(
            fh,
            inputs=raw_in,
            outputs=raw_out,
            input_quantization=np.array(host.input_detail["quantization"], dtype=np.float64),
            output_quantization=np.array(host.output_detail["quantization"], dtype=np.float64),
            atol=np.array(atol),
        )
    return out


def verify_golden(model: Path | bytes, golden_path: Path) -> float:
    """Run a golden file's inputs through `model`; return the max abs error (raise if > atol)."""
    host = load_host_model(model, num_threads=1)
    with np.load(golden_path) as golden:
        inputs, expected, atol = golden["inputs"], golden["outputs"], float(golden["atol"])
    worst = 0.0
    for i in range(inputs.shape[0]):
        got = host.invoke_raw(inputs[i : i + 1])[0]
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - expected[i]))))
    if worst > atol:
        raise GoldenMismatchError(f"Golden check failed for {golden_path}: {worst} > atol {atol}")
    return worst

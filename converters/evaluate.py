"""Measure a variant against the fp32 reference: per-output fidelity, accuracy, size, latency.

Golden files live in converters/golden.py (re-exported here for existing callers).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.fidelity import OutputFidelity, compare_outputs, labelled_output, top1_accuracy
from converters.golden import GOLDEN_SAMPLES, build_golden, verify_golden, write_golden
from converters.interpreter import HostModel, load_host_model
from converters.sparsity import compressed_size, weight_sparsity

__all__ = [
    "GOLDEN_SAMPLES",
    "Evaluation",
    "build_golden",
    "evaluate_variant",
    "fidelity",
    "interleaved_latency",
    "top1_accuracy",
    "verify_golden",
    "write_golden",
]

# Latency sampling: at least this many timed runs, more until this much time has been spent,
# never more than the cap (keeps MobileNet-sized fp32 models under ~2 s per variant).
LATENCY_MIN_RUNS = 10
LATENCY_MAX_RUNS = 200
LATENCY_TARGET_S = 0.5
LATENCY_WARMUP_RUNS = 3


@dataclass(frozen=True)
class Evaluation:
    """How one variant compares with the reference on validation data, and how fast it runs."""

    samples: int
    size_bytes: int
    accuracy: float | None
    reference_accuracy: float | None
    top1_agreement: float | None  # of the first class output; None when no output is one
    cosine_similarity: float  # the lowest over the outputs
    max_abs_error: float  # the highest over the outputs
    latency_ms_median: float
    latency_ms_p95: float
    latency_runs: int
    # Measured from the file: gzip -9 size, and the zero share of its kernels (pruning shows here).
    compressed_bytes: int | None = None
    weight_sparsity: float | None = None
    outputs: tuple[OutputFidelity, ...] = ()  # every output, in model order

    @property
    def snr_db(self) -> float | None:
        """The lowest SNR over the outputs whose reference is not flat (None if all are)."""
        judged = [o.snr_db for o in self.outputs if not o.flat]
        return min(judged) if judged else None

    @property
    def accuracy_drop_points(self) -> float | None:
        """Reference minus variant top-1 accuracy, in percentage points (None without labels)."""
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return (self.reference_accuracy - self.accuracy) * 100.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, with the accuracy drop, worst SNR and every output included."""
        data = {k: v for k, v in asdict(self).items() if k != "outputs"}
        return {
            **data,
            "accuracy_drop_points": self.accuracy_drop_points,
            "snr_db": self.snr_db,
            "outputs": [o.to_dict() for o in self.outputs],
        }


def _flatten(outputs: np.ndarray) -> np.ndarray:
    """(N, ...) → (N, features) as float64 for the metrics."""
    return outputs.reshape(outputs.shape[0], -1).astype(np.float64)


def fidelity(outputs: np.ndarray, reference: np.ndarray) -> tuple[float, float, float]:
    """(arg-max agreement, mean cosine, max abs error) of one output array vs its reference.

    A low-level helper for class vectors; converters.fidelity judges outputs by their kind.
    """
    a, b = _flatten(outputs), _flatten(reference)
    if a.shape != b.shape:
        raise ValueError(f"Output shape {outputs.shape} differs from reference {reference.shape}")
    agreement = float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1.0), 1.0)
    return agreement, float(np.mean(cos)), float(np.max(np.abs(a - b)))


def _as_list(x: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    """One array per model input."""
    return [x] if isinstance(x, np.ndarray) else list(x)


def host_latency(
    model: HostModel, sample: np.ndarray | list[np.ndarray]
) -> tuple[float, float, int]:
    """(median ms, p95 ms, runs) of single invokes of `sample` on the host interpreter."""
    raw = model.quantize_inputs([x[:1] for x in _as_list(sample)])
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
    models: dict[str, Path],
    sample: np.ndarray | list[np.ndarray],
    *,
    rounds: int = 7,
    runs_per_round: int = 10,
) -> dict[str, float]:
    """Median ms per model, timing the models in turn so that load changes hit all of them.

    Timing variants one after another lets a busy moment on a shared machine decide the
    winner; interleaving rounds and taking the median per model removes that bias.
    """
    hosts = {key: load_host_model(path, num_threads=1) for key, path in models.items()}
    raws = {
        key: host.quantize_inputs([x[:1] for x in _as_list(sample)]) for key, host in hosts.items()
    }
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
    x_val: np.ndarray | list[np.ndarray],
    reference_outputs: np.ndarray | list[np.ndarray],
    *,
    y_val: np.ndarray | None = None,
    reference_accuracy: float | None = None,
) -> Evaluation:
    """Run the variant on `x_val` with the real interpreter and compare every output.

    `reference_outputs` holds one array per output (a bare array for single-output models).
    With labels, accuracy is measured on the first class-shaped output.
    """
    host = load_host_model(model, num_threads=1)
    outputs = host.predict_all(x_val)
    refs = [reference_outputs] if isinstance(reference_outputs, np.ndarray) else reference_outputs
    names = host.output_names
    per_output = compare_outputs(outputs, list(refs), names, labelled=y_val is not None)
    accuracy = None
    target = labelled_output(list(refs)) if y_val is not None else None
    if y_val is not None and target is not None:
        accuracy = top1_accuracy(outputs[target], y_val)
        if reference_accuracy is None:
            reference_accuracy = top1_accuracy(refs[target], y_val)
    classes = [o for o in per_output if o.top1_agreement is not None]
    median, p95, runs = host_latency(host, x_val)
    data = bytes(model) if isinstance(model, bytes | bytearray) else Path(model).read_bytes()
    inputs = _as_list(x_val)
    return Evaluation(
        samples=int(inputs[0].shape[0]),
        size_bytes=len(data),
        accuracy=accuracy,
        reference_accuracy=reference_accuracy if accuracy is not None else None,
        top1_agreement=classes[0].top1_agreement if classes else None,
        cosine_similarity=min(o.cosine for o in per_output),
        max_abs_error=max(o.max_abs_error for o in per_output),
        latency_ms_median=median,
        latency_ms_p95=p95,
        latency_runs=runs,
        compressed_bytes=compressed_size(data),
        weight_sparsity=weight_sparsity(data).weight_sparsity,
        outputs=tuple(per_output),
    )

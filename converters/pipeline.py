"""optimize(): per profile, convert → compile → check → evaluate → select the fastest variant.

The stages live in converters/stages/ (convert, compile, select, publish); `_Run` combines them
with the state of one call, and this module validates the inputs and runs every profile.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from converters.datasets import Samples, load_samples
from converters.errors import ModelInputError
from converters.fidelity import DEFAULT_MIN_SNR_DB, Budget
from converters.inputs import ORIGINAL, detect_format, prepare_source
from converters.manifest import source_sha256
from converters.prune import (
    DEFAULT_EPOCHS,
    DEFAULT_SPARSITY,
    PruneResult,
    check_sparsity,
    load_training_data,
    prune_keras_model,
    pruned_suffix,
    require_pruning,
)
from converters.report import OptimizeReport, ProfileReport, ProgressCallback
from converters.stages.convert import (
    PER_TENSOR_SUFFIX,
    PRUNED_SEPARATOR,
    RANDOM_VAL_SAMPLES,
    Variant,
    base_recipe,
    is_pruned,
)
from converters.stages.publish import PublishStage
from converters.stages.select import LATENCY_TIE

# Re-exported: tests and benches import these names from the pipeline.
__all__ = [
    "LATENCY_TIE",
    "PER_TENSOR_SUFFIX",
    "PRUNED_SEPARATOR",
    "RANDOM_VAL_SAMPLES",
    "base_recipe",
    "is_pruned",
    "optimize",
]


def _as_samples(data: np.ndarray | Samples | Path | str | None) -> Samples | None:
    """Accept an array, Samples or a path (.npy/.npz/dir) and return Samples (or None)."""
    if data is None or isinstance(data, Samples):
        return data
    if isinstance(data, str | Path):
        return load_samples(Path(data))
    return Samples(np.asarray(data, dtype=np.float32))


class _Run(PublishStage):
    """State of one optimize() call: converted variants are shared across profiles."""

    def __init__(
        self,
        model_path: Path,
        out_dir: Path,
        calib: Samples | None,
        val: Samples | None,
        max_drop: float,
        progress: ProgressCallback | None,
        max_candidates: int = 1,
        min_snr_db: float = DEFAULT_MIN_SNR_DB,
    ) -> None:
        """Prepare the output tree and the source model (ONNX → SavedModel once)."""
        self.model_path = Path(model_path)
        self.out_dir = Path(out_dir)
        self.calib, self.val, self.max_drop = calib, val, max_drop
        self.budget = Budget(max_drop, min_snr_db)
        self.layer_explanations: dict[str, str] = {}
        self.progress, self.max_candidates = progress, max_candidates
        self.variants: dict[str, Variant] = {}
        self.fingerprints: dict[str, str] = {}
        self.latency_cache: dict[tuple[str, ...], dict[str, float]] = {}
        self.notes: list[str] = []
        self.warnings: dict[str, list[str]] = {}
        self.fmt = detect_format(self.model_path)
        self.source = prepare_source(self.model_path, self.out_dir / "_work")
        self.source_sha = source_sha256(self.model_path)
        self.stem = self.model_path.stem if self.model_path.is_file() else self.model_path.name
        self.reference_recipe = ORIGINAL if self.fmt == "tflite" else "fp32"
        self.reference_outputs: list[np.ndarray] | None = None
        self.val_x: list[np.ndarray] | None = None
        self.pruning: PruneResult | None = None
        self.pruned_tag = ""
        if self.fmt == "tflite":
            self.notes += _tflite_source_notes(self.model_path)

    def prune(self, train: Samples, sparsity: float, epochs: int) -> PruneResult:
        """Prune the Keras source once (TF-MOT, child process); adds the +prunedNN variants."""
        self.emit("*", "prune", None, f"target sparsity {sparsity:g}, {epochs} epochs")
        out = self.out_dir / "_work" / f"{self.stem}{pruned_suffix(sparsity)}.keras"
        self.pruning = prune_keras_model(self.source, train, out, sparsity=sparsity, epochs=epochs)
        self.pruned_tag = pruned_suffix(sparsity)
        self.notes.append(
            f"pruned with TF-MOT to {self.pruning.kernel_sparsity:.3f} kernel sparsity "
            f"(target {sparsity:g}, {epochs} fine-tuning epochs in a tf_keras child process); "
            "+pruned variants are compared with the unpruned fp32"
        )
        return self.pruning

    def run_profile(self, profile: Any) -> ProfileReport:
        """All candidate recipes for one profile, then selection and publication."""
        report = ProfileReport(profile.id)
        self.emit(profile.id, "start", None, ", ".join(self.candidates(profile)))
        for recipe in self.candidates(profile):
            report.variants.append(self.try_variant(profile, recipe))
        passing = [v for v in report.variants if v.status == "passed"]
        chosen = self.select(profile, report.variants)
        if chosen is None:
            report.status = "no_variant"
            report.error = _no_variant_reason(report)
        else:
            self.clear_stale(self.out_dir / profile.id)
            self.publish(profile, chosen, self.out_dir / profile.id)
            report.status = "ok"
        report.candidates = self.publish_candidates(profile, chosen, passing)
        report.warnings = list(self.warnings.get(profile.id, []))
        self.emit(profile.id, "done", chosen.recipe if chosen else None, report.status)
        return report


def _tflite_source_notes(model_path: Path) -> list[str]:
    """What normalizing a .tflite source changes (fp16/sparse folding, signature), as notes."""
    from converters.errors import ConverterError
    from converters.requantize import normalized_tflite

    try:
        _, notes = normalized_tflite(model_path.read_bytes())
    except ConverterError as exc:
        name = model_path.name
        return [f"{name}: cannot normalize to plain fp32 ({exc}); only 'original' applies"]
    return [f"{model_path.name}: {line} before re-quantizing" for line in notes.lines()]


def _no_variant_reason(report: ProfileReport) -> str:
    """Why a profile got no artifact: every variant's outcome, shortest first."""
    parts = [f"{v.variant or v.recipe} {v.status}: {v.reason}" for v in report.variants]
    if not parts:
        return "no recipe of this profile applies to the model's format"
    return "no variant passed the checks and the accuracy budget (" + "; ".join(parts) + ")"


def _training_samples(
    model_path: Path, train: np.ndarray | Samples | Path | None, sparsity: float, epochs: int
) -> Samples | None:
    """Validate --train and its options before any work: Keras model, labels, the prune extra."""
    if train is None:
        return None
    check_sparsity(sparsity)
    if epochs < 1:
        raise ValueError(f"prune epochs must be ≥ 1, got {epochs}")
    fmt = detect_format(model_path)
    if fmt != "keras":
        raise ModelInputError(
            f"--train prunes Keras models (.keras/.h5) only; {model_path} is a {fmt} model"
        )
    if isinstance(train, np.ndarray):
        raise ModelInputError("--train needs labels: pass Samples(x, y) or an .npz with x and y")
    samples = load_training_data(train)
    require_pruning()
    return samples


def optimize(
    model_path: Path,
    profiles: list[Any],
    *,
    calib: np.ndarray | Samples | Path | None = None,
    val: np.ndarray | Samples | Path | None = None,
    max_accuracy_drop: float = 1.0,
    out_dir: Path,
    progress: ProgressCallback | None = None,
    train: np.ndarray | Samples | Path | None = None,
    prune_sparsity: float = DEFAULT_SPARSITY,
    prune_epochs: int = DEFAULT_EPOCHS,
    candidates: int = 1,
    min_snr_db: float = DEFAULT_MIN_SNR_DB,
) -> OptimizeReport:
    """Build the best artifact for each profile; one profile's failure does not stop the others.

    `max_accuracy_drop` is in percentage points of top-1 accuracy when `val` has labels, else of
    top-1 disagreement with the reference, for class-shaped outputs; every other output must
    keep an SNR of at least `min_snr_db` (converters/fidelity.py; the worst output decides).
    With `train` (inputs + labels) the Keras model is also magnitude-pruned to `prune_sparsity`
    (TF-MOT, child process) and every recipe is tried on it too. Raises only for problems with
    the model or data themselves (ModelInputError) or with pruning (PruningError); everything
    per profile is reported in the result. Each profile's top `candidates` (variant, threads)
    pairs are listed in `<out>/<profile>/candidates.json`.
    """
    if max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop must be ≥ 0, got {max_accuracy_drop}")
    if candidates < 1:
        raise ValueError(f"candidates (--candidates) must be ≥ 1, got {candidates}")
    train_samples = _training_samples(Path(model_path), train, prune_sparsity, prune_epochs)
    started = time.perf_counter()
    run = _Run(Path(model_path), Path(out_dir), _as_samples(calib), _as_samples(val),
               max_accuracy_drop, progress, candidates, min_snr_db)  # fmt: skip
    report = OptimizeReport(Path(model_path), Path(out_dir), max_accuracy_drop)
    if train_samples is not None:
        report.pruning = run.prune(train_samples, prune_sparsity, prune_epochs).to_dict()
    for profile in profiles:
        try:
            report.profiles.append(run.run_profile(profile))
        except Exception as exc:  # one profile's failure must not stop the others
            run.emit(profile.id, "error", None, str(exc))
            report.profiles.append(
                ProfileReport(profile.id, status="error", error=f"{type(exc).__name__}: {exc}")
            )
    report.notes = sorted(set(run.notes))
    report.seconds = time.perf_counter() - started
    return report

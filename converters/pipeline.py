"""optimize(): per profile, convert → compile → check → evaluate → select the fastest variant."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters._files import atomic_write_bytes
from converters.checks import blocking_failures, run_checks
from converters.compilers import get_compiler
from converters.datasets import Samples, load_samples
from converters.errors import ConverterError
from converters.evaluate import (
    Evaluation,
    evaluate_variant,
    interleaved_latency,
    write_golden,
)
from converters.inputs import ORIGINAL, convert_model, detect_format, prepare_source, recipes_for
from converters.interpreter import load_host_model
from converters.manifest import ArtifactManifest, source_sha256
from converters.recipes import PER_CHANNEL_DENSE_MIN_RUNTIME
from converters.report import (
    OptimizeReport,
    ProfileReport,
    ProgressCallback,
    ProgressEvent,
    VariantReport,
)
from converters.runtime_versions import tflite_compat_version, version_at_least
from converters.tflite_inspect import inspect_bytes

# Variant key suffix of the dynamic recipe with per-tensor Dense weights (FC v9, runtime ≥ 2.3).
PER_TENSOR_SUFFIX = "-pt"
# Latencies within 5 % of the fastest are a tie: repeated interleaved host timings of the same
# digits model on this 2-core machine vary by about 3 %.
LATENCY_TIE = 0.05
# Without --val, fidelity is measured on this many uniform random inputs in [0, 1).
RANDOM_VAL_SAMPLES = 32


@dataclass
class _Variant:
    """A converted recipe shared by all profiles: its file, or why conversion failed."""

    recipe: str
    path: Path | None = None
    error: str | None = None
    evaluation: Evaluation | None = None


def _as_samples(data: np.ndarray | Samples | Path | str | None) -> Samples | None:
    """Accept an array, Samples or a path (.npy/.npz/dir) and return Samples (or None)."""
    if data is None or isinstance(data, Samples):
        return data
    if isinstance(data, str | Path):
        return load_samples(Path(data))
    return Samples(np.asarray(data, dtype=np.float32))


class _Run:
    """State of one optimize() call: converted variants are shared across profiles."""

    def __init__(
        self,
        model_path: Path,
        out_dir: Path,
        calib: Samples | None,
        val: Samples | None,
        max_drop: float,
        progress: ProgressCallback | None,
    ) -> None:
        """Prepare the output tree and the source model (ONNX → SavedModel once)."""
        self.model_path = Path(model_path)
        self.out_dir = Path(out_dir)
        self.calib, self.val, self.max_drop = calib, val, max_drop
        self.progress = progress
        self.variants: dict[str, _Variant] = {}
        self.latency_cache: dict[tuple[str, ...], dict[str, float]] = {}
        self.notes: list[str] = []
        self.fmt = detect_format(self.model_path)
        self.source = prepare_source(self.model_path, self.out_dir / "_work")
        self.source_sha = source_sha256(self.model_path)
        self.stem = self.model_path.stem if self.model_path.is_file() else self.model_path.name
        self.reference_recipe = ORIGINAL if self.fmt == "tflite" else "fp32"
        self.reference_outputs: np.ndarray | None = None
        self.val_x: np.ndarray | None = None

    def emit(self, profile: str, stage: str, recipe: str | None = None, message: str = "") -> None:
        """Report progress to the callback, if any."""
        if self.progress is not None:
            self.progress(ProgressEvent(profile, stage, recipe, message))

    def _convert(self, key: str, profile: str) -> _Variant:
        """Convert variant `key` once (shared by all profiles); failures are kept, not raised.

        Keys are recipes, plus "dynamic-pt": the dynamic recipe with per-tensor Dense weights.
        """
        if key not in self.variants:
            recipe = key.removesuffix(PER_TENSOR_SUFFIX)
            self.emit(profile, "convert", key)
            var = _Variant(key)
            try:
                calib = self.calib.x if self.calib is not None else None
                data = convert_model(
                    self.source, recipe, calib=calib, per_tensor_dense=key != recipe
                )
                var.path = atomic_write_bytes(
                    self.out_dir / "variants" / f"{self.stem}-{key}.tflite", data
                )
            except ConverterError as exc:
                var.error = str(exc)
            self.variants[key] = var
        return self.variants[key]

    def variant(self, recipe: str, profile: str) -> _Variant:
        """The converted and evaluated variant for `recipe` (evaluated once, then reused)."""
        var = self._convert(recipe, profile)
        if var.path is not None and var.evaluation is None and var.error is None:
            self.emit(profile, "evaluate", recipe)
            try:
                var.evaluation = self.evaluate(var.path, profile)
            except ConverterError as exc:
                var.error = str(exc)
        return var

    def evaluate(self, path: Path, profile: str) -> Evaluation:
        """Evaluate a variant file against the reference outputs on the validation inputs."""
        if self.reference_outputs is None:
            ref = self._convert(self.reference_recipe, profile)
            if ref.path is None:
                raise ConverterError(f"reference {self.reference_recipe} failed: {ref.error}")
            self.val_x = self._validation_inputs(ref.path)
            self.reference_outputs = load_host_model(ref.path).predict(self.val_x)
        assert self.val_x is not None
        labels = self.val.y if self.val is not None else None
        return evaluate_variant(path, self.val_x, self.reference_outputs, y_val=labels)

    def _validation_inputs(self, reference: Path) -> np.ndarray:
        """--val inputs, else the calibration inputs, else random inputs of the model's shape."""
        if self.val is not None:
            return self.val.x
        if self.calib is not None:
            self.notes.append("no --val data: fidelity measured on the calibration inputs")
            return self.calib.x
        shape = tuple(inspect_bytes(reference.read_bytes()).inputs[0].shape[1:])
        self.notes.append(f"no --val/--calib data: fidelity on {RANDOM_VAL_SAMPLES} random inputs")
        rng = np.random.default_rng(0)
        return rng.random((RANDOM_VAL_SAMPLES, *shape), dtype=np.float32)

    def candidates(self, profile: Any) -> list[str]:
        """Recipes to try for a profile: the allowed ones that apply to this model's format."""
        applicable = recipes_for(self.model_path)
        chosen = [r for r in profile.quantization.allowed if r in applicable]
        if self.fmt == "tflite":
            chosen.insert(0, ORIGINAL)
        preferred = profile.quantization.preferred
        return sorted(chosen, key=lambda r: (r != preferred, chosen.index(r)))

    def within_budget(self, ev: Evaluation) -> tuple[bool, str]:
        """Accuracy drop (with labels) or top-1 disagreement (without) against the budget."""
        drop = ev.accuracy_drop_points
        if drop is not None:
            return drop <= self.max_drop, f"accuracy drop {drop:.2f} points"
        disagreement = (1.0 - ev.top1_agreement) * 100.0
        return disagreement <= self.max_drop, f"top-1 disagreement {disagreement:.2f} points"

    def variant_key(self, profile: Any, recipe: str) -> str:
        """The variant to build: 'dynamic' becomes per-tensor Dense for runtimes before 2.17."""
        if recipe != "dynamic" or self.fmt == "tflite":
            return recipe
        have = tflite_compat_version(profile.runtime.name, profile.runtime.version)
        if have is not None and not version_at_least(have, PER_CHANNEL_DENSE_MIN_RUNTIME):
            return recipe + PER_TENSOR_SUFFIX
        return recipe

    def try_variant(self, profile: Any, recipe: str) -> VariantReport:
        """Convert (shared), compile for this profile, check and judge one recipe."""
        key = self.variant_key(profile, recipe)
        rep = VariantReport(recipe, variant=key)
        var = self.variant(key, profile.id)
        if var.path is None or var.evaluation is None:
            stage = "conversion" if var.path is None else "evaluation"
            rep.status, rep.reason = "failed", f"{stage} failed: {var.error}"
            return rep
        rep.evaluation = var.evaluation
        compile_dir = self.out_dir / profile.id / "compile" / recipe
        try:
            self.emit(profile.id, "compile", recipe, profile.compiler.kind)
            options = dict(profile.compiler.options)
            rep.compiled = get_compiler(profile.compiler.kind).compile(
                var.path, compile_dir, options
            )
        except ConverterError as exc:
            rep.status, rep.reason = "failed", f"compile failed: {exc}"
            return rep
        self.emit(profile.id, "check", recipe)
        compiled = rep.compiled if profile.compiler.kind != "none" else None
        rep.checks = run_checks(var.path, profile, compiled=compiled)
        if rep.compiled.estimated_latency_ms is not None:
            rep.latency_ms, rep.latency_source = rep.compiled.estimated_latency_ms, "vela"
        else:
            rep.latency_ms, rep.latency_source = var.evaluation.latency_ms_median, "host"
        failed = blocking_failures(rep.checks)
        ok_budget, budget_text = self.within_budget(var.evaluation)
        if failed:
            rep.status = "rejected"
            rep.reason = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        elif not ok_budget:
            rep.status = "rejected"
            rep.reason = f"{budget_text} exceeds the budget of {self.max_drop:g}"
        else:
            rep.status, rep.reason = "passed", budget_text
        return rep

    def remeasure_host_latency(self, reports: list[VariantReport]) -> None:
        """Re-time competing host-latency variants interleaved (shared across profiles)."""
        keys = tuple(sorted({r.variant for r in reports}))
        if len(keys) < 2 or self.val_x is None:
            return
        if keys not in self.latency_cache:
            paths = {k: self.variants[k].path for k in keys}
            self.latency_cache[keys] = interleaved_latency(
                {k: p for k, p in paths.items() if p is not None}, self.val_x
            )
        for r in reports:
            r.latency_ms = self.latency_cache[keys].get(r.variant, r.latency_ms)

    def select(self, profile: Any, reports: list[VariantReport]) -> VariantReport | None:
        """Pick the fastest passing variant; say why each other passing variant lost.

        Variants with fewer advisory failures come first. Among those, latencies within
        LATENCY_TIE of the fastest count as a tie (host timing noise on a shared machine is
        about that large), settled by the profile's preferred recipe, then by size.
        """
        passing = [r for r in reports if r.status == "passed"]
        if not passing:
            return None
        self.remeasure_host_latency([r for r in passing if r.latency_source == "host"])

        def advisory(r: VariantReport) -> list[str]:
            """Names of the non-blocking checks this variant failed."""
            return [c.name for c in r.checks if not c.ok]

        fewest = min(len(advisory(r)) for r in passing)
        field = [r for r in passing if len(advisory(r)) == fewest]
        fastest = min(r.latency_ms or float("inf") for r in field)
        tied = [r for r in field if (r.latency_ms or float("inf")) <= fastest * (1 + LATENCY_TIE)]
        preferred = profile.quantization.preferred

        def size(r: VariantReport) -> int:
            """Artifact size in bytes."""
            return r.evaluation.size_bytes if r.evaluation else 0

        best = min(tied, key=lambda r: (r.recipe != preferred, size(r), r.latency_ms or 0.0))
        best.status = "selected"
        why = "fastest" if best.latency_ms == fastest else "preferred/smallest within the tie"
        best.reason = (
            f"{why} passing variant: {best.latency_ms:.4f} ms ({best.latency_source}), "
            f"{size(best)} bytes, {best.reason}"
        )
        for other in passing:
            if other is best:
                continue
            other.status = "rejected"
            if len(advisory(other)) > fewest:
                other.reason = f"passes but has advisory failures ({', '.join(advisory(other))})"
            elif other in tied:
                other.reason = (
                    f"tied on latency ({other.latency_ms:.4f} ms vs {best.latency_ms:.4f} ms) "
                    f"and {best.recipe} is preferred or smaller"
                )
            else:
                other.reason = (
                    f"slower: {other.latency_ms:.4f} ms vs {best.latency_ms:.4f} ms "
                    f"({best.recipe}, {best.latency_source})"
                )
        return best

    def publish(self, profile: Any, chosen: VariantReport) -> None:
        """Copy the chosen artifact into <out>/<profile>/, with golden data and a manifest."""
        var = self.variants[chosen.variant]
        assert var.path is not None and chosen.compiled is not None and chosen.evaluation
        dest_dir = self.out_dir / profile.id
        for stale in dest_dir.glob(f"{self.stem}-*"):  # a previous run's selection
            if stale.is_file():
                stale.unlink()
        suffix = "" if profile.compiler.kind == "none" else f"-{profile.compiler.kind}"
        artifact = dest_dir / f"{self.stem}-{chosen.variant}{suffix}.tflite"
        atomic_write_bytes(artifact, Path(chosen.compiled.artifact).read_bytes())
        assert self.val_x is not None
        golden = write_golden(var.path, self.val_x, artifact.with_suffix(".golden.npz"))
        info = inspect_bytes(var.path.read_bytes())
        manifest = ArtifactManifest(
            artifact=artifact,
            recipe=chosen.recipe,
            profile=profile.id,
            source_model=self.model_path.name,
            source_sha256=self.source_sha,
            metrics={
                **chosen.evaluation.to_dict(),
                "latency_ms": chosen.latency_ms,
                "latency_source": chosen.latency_source,
            },
            checks=[c.to_dict() for c in chosen.checks],
            compiler={
                "kind": profile.compiler.kind,
                "options": dict(profile.compiler.options),
                **{k: v for k, v in chosen.compiled.to_dict().items() if k != "artifact"},
            },
            io={
                "inputs": [t.to_dict() for t in info.inputs],
                "outputs": [t.to_dict() for t in info.outputs],
            },
            golden=golden,
            golden_model=var.path.name,
            tools=_tool_versions(),
        )
        chosen.artifact, chosen.golden, chosen.manifest = artifact, golden, manifest.write()

    def run_profile(self, profile: Any) -> ProfileReport:
        """All candidate recipes for one profile, then selection and publication."""
        report = ProfileReport(profile.id)
        self.emit(profile.id, "start", None, ", ".join(self.candidates(profile)))
        for recipe in self.candidates(profile):
            report.variants.append(self.try_variant(profile, recipe))
        chosen = self.select(profile, report.variants)
        if chosen is None:
            report.status = "no_variant"
            report.error = "no variant passed the checks and the accuracy budget"
        else:
            self.publish(profile, chosen)
            report.status = "ok"
        self.emit(profile.id, "done", chosen.recipe if chosen else None, report.status)
        return report


def _tool_versions() -> dict[str, str]:
    """Versions of the tools that made an artifact (recorded in its manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in (
        "tensorflow-cpu",
        "tensorflow",
        "ai-edge-litert",
        "ethos-u-vela",
        "litert-quantizer",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def optimize(
    model_path: Path,
    profiles: list[Any],
    *,
    calib: np.ndarray | Samples | Path | None = None,
    val: np.ndarray | Samples | Path | None = None,
    max_accuracy_drop: float = 1.0,
    out_dir: Path,
    progress: ProgressCallback | None = None,
) -> OptimizeReport:
    """Build the best artifact for each profile; one profile's failure does not stop the others.

    `max_accuracy_drop` is in percentage points of top-1 accuracy when `val` has labels, else of
    top-1 disagreement with the reference. Raises only for problems with the model or data
    themselves (ModelInputError); everything per profile is reported in the result.
    """
    if max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop must be ≥ 0, got {max_accuracy_drop}")
    started = time.perf_counter()
    run = _Run(Path(model_path), Path(out_dir), _as_samples(calib), _as_samples(val),
               max_accuracy_drop, progress)  # fmt: skip
    report = OptimizeReport(Path(model_path), Path(out_dir), max_accuracy_drop)
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

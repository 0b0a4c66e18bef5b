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
from converters.errors import ConverterError, ModelInputError
from converters.evaluate import Evaluation, evaluate_variant, interleaved_latency
from converters.fidelity import DEFAULT_MIN_SNR_DB, Budget, judge
from converters.golden import build_golden, golden_cap
from converters.inputs import ORIGINAL, convert_model, detect_format, prepare_source, recipes_for
from converters.interpreter import load_host_model
from converters.manifest import (
    CANDIDATES_DIR,
    ArtifactManifest,
    source_sha256,
    write_candidates,
)
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
from converters.recipes import PER_CHANNEL_DENSE_MIN_RUNTIME
from converters.report import (
    Candidate,
    OptimizeReport,
    ProfileReport,
    ProgressCallback,
    ProgressEvent,
    VariantReport,
    candidate_threads,
    rank_candidates,
)
from converters.runtime_versions import tflite_compat_version, version_at_least
from converters.tflite_inspect import inspect_bytes

# Variant key suffix of the dynamic recipe with per-tensor Dense weights (FC v9, runtime ≥ 2.3).
PER_TENSOR_SUFFIX = "-pt"
# Separates a recipe from the pruning tag in variant names: "int8+pruned50", "dynamic-pt+pruned50".
PRUNED_SEPARATOR = "+"
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


def base_recipe(variant: str) -> str:
    """The converter recipe of a variant name: 'dynamic-pt+pruned50' → 'dynamic'."""
    return variant.partition(PRUNED_SEPARATOR)[0].removesuffix(PER_TENSOR_SUFFIX)


def is_pruned(variant: str) -> bool:
    """Whether a variant name denotes the pruned model ('int8+pruned50')."""
    return PRUNED_SEPARATOR in variant


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
        max_candidates: int = 1,
        min_snr_db: float = DEFAULT_MIN_SNR_DB,
    ) -> None:
        """Prepare the output tree and the source model (ONNX → SavedModel once)."""
        self.model_path = Path(model_path)
        self.out_dir = Path(out_dir)
        self.calib, self.val, self.max_drop = calib, val, max_drop
        self.budget = Budget(max_drop, min_snr_db)
        self.progress, self.max_candidates = progress, max_candidates
        self.variants: dict[str, _Variant] = {}
        self.latency_cache: dict[tuple[str, ...], dict[str, float]] = {}
        self.notes: list[str] = []
        self.fmt = detect_format(self.model_path)
        self.source = prepare_source(self.model_path, self.out_dir / "_work")
        self.source_sha = source_sha256(self.model_path)
        self.stem = self.model_path.stem if self.model_path.is_file() else self.model_path.name
        self.reference_recipe = ORIGINAL if self.fmt == "tflite" else "fp32"
        self.reference_outputs: list[np.ndarray] | None = None
        self.val_x: list[np.ndarray] | None = None
        self.pruning: PruneResult | None = None
        self.pruned_tag = ""

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

    def emit(self, profile: str, stage: str, recipe: str | None = None, message: str = "") -> None:
        """Report progress to the callback, if any."""
        if self.progress is not None:
            self.progress(ProgressEvent(profile, stage, recipe, message))

    def _convert(self, key: str, profile: str) -> _Variant:
        """Convert variant `key` once (shared by all profiles); failures are kept, not raised.

        Keys are recipes, plus "dynamic-pt": the dynamic recipe with per-tensor Dense weights,
        and either with "+prunedNN": the same recipe applied to the pruned model.
        """
        if key not in self.variants:
            recipe = base_recipe(key)
            per_tensor = key.partition(PRUNED_SEPARATOR)[0] != recipe
            source = self.source
            if is_pruned(key):
                assert self.pruning is not None
                source = self.pruning.model_path
            self.emit(profile, "convert", key)
            var = _Variant(key)
            try:
                calib = self.calib.x if self.calib is not None else None
                data = convert_model(source, recipe, calib=calib, per_tensor_dense=per_tensor)
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
            self.reference_outputs = load_host_model(ref.path).predict_all(self.val_x)
        assert self.val_x is not None
        labels = self.val.y if self.val is not None else None
        return evaluate_variant(path, self.val_x, self.reference_outputs, y_val=labels)

    def variant_metrics(self, variant: str) -> dict[str, Any]:
        """Extra manifest/report metrics of a variant: the pruning run behind a +pruned one."""
        if not is_pruned(variant) or self.pruning is None:
            return {}
        info = self.pruning.to_dict()
        keep = ("target_sparsity", "kernel_sparsity", "layer_sparsity", "epochs", "tools")
        return {"pruning": {k: info[k] for k in keep}}

    def _validation_inputs(self, reference: Path) -> list[np.ndarray]:
        """One array per model input: --val, else --calib, else random inputs of its shape.

        --val/--calib files hold one input array, so a model with several inputs is measured
        on random inputs (a note says so).
        """
        specs = inspect_bytes(reference.read_bytes()).inputs
        given = self.val if self.val is not None else self.calib
        if given is not None and len(specs) == 1:
            if self.val is None:
                self.notes.append("no --val data: fidelity measured on the calibration inputs")
            return [given.x]
        why = "no --val/--calib data" if given is None else f"{len(specs)} model inputs"
        self.notes.append(f"{why}: fidelity on {RANDOM_VAL_SAMPLES} random inputs")
        rng = np.random.default_rng(0)
        return [
            rng.random((RANDOM_VAL_SAMPLES, *t.shape[1:]), dtype=np.float32) for t in specs
        ]

    def candidates(self, profile: Any) -> list[str]:
        """Recipes to try for a profile: the allowed ones that apply to this model's format.

        With pruning, each is also tried on the pruned model ("int8+pruned50").
        """
        applicable = recipes_for(self.model_path)
        chosen = [r for r in profile.quantization.allowed if r in applicable]
        if self.fmt == "tflite":
            chosen.insert(0, ORIGINAL)
        if self.pruned_tag:
            chosen += [r + self.pruned_tag for r in chosen if r != ORIGINAL]
        preferred = profile.quantization.preferred
        return sorted(chosen, key=lambda r: (base_recipe(r) != preferred, chosen.index(r)))

    def within_budget(self, ev: Evaluation) -> tuple[bool, str]:
        """Every output against the budget (the worst decides); flat references become notes."""
        verdict = judge(list(ev.outputs), self.budget, ev.accuracy_drop_points)
        self.notes.extend(verdict.warnings)
        return verdict.ok, verdict.text

    def variant_key(self, profile: Any, recipe: str) -> str:
        """The variant to build: 'dynamic' becomes per-tensor Dense for runtimes before 2.17."""
        base, sep, tag = recipe.partition(PRUNED_SEPARATOR)
        if base != "dynamic" or self.fmt == "tflite":
            return recipe
        have = tflite_compat_version(profile.runtime.name, profile.runtime.version)
        if have is not None and not version_at_least(have, PER_CHANNEL_DENSE_MIN_RUNTIME):
            return base + PER_TENSOR_SUFFIX + sep + tag
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
        rep.extra_metrics = self.variant_metrics(key)
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
            rep.reason = budget_text
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

        def compressed(r: VariantReport) -> int:
            """Artifact size after gzip -9."""
            return (r.evaluation.compressed_bytes or 0) if r.evaluation else 0

        # gzip size before raw size: across recipes both rank alike, but a pruned variant's raw
        # size equals its unpruned twin's (± alignment bytes) and only compression shows its gain.
        best = min(
            tied,
            key=lambda r: (
                base_recipe(r.recipe) != preferred,
                compressed(r),
                size(r),
                r.latency_ms or 0.0,
            ),
        )
        best.status = "selected"
        why = "fastest" if best.latency_ms == fastest else "preferred/smallest within the tie"
        best.reason = (
            f"{why} passing variant: {best.latency_ms:.4f} ms ({best.latency_source}), "
            f"{size(best)} bytes ({compressed(best)} gzip), {best.reason}"
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
                    f"and {best.recipe} is preferred or smaller (gzip, then raw)"
                )
            else:
                other.reason = (
                    f"slower: {other.latency_ms:.4f} ms vs {best.latency_ms:.4f} ms "
                    f"({best.recipe}, {best.latency_source})"
                )
        return best

    def clear_stale(self, dest_dir: Path) -> None:
        """Remove a previous run's published files for this model from `dest_dir`."""
        for stale in dest_dir.glob(f"{self.stem}-*"):
            if stale.is_file():
                stale.unlink()

    def publish(self, profile: Any, chosen: VariantReport, dest_dir: Path) -> None:
        """Copy a variant's artifact into `dest_dir`, with golden data and a manifest."""
        var = self.variants[chosen.variant]
        assert var.path is not None and chosen.compiled is not None and chosen.evaluation
        suffix = "" if profile.compiler.kind == "none" else f"-{profile.compiler.kind}"
        artifact = dest_dir / f"{self.stem}-{chosen.variant}{suffix}.tflite"
        atomic_write_bytes(artifact, Path(chosen.compiled.artifact).read_bytes())
        assert self.val_x is not None
        written = build_golden(
            var.path,
            self.val_x,
            artifact.with_suffix(".golden.npz"),
            max_bytes=golden_cap(artifact.stat().st_size),
        )
        if written.note:
            self.notes.append(f"{profile.id} {chosen.variant}: {written.note}")
        golden = written.path
        info = inspect_bytes(var.path.read_bytes())
        manifest = ArtifactManifest(
            artifact=artifact,
            recipe=chosen.recipe,
            profile=profile.id,
            source_model=self.model_path.name,
            source_sha256=self.source_sha,
            metrics={
                **chosen.evaluation.to_dict(),
                **chosen.extra_metrics,
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
        passing = [v for v in report.variants if v.status == "passed"]
        chosen = self.select(profile, report.variants)
        if chosen is None:
            report.status = "no_variant"
            report.error = "no variant passed the checks and the accuracy budget"
        else:
            self.clear_stale(self.out_dir / profile.id)
            self.publish(profile, chosen, self.out_dir / profile.id)
            report.status = "ok"
        report.candidates = self.publish_candidates(profile, chosen, passing)
        self.emit(profile.id, "done", chosen.recipe if chosen else None, report.status)
        return report

    def publish_candidates(
        self, profile: Any, chosen: VariantReport | None, passing: list[VariantReport]
    ) -> list[Candidate]:
        """Publish the top-K candidates' other variants to candidates/ and write candidates.json.

        Each variant is published once, even when it is ranked with two thread counts.
        """
        profile_dir = self.out_dir / profile.id
        self.clear_stale(profile_dir / CANDIDATES_DIR)
        ranked: list[Candidate] = []
        if chosen is not None:
            threads = candidate_threads(profile.compiler.kind, profile.cpu.cores)
            pairs = rank_candidates(chosen, passing, threads, self.max_candidates)
            for rank, (variant, n_threads) in enumerate(pairs, start=1):
                if variant.manifest is None:
                    self.publish(profile, variant, profile_dir / CANDIDATES_DIR)
                assert variant.manifest is not None
                relative = variant.manifest.relative_to(profile_dir).as_posix()
                ranked.append(Candidate(rank, variant, n_threads, relative))
        write_candidates(profile_dir, profile.id, [c.to_dict() for c in ranked])
        return ranked


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

"""Convert stage: build each recipe's variant once for all profiles, drop duplicates, evaluate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters._files import atomic_write_bytes
from converters.datasets import Samples
from converters.errors import ConverterError
from converters.evaluate import Evaluation, evaluate_variant
from converters.inputs import ORIGINAL, convert_model, recipes_for
from converters.interpreter import load_host_model
from converters.prune import PruneResult
from converters.recipes import PER_CHANNEL_DENSE_MIN_RUNTIME
from converters.report import ProgressCallback, ProgressEvent
from converters.runtime_versions import tflite_compat_version, version_at_least
from converters.tflite_inspect import inspect_bytes
from converters.tflite_rewrite import fingerprint

# Variant key suffix of the dynamic recipe with per-tensor Dense weights (FC v9, runtime ≥ 2.3).
PER_TENSOR_SUFFIX = "-pt"
# Separates a recipe from the pruning tag in variant names: "int8+pruned50", "dynamic-pt+pruned50".
PRUNED_SEPARATOR = "+"
# Without --val, fidelity is measured on this many uniform random inputs in [0, 1).
RANDOM_VAL_SAMPLES = 32


@dataclass
class Variant:
    """A converted recipe shared by all profiles: its file, or why conversion failed."""

    recipe: str
    path: Path | None = None
    error: str | None = None
    evaluation: Evaluation | None = None
    duplicate_of: str | None = None  # the variant this one equals in every tensor


def base_recipe(variant: str) -> str:
    """The converter recipe of a variant name: 'dynamic-pt+pruned50' → 'dynamic'."""
    return variant.partition(PRUNED_SEPARATOR)[0].removesuffix(PER_TENSOR_SUFFIX)


def is_pruned(variant: str) -> bool:
    """Whether a variant name denotes the pruned model ('int8+pruned50')."""
    return PRUNED_SEPARATOR in variant


class ConvertStage:
    """Conversion and evaluation of variants, shared across the profiles of one run."""

    model_path: Path
    out_dir: Path
    source: Path
    stem: str
    fmt: str
    calib: Samples | None
    val: Samples | None
    progress: ProgressCallback | None
    variants: dict[str, Variant]
    fingerprints: dict[str, str]
    notes: list[str]
    reference_recipe: str
    reference_outputs: list[np.ndarray] | None
    val_x: list[np.ndarray] | None
    pruning: PruneResult | None
    pruned_tag: str

    def emit(self, profile: str, stage: str, recipe: str | None = None, message: str = "") -> None:
        """Report progress to the callback, if any."""
        if self.progress is not None:
            self.progress(ProgressEvent(profile, stage, recipe, message))

    def _convert(self, key: str, profile: str) -> Variant:
        """Convert variant `key` once (shared by all profiles); failures are kept, not raised.

        Keys are recipes, plus "dynamic-pt": the dynamic recipe with per-tensor Dense weights,
        and either with "+prunedNN": the same recipe applied to the pruned model. A result equal
        in every tensor to an earlier variant is not kept under a second name (duplicate_of).
        The reference is converted first, so it keeps its name and is never the duplicate.
        """
        if key != self.reference_recipe and self.reference_recipe not in self.variants:
            self._convert(self.reference_recipe, profile)
        if key not in self.variants:
            recipe = base_recipe(key)
            per_tensor = key.partition(PRUNED_SEPARATOR)[0] != recipe
            source = self.source
            if is_pruned(key):
                assert self.pruning is not None
                source = self.pruning.model_path
            self.emit(profile, "convert", key)
            var = Variant(key)
            try:
                calib = self.calib.x if self.calib is not None else None
                data = convert_model(source, recipe, calib=calib, per_tensor_dense=per_tensor)
                same = self._same_as(key, data)
                if same is not None:
                    var.duplicate_of = same
                    var.error = f"equal in every tensor to {same}: dropped, not shipped as {key}"
                    self.notes.append(
                        f"recipe {key} dropped: its output equals {same}'s in every tensor"
                    )
                else:
                    var.path = atomic_write_bytes(
                        self.out_dir / "variants" / f"{self.stem}-{key}.tflite", data
                    )
            except ConverterError as exc:
                var.error = str(exc)
            self.variants[key] = var
        return self.variants[key]

    def _same_as(self, key: str, data: bytes) -> str | None:
        """The earlier variant whose graph and weights equal `data`'s, remembering this one's."""
        try:
            mark = fingerprint(data)
        except Exception:  # an unreadable file is judged by the later stages, not here
            return None
        for other, seen in self.fingerprints.items():
            if seen == mark:
                return other
        self.fingerprints[key] = mark
        return None

    def variant(self, recipe: str, profile: str) -> Variant:
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
        return [rng.random((RANDOM_VAL_SAMPLES, *t.shape[1:]), dtype=np.float32) for t in specs]

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

    def variant_key(self, profile: Any, recipe: str) -> str:
        """The variant to build: 'dynamic' becomes per-tensor Dense for runtimes before 2.17."""
        base, sep, tag = recipe.partition(PRUNED_SEPARATOR)
        if base != "dynamic" or self.fmt == "tflite":
            return recipe
        have = tflite_compat_version(profile.runtime.name, profile.runtime.version)
        if have is not None and not version_at_least(have, PER_CHANNEL_DENSE_MIN_RUNTIME):
            return base + PER_TENSOR_SUFFIX + sep + tag
        return recipe

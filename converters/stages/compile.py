"""Compile-and-judge stage: compile a variant for one profile, run the checks, apply the budget.

A profile whose compiler is not installed still gets its variants judged as plain .tflite files
that run on the CPU, with a warning naming the tool and how to get it; a compiled graph with no
op on the accelerator is "runs on CPU" and is timed on the host, never by the compiler's 0 ms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from converters.checks import blocking_failures, run_checks
from converters.compilers import CompileResult, get_compiler
from converters.errors import ConverterError
from converters.evaluate import Evaluation
from converters.fidelity import Budget, judge
from converters.report import VariantReport
from converters.stages.convert import ConvertStage, base_recipe, is_pruned


class CompileStage(ConvertStage):
    """Per profile and recipe: compile (or fall back to the CPU), check, judge."""

    max_drop: float
    budget: Budget
    layer_explanations: dict[str, str]  # variant → the debugger's worst layers, computed once
    warnings: dict[str, list[str]]  # profile id → warnings, each once

    def warn(self, profile: str, message: str) -> None:
        """Record a warning for a profile once, and report it as progress."""
        seen = self.warnings.setdefault(profile, [])
        if message not in seen:
            seen.append(message)
            self.emit(profile, "warning", None, message)

    def within_budget(self, ev: Evaluation, profile: str = "*") -> tuple[bool, str]:
        """Every output against the budget (the worst decides); a flat reference is a warning."""
        verdict = judge(list(ev.outputs), self.budget, ev.accuracy_drop_points)
        for warning in verdict.warnings:
            self.warn(profile, warning)
        return verdict.ok, verdict.text

    def layer_explanation(self, key: str) -> str:
        """For an int8 variant of a Keras model refused on fidelity: its worst layers (once)."""
        if key != "int8" or self.fmt != "keras" or self.calib is None:
            return ""
        cache = self.layer_explanations
        if key not in cache:
            from converters.qdebug import worst_layers

            try:
                layers = worst_layers(self.source, self.calib.x)
                cache[key] = f"; worst int8 layers (TF quantization debugger): {', '.join(layers)}"
            except ConverterError:
                cache[key] = ""
        return cache[key]

    def compile_for(self, profile: Any, recipe: str, path: Path) -> CompileResult:
        """Compile `path` for the profile; an absent compiler gives the file itself, for the CPU."""
        kind = profile.compiler.kind
        compiler = get_compiler(kind)
        if not compiler.available():
            self.warn(
                profile.id,
                f"{compiler.tool} is not installed: {profile.id} gets an uncompiled .tflite that "
                f"runs on the CPU, not on its accelerator ({compiler.install_hint})",
            )
            return CompileResult("none", path, missing_tool=compiler.tool)
        compile_dir = self.out_dir / profile.id / "compile" / recipe
        self.emit(profile.id, "compile", recipe, kind)
        return compiler.compile(path, compile_dir, dict(profile.compiler.options))

    def try_variant(self, profile: Any, recipe: str) -> VariantReport:
        """Convert (shared), compile for this profile, check and judge one recipe."""
        key = self.variant_key(profile, recipe)
        var = self.variant(key, profile.id)
        if var.duplicate_of is not None and _same_recipe(var.duplicate_of, key):
            key = var.duplicate_of  # e.g. dynamic-pt equal to dynamic: the same recipe's file
            var = self.variant(key, profile.id)
        rep = VariantReport(recipe, variant=key)
        if var.duplicate_of is not None:
            rep.status, rep.reason = "dropped", str(var.error)
            return rep
        if var.path is None or var.evaluation is None:
            stage = "conversion" if var.path is None else "evaluation"
            rep.status, rep.reason = "failed", f"{stage} failed: {var.error}"
            return rep
        rep.evaluation = var.evaluation
        rep.extra_metrics = self.variant_metrics(key)
        try:
            rep.compiled = self.compile_for(profile, recipe, var.path)
        except ConverterError as exc:
            rep.status, rep.reason = "failed", f"compile failed: {exc}"
            return rep
        self.emit(profile.id, "check", recipe)
        compiled = rep.compiled if rep.compiled.compiler != "none" else None
        rep.checks = run_checks(var.path, profile, compiled=compiled)
        if rep.compiled.estimated_latency_ms is not None:
            rep.latency_ms, rep.latency_source = rep.compiled.estimated_latency_ms, "vela"
        else:
            rep.latency_ms, rep.latency_source = var.evaluation.latency_ms_median, "host"
        failed = blocking_failures(rep.checks)
        ok_budget, budget_text = self.within_budget(var.evaluation, profile.id)
        if failed:
            rep.status = "rejected"
            rep.reason = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        elif not ok_budget:
            rep.status = "rejected"
            rep.reason = budget_text + self.layer_explanation(key)
        else:
            rep.status, rep.reason = "passed", budget_text
        where = _cpu_only_reason(rep.compiled)
        if where:
            rep.reason = f"{rep.reason}; {where}"
        return rep


def _same_recipe(a: str, b: str) -> bool:
    """Whether two variant keys are one recipe built two ways ('dynamic' and 'dynamic-pt')."""
    return base_recipe(a) == base_recipe(b) and is_pruned(a) == is_pruned(b)


def _cpu_only_reason(compiled: CompileResult) -> str:
    """Why a variant runs on the CPU although its profile has an accelerator ('' when not)."""
    if compiled.missing_tool:
        return f"runs on CPU ({compiled.missing_tool} not installed)"
    if compiled.npu_ops == 0:
        return f"runs on CPU ({compiled.compiler} mapped no op to the accelerator)"
    return ""

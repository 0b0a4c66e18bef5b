"""Compatibility checks of an artifact against a device profile, in the style of Vela's.

Each check is a small function whose docstring is the reason a user reads when it fails; it
returns `(ok, detail)`. `run_checks` runs them all; `describe_checks` lists them for the CLI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.compilers.base import CompileResult
from converters.errors import ConverterError, ModelInputError
from converters.op_support import (
    LoadResult,
    load_on_runtime,
    unresolved_builtin_ops,
    unresolved_custom_ops,
)
from converters.runtime_versions import required_runtime, tflite_compat_version, version_at_least
from converters.tflite_inspect import ModelInfo, inspect_tflite

# litert-quantizer's hybrid ops at v1 computed correct results on ai-edge-litert 2.3.0 (TF Lite
# registry 2.21) and garbage on tflite-runtime 2.14.0; nothing in between was measured, so only
# runtimes at least this new are trusted with them.
UNDERSTATED_VERSIONS_VERIFIED_RUNTIME = "2.21.0"
MIB = 1024 * 1024
# Custom ops a profile's compiler writes and its delegate (not the op resolver) runs.
COMPILER_CUSTOM_OPS = {"vela": frozenset({"ethos-u"}), "edgetpu": frozenset({"edgetpu-custom-op"})}


@dataclass(frozen=True)
class CheckContext:
    """What the checks look at: the artifact, its parsed flatbuffer, the profile, the compile."""

    artifact: Path
    info: ModelInfo
    profile: Any
    compiled: CompileResult | None = None

    @property
    def int8_only_accelerators(self) -> list[Any]:
        """The profile's accelerators that run integer models only."""
        return [a for a in self.profile.accelerators if a.int8_only]

    @property
    def delegate_ops(self) -> frozenset[str]:
        """Custom ops the profile's delegate runs (Vela's ethos-u, the Edge TPU's op)."""
        return COMPILER_CUSTOM_OPS.get(self.profile.compiler.kind, frozenset())

    @property
    def load(self) -> LoadResult | None:
        """The artifact loaded on the profile's exact runtime version, when one is reachable.

        Artifacts with delegate ops are not loaded: the host runtime has no NPU delegate.
        """
        if any(op in self.delegate_ops for op in self.info.custom_ops):
            return None
        runtime = self.profile.runtime
        return load_on_runtime(self.artifact, runtime.name, runtime.version)

    @property
    def is_mcu(self) -> bool:
        """Whether the device is a microcontroller (no Linux host CPU to absorb fallbacks)."""
        return self.profile.device_class == "mcu-npu"


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: name, pass/fail, what was found, and the reason the check exists."""

    name: str
    ok: bool
    detail: str
    reason: str
    blocking: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "reason": self.reason,
            "blocking": self.blocking,
        }


def op_versions_supported(ctx: CheckContext) -> tuple[bool, str]:
    """The device's TF Lite runtime must know every op version in the model: a newer op version
    fails to load (TF 2.21's dynamic-range FULLY_CONNECTED v12 needs 2.17, not tflite-runtime 2.14).
    """
    runtime = ctx.profile.runtime
    have = tflite_compat_version(runtime.name, runtime.version)
    if have is None:
        return True, f"{runtime.name} resolves kernels by op code and ignores op versions"
    loaded = ctx.load
    if loaded is not None and loaded.ok:
        return True, f"loads on {loaded.runtime} {loaded.version} (load check)"
    if loaded is not None and "builtin" in loaded.error and loaded.unresolved:
        return False, f"{loaded.runtime} {loaded.version}: {_first_line(loaded.error)}"
    known, rest, entry = unresolved_builtin_ops(ctx.info.op_versions, runtime.name, runtime.version)
    if entry is not None and not rest:
        return True, f"{entry.label} resolves all {len(known)} builtin ops (op table)"
    rest_with_custom = {**rest, **{o: v for o, v in ctx.info.op_versions.items() if ":" in o}}
    req = required_runtime(rest_with_custom, ctx.info.min_runtime_version)
    label = f"{runtime.name} {runtime.version} (TF Lite {have})"
    too_new = [f"{op} needs {v}" for op, v in req.by_op.items() if not version_at_least(have, v)]
    if too_new:
        return False, f"{label} is too old: {', '.join(too_new)}"
    meta = ctx.info.min_runtime_version
    if meta and not version_at_least(have, meta):
        return False, f"{label} is older than the model's min_runtime_version {meta}"
    if req.unknown:
        pairs = ", ".join(f"{op} v{v}" for op, v in req.unknown)
        if not meta:
            seen = f"; {entry.label}'s op table lacks them" if entry else ""
            return False, f"no runtime data for {pairs} and no min_runtime_version metadata{seen}"
        return True, f"{label} ≥ min_runtime_version {meta} (table lacks {pairs})"
    return True, f"{label} ≥ required {req.version or 'any'}"


def custom_ops_registered(ctx: CheckContext) -> tuple[bool, str]:
    """Every custom op must be registered by the device's runtime or its delegate: otherwise the
    model converts and runs on the host and first fails on the device ("Encountered unresolved
    custom op").
    """
    runtime = ctx.profile.runtime
    custom = [op for op in ctx.info.custom_ops if op not in ctx.delegate_ops]
    if not custom:
        return True, "no custom ops" if not ctx.info.custom_ops else "only delegate custom ops"
    loaded = ctx.load
    if loaded is not None and loaded.ok:
        return True, f"{', '.join(custom)} resolved: loads on {loaded.runtime} {loaded.version}"
    if loaded is not None and loaded.unresolved:
        missing = [op for op in custom if op in loaded.error] or custom
        return False, (
            f"custom op {', '.join(missing)} is not in {loaded.runtime} {loaded.version} "
            f"(load check: {_first_line(loaded.error)})"
        )
    missing, source = unresolved_custom_ops(custom, runtime.name, runtime.version)
    if missing:
        return False, (
            f"custom op {', '.join(missing)} is not in {runtime.name} {runtime.version} ({source})"
        )
    return True, f"{', '.join(custom)} resolved by {runtime.name} {runtime.version} ({source})"


def _first_line(text: str) -> str:
    """The first line of a runtime's error, without the model path prefix."""
    line = text.strip().splitlines()[0] if text.strip() else text
    return line.split(": ", 1)[1] if line.startswith("/") and ": " in line else line


def op_versions_consistent(ctx: CheckContext) -> tuple[bool, str]:
    """Op versions must match the tensor types: re-quantizers that leave hybrid ops at v1
    (litert-quantizer's dynamic recipes) make models that old runtimes load and then silently
    compute wrong results.
    """
    understated = ctx.info.understated_ops
    if not understated:
        return True, "every op version matches its tensor types"
    runtime = ctx.profile.runtime
    have = tflite_compat_version(runtime.name, runtime.version)
    if have is not None and version_at_least(have, UNDERSTATED_VERSIONS_VERIFIED_RUNTIME):
        return True, f"{'; '.join(understated)} — verified correct on TF Lite ≥ {have}"
    return False, f"{'; '.join(understated)}: unsafe on {runtime.name} {runtime.version}"


def accelerator_runs_all_ops(ctx: CheckContext) -> tuple[bool, str]:
    """Every op should run on the accelerator: ops the compiler (Vela, edgetpu_compiler) leaves
    on the CPU run far slower there, and a microcontroller may lack their kernels altogether.
    """
    compiled = ctx.compiled
    if compiled is None or compiled.cpu_ops is None:
        return True, "no accelerator compiler for this profile"
    if not compiled.cpu_fallbacks and compiled.cpu_ops == 0:
        return True, f"all {compiled.npu_ops} ops on the accelerator"
    ops = sorted({f.op for f in compiled.cpu_fallbacks})
    share = compiled.npu_op_share or 0.0
    first = compiled.cpu_fallbacks[0].reason if compiled.cpu_fallbacks else ""
    return False, (
        f"{compiled.cpu_ops} ops on CPU ({', '.join(ops) or '?'}), {share:.0%} on the "
        f"accelerator; first reason: {first}"
    )


def fits_storage_budget(ctx: CheckContext) -> tuple[bool, str]:
    """The artifact must fit the storage the profile sets aside for models."""
    size = ctx.artifact.stat().st_size
    budget = ctx.profile.memory.storage_budget_mb * MIB
    return size <= budget, f"{size / MIB:.3f} MiB of {budget / MIB:g} MiB"


def fits_ram_budget(ctx: CheckContext) -> tuple[bool, str]:
    """Weights plus activations must fit the RAM the profile allows a model (Vela's SRAM/DRAM
    figures when compiled for Ethos-U, else weights + peak live tensors from the flatbuffer).
    """
    budget = ctx.profile.memory.model_ram_budget_mb * MIB
    estimates = ctx.compiled.estimates if ctx.compiled else {}
    if "sram_used_kib" in estimates:
        used = (estimates["sram_used_kib"] + estimates.get("dram_used_kib", 0.0)) * 1024
        source = "Vela SRAM+DRAM"
    else:
        used = ctx.info.estimated_memory_bytes
        source = "weights + peak activations"
    return used <= budget, f"{used / MIB:.3f} MiB ({source}) of {budget / MIB:g} MiB"


def io_dtypes_match_accelerator(ctx: CheckContext) -> tuple[bool, str]:
    """An integer-only accelerator needs integer inputs, outputs and ops: float tensors either
    fall back to the CPU or are refused (int8/uint8; Ethos-U also takes int16 for int16x8).
    """
    accels = ctx.int8_only_accelerators
    if not accels:
        return True, "no integer-only accelerator"
    allowed = {"int8", "uint8"}
    if ctx.profile.compiler.kind == "vela":
        allowed.add("int16")
    tensors = [*ctx.info.inputs, *ctx.info.outputs]
    bad = sorted({t.dtype for t in tensors if t.dtype not in allowed})
    names = ", ".join(a.name for a in accels)
    if bad:
        return False, f"{names} needs {'/'.join(sorted(allowed))} I/O, model has {', '.join(bad)}"
    if ctx.info.float_ops and ctx.compiled is None:
        return False, f"float ops {', '.join(ctx.info.float_ops)} cannot run on {names}"
    return True, f"I/O {', '.join(sorted({t.dtype for t in tensors}))} suits {names}"


CHECKS: tuple[Callable[[CheckContext], tuple[bool, str]], ...] = (
    op_versions_supported,
    custom_ops_registered,
    op_versions_consistent,
    accelerator_runs_all_ops,
    fits_storage_budget,
    fits_ram_budget,
    io_dtypes_match_accelerator,
)


def reason_of(check: Callable[..., Any]) -> str:
    """A check's docstring as one line: the message the user reads."""
    return " ".join((check.__doc__ or check.__name__).split())


def describe_checks() -> dict[str, str]:
    """Every check's name and reason, in run order (for `edgefleet optimize --check`)."""
    return {c.__name__: reason_of(c) for c in CHECKS}


def _blocking(check_name: str, ctx: CheckContext) -> bool:
    """Which failures rule a variant out, rather than only ranking it lower.

    CPU fallbacks are advisory where a Linux host CPU runs them. Float I/O on an integer-only
    accelerator is advisory when no compiler targets it (the agent simply runs on the CPU, as
    on the i.MX 8M Plus with fp32 allowed); everything else blocks.
    """
    if check_name == accelerator_runs_all_ops.__name__:
        return ctx.is_mcu
    if check_name == io_dtypes_match_accelerator.__name__:
        return ctx.is_mcu or ctx.profile.compiler.kind != "none"
    return True


def run_checks(
    tflite_path: Path,
    profile: Any,
    *,
    compiled: CompileResult | None = None,
    info: ModelInfo | None = None,
) -> list[CheckResult]:
    """Run every check on the artifact that ships (the compiled one when there is one)."""
    artifact = Path(compiled.artifact if compiled else tflite_path)
    ctx = CheckContext(artifact, info or inspect_tflite(artifact), profile, compiled)
    results = []
    for check in CHECKS:
        ok, detail = check(ctx)
        blocking = _blocking(check.__name__, ctx)
        results.append(CheckResult(check.__name__, ok, detail, reason_of(check), blocking))
    return results


def blocking_failures(results: list[CheckResult]) -> list[CheckResult]:
    """The failed checks that rule an artifact out."""
    return [r for r in results if not r.ok and r.blocking]


def check_tflite(tflite_path: Path, profile: Any, *, work_dir: Path) -> list[CheckResult]:
    """`optimize --check`: compile a .tflite for the profile (if it has a compiler), run checks.

    A compiler that is missing or fails becomes a failed `compiles_for_profile` result, so the
    caller can print every check either way.
    """
    from converters.compilers import get_compiler
    from converters.inputs import detect_format

    path = Path(tflite_path)
    if detect_format(path) != "tflite":
        raise ModelInputError(f"--check takes a .tflite file, got {path}")
    compiled = None
    if profile.compiler.kind != "none":
        try:
            compiler = get_compiler(profile.compiler.kind)
            compiled = compiler.compile(path, Path(work_dir), dict(profile.compiler.options))
        except ConverterError as exc:
            reason = "The model must compile for the profile's accelerator."
            failed = CheckResult("compiles_for_profile", False, str(exc), reason)
            return [failed, *run_checks(path, profile)]
    return run_checks(path, profile, compiled=compiled)


def custom_op_problem(
    tflite_path: Path, runtime_name: str, runtime_version: str, compiler_kind: str = "none"
) -> str | None:
    """One line naming the custom ops `runtime_name runtime_version` lacks, or None when it has
    them all (for `models add` and `deploy`, which know a runtime but not a compile)."""
    from types import SimpleNamespace

    profile = SimpleNamespace(
        runtime=SimpleNamespace(name=runtime_name, version=runtime_version),
        compiler=SimpleNamespace(kind=compiler_kind),
    )
    ctx = CheckContext(Path(tflite_path), inspect_tflite(Path(tflite_path)), profile)
    ok, detail = custom_ops_registered(ctx)
    return None if ok else detail

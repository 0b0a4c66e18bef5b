"""Which TF Lite runtime version each (op, version) needs, and what a device's runtime provides.

The table is TF Lite's `tensorflow/lite/tools/versioning/runtime_version.cc` (the map inside
`FindMinimumRuntimeVersionForOp`) for the ops our models and the Keras applications use. Newer
entries are added only where verified; for pairs not in the table the converter's own
`min_runtime_version` metadata is the authority (see `required_runtime`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (builtin op name, op version) → first TF Lite runtime that can run it.
OP_MIN_RUNTIME: dict[tuple[str, int], str] = {
    ("ABS", 1): "1.13.0",
    ("ABS", 2): "2.4.0",
    ("ABS", 3): "2.5.0",
    ("ABS", 4): "2.6.0",
    ("ADD", 1): "1.5.0",
    ("ADD", 2): "1.14.0",
    ("ADD", 3): "2.4.0",
    ("ADD", 4): "2.6.0",
    ("AVERAGE_POOL_2D", 1): "1.5.0",
    ("AVERAGE_POOL_2D", 2): "1.14.0",
    ("AVERAGE_POOL_2D", 3): "2.3.0",
    ("BATCH_MATMUL", 1): "2.3.0",
    ("BATCH_MATMUL", 2): "2.3.0",
    ("BATCH_MATMUL", 3): "2.4.0",
    ("BATCH_MATMUL", 4): "2.5.0",
    ("CAST", 1): "1.5.0",
    ("CAST", 2): "2.7.0",
    ("CAST", 3): "2.8.0",
    ("CAST", 4): "2.9.0",
    ("CONCATENATION", 1): "1.5.0",
    ("CONCATENATION", 2): "1.14.0",
    ("CONCATENATION", 3): "2.3.0",
    ("CONV_2D", 1): "1.5.0",
    ("CONV_2D", 2): "1.14.0",
    ("CONV_2D", 3): "1.14.0",
    ("CONV_2D", 4): "2.3.0",
    ("CONV_2D", 5): "2.4.0",
    ("CONV_2D", 6): "2.9.0",
    ("DEPTHWISE_CONV_2D", 1): "1.5.0",
    ("DEPTHWISE_CONV_2D", 2): "1.12.0",
    ("DEPTHWISE_CONV_2D", 3): "1.14.0",
    ("DEPTHWISE_CONV_2D", 4): "2.2.0",
    ("DEPTHWISE_CONV_2D", 5): "2.3.0",
    ("DEPTHWISE_CONV_2D", 6): "2.3.0",
    ("DEQUANTIZE", 1): "1.13.1",
    ("DEQUANTIZE", 2): "1.14.0",
    ("DEQUANTIZE", 3): "1.15.0",
    ("DEQUANTIZE", 4): "2.2.0",
    ("DEQUANTIZE", 5): "2.7.0",
    ("DIV", 1): "1.6.0",
    ("DIV", 2): "2.3.0",
    ("EXPAND_DIMS", 1): "1.10.0",
    ("FULLY_CONNECTED", 1): "1.5.0",
    ("FULLY_CONNECTED", 2): "1.10.0",
    ("FULLY_CONNECTED", 3): "1.14.0",
    ("FULLY_CONNECTED", 4): "1.14.0",
    ("FULLY_CONNECTED", 5): "2.0.0",
    ("FULLY_CONNECTED", 6): "2.1.0",
    ("FULLY_CONNECTED", 7): "2.3.0",
    ("FULLY_CONNECTED", 8): "2.3.0",
    ("FULLY_CONNECTED", 9): "2.3.0",
    ("FULLY_CONNECTED", 10): "2.11.0",
    # v12 = per-channel dynamic-range (hybrid) weights, emitted by TF 2.21's "dynamic" recipe;
    # TF 2.21 writes min_runtime_version "2.17.0" for a model whose newest op is FC v12, and
    # tflite-runtime 2.14 refuses it ("Didn't find op for builtin opcode 'FULLY_CONNECTED'
    # version '12'"). Both are checked in tests/unit/converters/test_checks.py.
    ("FULLY_CONNECTED", 12): "2.17.0",
    ("HARD_SWISH", 1): "1.15.0",
    ("LEAKY_RELU", 1): "1.13.1",
    ("LEAKY_RELU", 2): "2.3.0",
    ("LOGISTIC", 1): "1.14.0",
    ("LOGISTIC", 2): "1.14.0",
    ("LOGISTIC", 3): "2.3.0",
    ("MAX_POOL_2D", 1): "1.5.0",
    ("MAX_POOL_2D", 2): "1.14.0",
    ("MAX_POOL_2D", 3): "2.3.0",
    ("MAXIMUM", 1): "1.14.0",
    ("MAXIMUM", 2): "1.14.0",
    ("MAXIMUM", 3): "2.3.0",
    ("MAXIMUM", 4): "2.3.0",
    ("MEAN", 1): "1.6.0",
    ("MEAN", 2): "1.14.0",
    ("MEAN", 3): "2.4.0",
    ("MINIMUM", 1): "1.14.0",
    ("MINIMUM", 2): "1.14.0",
    ("MINIMUM", 3): "2.3.0",
    ("MINIMUM", 4): "2.3.0",
    ("MUL", 1): "1.5.0",
    ("MUL", 2): "1.14.0",
    ("MUL", 3): "1.15.0",
    ("MUL", 4): "2.3.0",
    ("MUL", 5): "2.6.0",
    ("PACK", 1): "1.11.0",
    ("PACK", 2): "1.14.0",
    ("PACK", 3): "2.3.0",
    ("PAD", 1): "1.5.0",
    ("PAD", 2): "1.14.0",
    ("PAD", 3): "2.4.0",
    ("PAD", 4): "2.6.0",
    ("PADV2", 1): "1.9.0",
    ("PADV2", 2): "1.14.0",
    ("PADV2", 3): "2.4.0",
    ("PADV2", 4): "2.6.0",
    ("QUANTIZE", 1): "1.14.0",
    ("QUANTIZE", 2): "1.15.0",
    ("QUANTIZE", 3): "2.7.0",
    ("RELU", 1): "1.5.0",
    ("RELU", 2): "2.1.0",
    ("RELU", 3): "2.5.0",
    ("RELU6", 1): "1.5.0",
    ("RELU6", 2): "1.14.0",
    ("RELU6", 3): "2.5.0",
    ("RESHAPE", 1): "1.5.0",
    ("RESIZE_BILINEAR", 1): "1.7.0",
    ("RESIZE_BILINEAR", 2): "1.14.0",
    ("RESIZE_BILINEAR", 3): "2.2.0",
    ("RESIZE_BILINEAR", 4): "2.5.0",
    ("SHAPE", 1): "1.10.0",
    ("SIN", 1): "1.9.0",
    ("SOFTMAX", 1): "1.5.0",
    ("SOFTMAX", 2): "1.14.0",
    ("SOFTMAX", 3): "2.3.0",
    ("SQUEEZE", 1): "1.6.0",
    ("SQUEEZE", 2): "2.5.0",
    ("STRIDED_SLICE", 1): "1.6.0",
    ("STRIDED_SLICE", 2): "1.14.0",
    ("STRIDED_SLICE", 3): "2.1.0",
    ("STRIDED_SLICE", 4): "2.2.0",
    ("STRIDED_SLICE", 5): "2.5.0",
    ("STRIDED_SLICE", 6): "2.6.0",
    ("SUB", 1): "1.6.0",
    ("SUB", 2): "1.14.0",
    ("SUB", 3): "2.3.0",
    ("SUB", 4): "2.4.0",
    ("SUB", 5): "2.4.0",
    ("TANH", 1): "1.14.0",
    ("TANH", 2): "1.14.0",
    ("TANH", 3): "2.3.0",
    ("TRANSPOSE", 1): "1.6.0",
    ("TRANSPOSE", 2): "1.14.0",
    ("TRANSPOSE", 3): "1.15.0",
    ("TRANSPOSE", 4): "2.3.0",
    ("TRANSPOSE", 5): "2.4.0",
}

# Runtimes whose version number is a TF Lite version (same op-version registry as TF).
TFLITE_VERSIONED_RUNTIMES = frozenset({"tflite-runtime", "tflite", "tensorflow", "tensorflow-lite"})
# android-litert is the Maven com.google.ai.edge.litert artifact: same numbering as the wheel.
LITERT_RUNTIMES = frozenset({"ai-edge-litert", "litert", "android-litert"})
# TFLite Micro resolves kernels by builtin code only and does not enforce op versions.
VERSIONLESS_RUNTIMES = frozenset({"tflite-micro", "tflm"})

# ai-edge-litert release → the TF Lite op registry it was cut from. LiteRT restarted its
# numbering at 1.0 when it left TensorFlow; these are lower bounds from its release dates
# (1.0 with TF 2.18, 1.2 with 2.19, 1.4 with 2.20, 2.x with 2.21). 2.3.0 is checked here: it
# loads and runs TF 2.21's FULLY_CONNECTED v12 correctly.
LITERT_TO_TFLITE: tuple[tuple[str, str], ...] = (
    ("2.0.0", "2.21.0"),
    ("1.4.0", "2.20.0"),
    ("1.2.0", "2.19.0"),
    ("1.0.0", "2.18.0"),
)

_VERSION_RE = re.compile(r"^\d+(\.\d+)*")


def parse_version(text: str) -> tuple[int, ...]:
    """'2.14.0' → (2, 14, 0); trailing text such as 'rc1' or '.dev2024' is ignored."""
    match = _VERSION_RE.match(text.strip())
    if not match:
        raise ValueError(f"Not a version number: {text!r}")
    return tuple(int(p) for p in match.group(0).split("."))


def version_at_least(have: str, need: str) -> bool:
    """True when version `have` ≥ `need`, comparing numerically with missing parts as zero."""
    a, b = parse_version(have), parse_version(need)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


def max_version(versions: list[str]) -> str | None:
    """The highest of some version strings, or None for an empty list."""
    best: str | None = None
    for v in versions:
        if best is None or not version_at_least(best, v):
            best = v
    return best


def tflite_compat_version(runtime_name: str, runtime_version: str) -> str | None:
    """The TF Lite op-registry version a runtime offers; None if it ignores op versions.

    Raises ValueError for a runtime name we do not know, naming it.
    """
    name = runtime_name.strip().lower()
    if name in VERSIONLESS_RUNTIMES:
        return None
    if name in TFLITE_VERSIONED_RUNTIMES:
        parse_version(runtime_version)
        return runtime_version
    if name in LITERT_RUNTIMES:
        for litert, tflite in LITERT_TO_TFLITE:
            if version_at_least(runtime_version, litert):
                return tflite
        raise ValueError(f"ai-edge-litert {runtime_version} predates 1.0: unknown op registry")
    known = sorted(TFLITE_VERSIONED_RUNTIMES | LITERT_RUNTIMES | VERSIONLESS_RUNTIMES)
    raise ValueError(f"Unknown runtime {runtime_name!r}: expected one of {', '.join(known)}")


@dataclass(frozen=True)
class RuntimeRequirement:
    """What a model needs from the runtime: the version, which ops set it, and unknown pairs."""

    version: str | None
    by_op: dict[str, str]
    unknown: tuple[tuple[str, int], ...]
    metadata_version: str | None


def required_runtime(
    op_versions: dict[str, int], metadata_version: str | None = None
) -> RuntimeRequirement:
    """Minimum runtime for a model's ops: max over the table and its min_runtime_version."""
    by_op: dict[str, str] = {}
    unknown: list[tuple[str, int]] = []
    for op, version in sorted(op_versions.items()):
        need = OP_MIN_RUNTIME.get((op, version))
        if need is None:
            if not op.startswith("CUSTOM:"):
                unknown.append((op, version))
            continue
        by_op[f"{op} v{version}"] = need
    candidates = list(by_op.values())
    if metadata_version:
        candidates.append(metadata_version)
    return RuntimeRequirement(max_version(candidates), by_op, tuple(unknown), metadata_version)

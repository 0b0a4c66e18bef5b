"""Recipes for an existing .tflite: normalize it to plain fp32, then litert-quantizer recipes.

A pretrained file may hold fp16 constants behind DEQUANTIZE, sparse constants behind DENSIFY
and no SignatureDef; quantizing that as it is changes nothing (the fp16 weights are not float32
tensors to quantize) or fails (static recipes look up the "serving_default" signature). Every
recipe therefore starts from `normalized_tflite`: constants folded to fp32, signature added.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from converters.errors import CalibrationError, ConversionError, ModelInputError
from converters.tflite_inspect import inspect_bytes
from converters.tflite_rewrite import (
    SIGNATURE_KEY,
    RewriteNotes,
    integer_io,
    normalize_tflite,
    signature_input_names,
)

# recipe → litert_quantizer.recipe function name ("fp32" is the normalized file itself).
TFLITE_RECIPES: dict[str, str] = {
    "fp32": "",
    "weight-int8": "weight_only_wi8_afp32",
    "weight-int4": "weight_only_wi4_afp32",
    # Hybrid ops left at v1: old runtimes compute garbage (see checks.op_versions_consistent).
    "dynamic": "dynamic_wi8_afp32",
    # Static recipes quantize activations too, from calibration data; their I/O is integer.
    "int8": "static_wi8_ai8",
    "int16x8": "static_wi8_ai16",
}
"""Recipes for .tflite inputs (besides 'original', the file as given); names as in profiles."""

STATIC_TFLITE_RECIPES = frozenset({"int8", "int16x8"})
"""The .tflite recipes that need calibration data (--calib)."""

QUANTIZER_HINT = "pip install litert-quantizer (or ai-edge-quantizer)"
# TF Lite's docs suggest ~100-500 samples; 200 matches recipes.MAX_CALIBRATION_SAMPLES.
MAX_CALIBRATION_SAMPLES = 200
# Normalized files kept in memory per process: one pipeline run touches one source model.
NORMALIZED_CACHE = 4


def _quantizer_module() -> Any:
    """Import litert_quantizer, else its old name ai_edge_quantizer, else say what to install."""
    try:
        import litert_quantizer

        return litert_quantizer
    except ImportError:
        pass
    try:
        import ai_edge_quantizer

        return ai_edge_quantizer
    except ImportError as exc:
        hint = f"Re-quantizing a .tflite needs litert-quantizer: {QUANTIZER_HINT}"
        raise ConversionError(hint) from exc


@lru_cache(maxsize=NORMALIZED_CACHE)
def normalized_tflite(data: bytes) -> tuple[bytes, RewriteNotes]:
    """The plain fp32, signature-carrying form of a .tflite and what changed to get there.

    Cached per input: every recipe of a run starts from it, and DENSIFY folding runs the model.
    """
    return normalize_tflite(data)


def _read(model: Path | bytes) -> tuple[bytes, str]:
    """The bytes of a .tflite given as a path or bytes, and a name for messages."""
    if isinstance(model, bytes | bytearray):
        return bytes(model), "<bytes>"
    if not Path(model).is_file():
        raise ModelInputError(f"TFLite model not found: {model}")
    return Path(model).read_bytes(), str(model)


def _calibration_feed(data: bytes, calib: np.ndarray, source: str) -> dict[str, list[dict]]:
    """litert-quantizer's calibration input: per signature, one {input name: batch of 1} each."""
    names = signature_input_names(data)
    if len(names) != 1:
        raise CalibrationError(
            f"{source} has {len(names)} inputs; calibrating a multi-input .tflite needs one "
            "array per input, and --calib holds one"
        )
    x = np.asarray(calib, dtype=np.float32)
    if x.ndim < 2 or x.shape[0] == 0:
        raise CalibrationError(f"Calibration data must be a batch (N, ...); got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise CalibrationError("Calibration data contains NaN or infinite values")
    want = tuple(inspect_bytes(data).inputs[0].shape[1:])
    if tuple(x.shape[1:]) != want:
        raise CalibrationError(
            f"Calibration samples have shape {tuple(x.shape[1:])}; {source} takes {want}"
        )
    samples = x[:MAX_CALIBRATION_SAMPLES]
    return {SIGNATURE_KEY: [{names[0]: samples[i : i + 1]} for i in range(samples.shape[0])]}


def requantize_tflite(
    model: Path | bytes, recipe: str, *, calib: np.ndarray | None = None
) -> bytes:
    """Apply a .tflite recipe (see TFLITE_RECIPES) and return the new flatbuffer.

    Static recipes (int8, int16x8) need `calib` and give integer inputs and outputs; a result
    in which some op still computes in float is refused, as for the Keras recipes.
    """
    if recipe not in TFLITE_RECIPES:
        known = ", ".join(TFLITE_RECIPES)
        raise ValueError(f"Unknown .tflite recipe {recipe!r}: expected one of {known}")
    raw, source = _read(model)
    if recipe in STATIC_TFLITE_RECIPES and calib is None:
        raise CalibrationError(
            f"Recipe {recipe!r} quantizes activations and needs a representative dataset "
            f"(--calib .npz/.npy/dir) to convert {source}"
        )
    if not inspect_bytes(raw, source=source).float_ops:
        raise ConversionError(
            f"{source} is already integer-quantized: weight-only/dynamic/static recipes need a "
            "float model"
        )
    data, _ = normalized_tflite(raw)
    if recipe == "fp32":
        return data
    qmod = _quantizer_module()
    recipe_fn = getattr(qmod.recipe, TFLITE_RECIPES[recipe])
    try:
        quantizer = qmod.Quantizer(bytearray(data), recipe_fn())
        # The quantizer logs, warns and prints a size report; keep our output clean.
        with _quiet():
            qsvs = None
            if recipe in STATIC_TFLITE_RECIPES:
                assert calib is not None
                qsvs = quantizer.calibrate(_calibration_feed(data, calib, source))
            result = quantizer.quantize(qsvs, enable_progress_report=False)
    except CalibrationError:
        raise
    except Exception as exc:
        msg = f"litert-quantizer recipe {recipe!r} failed on {source}: {exc}"
        raise ConversionError(msg) from exc
    if result.quantized_model is None:
        raise ConversionError(f"litert-quantizer produced no model for {source} ({recipe})")
    out = bytes(result.quantized_model)
    if recipe in STATIC_TFLITE_RECIPES:
        out, _ = integer_io(out)
        float_ops = inspect_bytes(out, source=source).float_ops
        if float_ops:
            raise ConversionError(
                f"Recipe {recipe!r} on {source}: litert-quantizer left ops in float "
                f"({', '.join(float_ops)}); use 'dynamic' or 'weight-int8' for this model"
            )
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence stdout, Python warnings and root-logger INFO (absl chatter) for the duration."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)

"""Re-quantize an existing .tflite with litert-quantizer (weight-only int8/int4, dynamic int8)."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from converters.errors import ConversionError, ModelInputError
from converters.tflite_inspect import inspect_bytes

# recipe → litert_quantizer.recipe function name.
TFLITE_RECIPES: dict[str, str] = {
    "weight-int8": "weight_only_wi8_afp32",
    "weight-int4": "weight_only_wi4_afp32",
    # Hybrid ops left at v1: old runtimes compute garbage (see checks.op_versions_consistent).
    "dynamic": "dynamic_wi8_afp32",
}
"""Recipes for .tflite inputs (besides 'original', the file as given); names as in profiles."""

QUANTIZER_HINT = "pip install litert-quantizer (or ai-edge-quantizer)"


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


def requantize_tflite(model: Path | bytes, recipe: str) -> bytes:
    """Apply a litert-quantizer recipe to a float .tflite and return the new flatbuffer."""
    if recipe not in TFLITE_RECIPES:
        known = ", ".join(TFLITE_RECIPES)
        raise ValueError(f"Unknown .tflite recipe {recipe!r}: expected one of {known}")
    source = "<bytes>" if isinstance(model, bytes | bytearray) else str(model)
    if isinstance(model, bytes | bytearray):
        data = bytes(model)
    else:
        if not Path(model).is_file():
            raise ModelInputError(f"TFLite model not found: {model}")
        data = Path(model).read_bytes()
    info = inspect_bytes(data, source=source)
    if not info.float_ops:
        raise ConversionError(
            f"{source} is already integer-quantized: weight-only/dynamic recipes need a float model"
        )
    qmod = _quantizer_module()
    recipe_fn = getattr(qmod.recipe, TFLITE_RECIPES[recipe])
    try:
        quantizer = qmod.Quantizer(bytearray(data), recipe_fn())
        # The quantizer logs and prints a size report; keep our output clean.
        with contextlib.redirect_stdout(io.StringIO()), _quiet_logging():
            result = quantizer.quantize(enable_progress_report=False)
    except Exception as exc:
        msg = f"litert-quantizer recipe {recipe!r} failed on {source}: {exc}"
        raise ConversionError(msg) from exc
    if result.quantized_model is None:
        raise ConversionError(f"litert-quantizer produced no model for {source} ({recipe})")
    return bytes(result.quantized_model)


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """Raise the root logger's level to WARNING for the duration (absl INFO chatter)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)

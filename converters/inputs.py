"""Model inputs: detect the format of a model path and convert it with a recipe."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from converters.errors import ConversionError, ModelInputError

# onnx_available is re-exported: callers ask this module whether ONNX inputs can be converted.
from converters.onnx_input import onnx_available as onnx_available
from converters.onnx_input import onnx_to_saved_model
from converters.recipes import RECIPES, convert_keras, convert_saved_model
from converters.requantize import TFLITE_RECIPES, requantize_tflite
from converters.tflite_inspect import TFLITE_FILE_IDENTIFIER

FORMATS = ("keras", "saved_model", "tflite", "onnx")
ORIGINAL = "original"
"""The .tflite recipe that keeps the given file as it is (the baseline for .tflite inputs)."""


def detect_format(model_path: Path) -> str:
    """Name the format of `model_path`: keras (.keras/.h5), saved_model (dir), tflite or onnx."""
    path = Path(model_path)
    if not path.exists():
        raise ModelInputError(f"Model not found: {path}")
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "saved_model"
        raise ModelInputError(f"Directory is not a SavedModel (no saved_model.pb): {path}")
    suffix = path.suffix.lower()
    if suffix in (".keras", ".h5", ".hdf5"):
        return "keras"
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".tflite":
        with path.open("rb") as fh:
            head = fh.read(8)
        if len(head) < 8 or head[4:8] != TFLITE_FILE_IDENTIFIER:
            raise ModelInputError(f"Not a TFLite flatbuffer (no 'TFL3' identifier): {path}")
        return "tflite"
    raise ModelInputError(
        f"Unknown model format {suffix or '(no suffix)'!r} for {path}: "
        "expected .keras, .h5, a SavedModel directory, .tflite or .onnx"
    )


def recipes_for(model_path: Path) -> tuple[str, ...]:
    """The recipes that apply to this model's format (TF converter ones or .tflite ones)."""
    if detect_format(model_path) == "tflite":
        return (ORIGINAL, *TFLITE_RECIPES)
    return RECIPES


def prepare_source(model_path: Path, work_dir: Path) -> Path:
    """The path recipes should read: ONNX becomes a SavedModel in `work_dir` (done once)."""
    path = Path(model_path)
    if detect_format(path) == "onnx":
        return onnx_to_saved_model(path, Path(work_dir) / f"{path.stem}_saved_model")
    return path


def convert_model(
    model_path: Path,
    recipe: str,
    *,
    calib: np.ndarray | None = None,
    per_tensor_dense: bool = False,
) -> bytes:
    """Convert any supported model file with `recipe` and return .tflite bytes.

    `per_tensor_dense` (Keras/SavedModel 'dynamic' only) targets runtimes older than 2.17.
    """
    path = Path(model_path)
    fmt = detect_format(path)
    if fmt == "keras":
        return convert_keras(path, recipe, calib=calib, per_tensor_dense=per_tensor_dense)
    if fmt == "saved_model":
        return convert_saved_model(path, recipe, calib=calib, per_tensor_dense=per_tensor_dense)
    if fmt == "tflite":
        if recipe == ORIGINAL:
            return path.read_bytes()
        if recipe in RECIPES and recipe not in TFLITE_RECIPES:
            raise ConversionError(
                f"Recipe {recipe!r} needs the Keras/SavedModel source; {path} is already a "
                f".tflite: use one of {', '.join(recipes_for(path))}"
            )
        return requantize_tflite(path, recipe, calib=calib)
    with tempfile.TemporaryDirectory(prefix="edgefleet-onnx-") as tmp:
        saved = prepare_source(path, Path(tmp))
        return convert_saved_model(saved, recipe, calib=calib, per_tensor_dense=per_tensor_dense)

"""Quantization recipes run through the real TensorFlow Lite converter (Keras, SavedModel)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from converters._tf import quiet_stdout, tensorflow
from converters.errors import CalibrationError, ConversionError, ModelInputError

RECIPES: tuple[str, ...] = ("fp32", "fp16", "dynamic", "int8", "int16x8")
"""Recipes for Keras/SavedModel inputs, from least to most aggressive."""

CALIBRATED_RECIPES: frozenset[str] = frozenset({"int8", "int16x8"})
"""Recipes that quantize activations and therefore need a representative dataset."""

# TF ≥ 2.17 quantizes Dense weights per channel in the dynamic recipe (FULLY_CONNECTED v12, needs
# runtime 2.17); per-tensor Dense weights give FULLY_CONNECTED v9 (runtime 2.3), which loads and
# computes correctly on tflite-runtime 2.14 (measured in tests/unit/converters/test_checks.py).
PER_CHANNEL_DENSE_MIN_RUNTIME = "2.17.0"

# TF Lite's docs suggest ~100-500 samples; 200 keeps calibration under a second on the digits
# CNN while covering every class several times.
MAX_CALIBRATION_SAMPLES = 200


def needs_calibration(recipe: str) -> bool:
    """Whether `recipe` needs representative data (full-integer recipes do)."""
    check_recipe(recipe)
    return recipe in CALIBRATED_RECIPES


def check_recipe(recipe: str) -> None:
    """Raise ValueError naming `recipe` when it is not one of RECIPES."""
    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}: expected one of {', '.join(RECIPES)}")


def require_calibration(recipe: str, calib: np.ndarray | None, source: str) -> None:
    """Raise CalibrationError when `recipe` needs representative data and `calib` is None."""
    check_recipe(recipe)
    if recipe in CALIBRATED_RECIPES and calib is None:
        raise CalibrationError(
            f"Recipe {recipe!r} quantizes activations and needs a representative dataset "
            f"(--calib .npz/.npy/dir) to convert {source}"
        )


def representative_dataset(calib: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    """Return a TF Lite representative-dataset generator over the first samples of `calib`."""
    data = np.asarray(calib, dtype=np.float32)
    if data.ndim < 2 or data.shape[0] == 0:
        raise CalibrationError(
            f"Calibration data must be a non-empty batch (N, ...); got shape {data.shape}"
        )
    if not np.all(np.isfinite(data)):
        raise CalibrationError("Calibration data contains NaN or infinite values")
    samples = data[:MAX_CALIBRATION_SAMPLES]

    def gen() -> Iterator[list[np.ndarray]]:
        """Yield one sample at a time, as a batch of one."""
        for i in range(samples.shape[0]):
            yield [samples[i : i + 1]]

    return gen


def configure(
    converter: Any,
    recipe: str,
    calib: np.ndarray | None,
    source: str,
    *,
    per_tensor_dense: bool = False,
) -> None:
    """Set optimizations, op sets and I/O types on a TFLiteConverter for `recipe`.

    `per_tensor_dense` makes the dynamic recipe quantize Dense weights per tensor, for runtimes
    older than PER_CHANNEL_DENSE_MIN_RUNTIME.
    """
    tf = tensorflow()
    require_calibration(recipe, calib, source)
    if recipe == "fp32":
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if recipe == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif recipe == "int8":
        assert calib is not None
        converter.representative_dataset = representative_dataset(calib)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif recipe == "int16x8":
        assert calib is not None
        converter.representative_dataset = representative_dataset(calib)
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
        converter.inference_input_type = tf.int16
        converter.inference_output_type = tf.int16
    elif recipe == "dynamic" and per_tensor_dense:
        # Private but long-standing converter flag (TF 2.9+); checked so a rename fails loudly.
        flag = "_experimental_disable_per_channel_quantization_for_dense_layers"
        if not hasattr(converter, flag):
            raise ConversionError(f"This TensorFlow has no {flag}: cannot make FC v9 for {source}")
        setattr(converter, flag, True)
    # "dynamic": Optimize.DEFAULT without a representative dataset = dynamic-range int8 weights.


def run_converter(converter: Any, recipe: str, source: str) -> bytes:
    """Run a configured converter, turning TF's failures into a ConversionError naming the input."""
    try:
        with quiet_stdout():
            data = converter.convert()
    except Exception as exc:  # TF raises ConverterError/RuntimeError/ValueError variously
        first = _first_error_line(str(exc))
        raise ConversionError(f"Recipe {recipe!r} failed to convert {source}: {first}") from exc
    return bytes(data)


def _first_error_line(message: str) -> str:
    """The telling part of a TF converter error: the first "error: …" and any "TF Select ops"."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    found = ""
    for ln in lines:
        if "error:" in ln and not found:
            text = ln.rsplit("error:", 1)[1].strip()
            if text and not text.startswith("failed while converting"):
                found = text
    select = next((ln for ln in lines if ln.startswith("TF Select ops:")), "")
    summary = "; ".join(part for part in (found, select) if part)
    return (summary or (lines[0] if lines else "unknown converter error"))[:500]


def require_integer_only(data: bytes, recipe: str, source: str) -> None:
    """Refuse a full-integer recipe's output when some ops fell back to float kernels."""
    if recipe not in CALIBRATED_RECIPES:
        return
    from converters.tflite_inspect import inspect_bytes

    float_ops = inspect_bytes(data, source=source).float_ops
    if float_ops:
        raise ConversionError(
            f"Recipe {recipe!r} on {source}: ops with no integer kernel stayed in float "
            f"({', '.join(float_ops)}); use the 'dynamic' or 'fp16' recipe, or replace those ops"
        )


def load_keras_model(model_path: Path) -> Any:
    """Load a .keras or .h5 model file, raising ModelInputError naming the file when it fails."""
    path = Path(model_path)
    if not path.is_file():
        raise ModelInputError(f"Keras model file not found: {path}")
    tensorflow()
    import keras

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # corrupt zip, bad HDF5, unknown layer: all are a bad input file
        raise ModelInputError(f"Cannot load Keras model {path}: {exc}") from exc


def with_fixed_batch(model: Any, batch_size: int) -> Any:
    """Clone a functional/Sequential Keras model with a static batch dimension (same weights).

    A static batch gives a clean graph (no SHAPE/STRIDED_SLICE/PACK before RESHAPE), which NPU
    compilers such as Vela need; subclassed models cannot be cloned and are returned unchanged.
    """
    tensorflow()
    import keras

    inputs = getattr(model, "inputs", None)
    if not inputs or len(inputs) != 1:
        return model
    shape = tuple(inputs[0].shape[1:])
    if any(d is None for d in shape):
        return model
    try:
        fixed_input = keras.Input(batch_shape=(batch_size, *shape), dtype=inputs[0].dtype)
        clone = keras.models.clone_model(model, input_tensors=fixed_input)
        clone.set_weights(model.get_weights())
    except Exception:  # subclassed or exotic models: convert them as they are
        return model
    return clone


def convert_keras(
    model_path: Path,
    recipe: str,
    *,
    calib: np.ndarray | None = None,
    batch_size: int | None = 1,
    per_tensor_dense: bool = False,
) -> bytes:
    """Convert a .keras/.h5 model with `recipe`; int8/int16x8 need `calib` (full-integer in/out).

    The batch dimension is fixed to `batch_size` (1: what devices run); None keeps it dynamic.
    """
    require_calibration(recipe, calib, str(model_path))
    model = load_keras_model(Path(model_path))
    if batch_size is not None:
        model = with_fixed_batch(model, batch_size)
    tf = tensorflow()
    with quiet_stdout():
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
    configure(converter, recipe, calib, str(model_path), per_tensor_dense=per_tensor_dense)
    data = run_converter(converter, recipe, str(model_path))
    require_integer_only(data, recipe, str(model_path))
    return data


def convert_saved_model(
    model_dir: Path,
    recipe: str,
    *,
    calib: np.ndarray | None = None,
    per_tensor_dense: bool = False,
) -> bytes:
    """Convert a TensorFlow SavedModel directory with `recipe` (same rules as convert_keras)."""
    path = Path(model_dir)
    require_calibration(recipe, calib, str(path))
    if not (path / "saved_model.pb").is_file():
        raise ModelInputError(f"Not a SavedModel directory (no saved_model.pb): {path}")
    tf = tensorflow()
    try:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(path))
    except Exception as exc:
        raise ModelInputError(f"Cannot load SavedModel {path}: {exc}") from exc
    configure(converter, recipe, calib, str(path), per_tensor_dense=per_tensor_dense)
    data = run_converter(converter, recipe, str(path))
    require_integer_only(data, recipe, str(path))
    return data

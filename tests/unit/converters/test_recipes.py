"""Tests for converters.recipes: every recipe through the real TF Lite converter, and its errors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from converters.digits import digits_keras, load_digits_dataset
from converters.errors import CalibrationError, ConversionError, ModelInputError
from converters.interpreter import load_host_model
from converters.recipes import (
    RECIPES,
    convert_keras,
    convert_saved_model,
    needs_calibration,
    representative_dataset,
)
from converters.tflite_inspect import inspect_bytes

EXPECTED_IO = {
    "fp32": "float32",
    "fp16": "float32",
    "dynamic": "float32",
    "int8": "int8",
    "int16x8": "int16",
}


@pytest.fixture(scope="module")
def keras_model() -> Path:
    """The cached trained digits CNN (.keras)."""
    default = Path(tempfile.gettempdir()) / "edgefleet-test-cache"
    cache = Path(os.environ.get("EDGEFLEET_TEST_CACHE") or default)
    return digits_keras(cache)


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    """Calibration images: the digits training split."""
    return load_digits_dataset().x_train


@pytest.fixture(scope="module")
def converted(keras_model: Path, calib: np.ndarray) -> dict[str, bytes]:
    """Each recipe's .tflite bytes for the digits CNN (one real conversion per recipe)."""
    return {r: convert_keras(keras_model, r, calib=calib) for r in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_io_dtype_and_static_batch(recipe: str, converted: dict[str, bytes]) -> None:
    """Each recipe gives its documented I/O dtype and a static batch of one."""
    info = inspect_bytes(converted[recipe])
    assert [t.dtype for t in info.inputs] == [EXPECTED_IO[recipe]]
    assert [t.dtype for t in info.outputs] == [EXPECTED_IO[recipe]]
    assert info.inputs[0].shape == (1, 8, 8, 1)
    assert "SHAPE" not in info.op_versions  # static batch: no dynamic reshape plumbing


def test_recipe_contents(converted: dict[str, bytes]) -> None:
    """fp16 stores float16 weights, dynamic int8 weights with float compute, int8 no float op."""
    fp16 = inspect_bytes(converted["fp16"])
    assert fp16.tensor_dtypes.get("float16", 0) > 0 and "DEQUANTIZE" in fp16.op_versions
    dynamic = inspect_bytes(converted["dynamic"])
    assert dynamic.tensor_dtypes.get("int8", 0) > 0 and dynamic.float_ops
    for recipe in ("int8", "int16x8"):
        info = inspect_bytes(converted[recipe])
        assert info.float_ops == (), recipe
        assert info.tensor_dtypes.get("float32", 0) == 0, recipe


def test_quantized_recipes_are_smaller(converted: dict[str, bytes]) -> None:
    """Sizes shrink with the recipe: int8 and dynamic < fp16 < fp32; int8 ≤ 0.35 × fp32."""
    size = {r: len(b) for r, b in converted.items()}
    assert size["int8"] < size["fp16"] < size["fp32"]
    assert size["dynamic"] < size["fp16"]
    assert size["int8"] <= 0.35 * size["fp32"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_keeps_accuracy(recipe: str, converted: dict[str, bytes]) -> None:
    """Every recipe stays within 1.5 points of fp32 on the digits test split (real interpreter)."""
    data = load_digits_dataset()
    acc = {}
    for name in ("fp32", recipe):
        pred = load_host_model(converted[name]).predict(data.x_test)
        acc[name] = float((pred.argmax(1) == data.y_test).mean())
    assert acc[recipe] >= acc["fp32"] - 0.015, acc


def test_dynamic_batch_is_kept_on_request(keras_model: Path) -> None:
    """batch_size=None keeps the batch dimension dynamic (-1 in the signature)."""
    model = load_host_model(convert_keras(keras_model, "fp32", batch_size=None))
    assert model.static_batch is None
    assert model.predict(np.zeros((5, 8, 8, 1), np.float32), batch=5).shape == (5, 10)


@pytest.mark.parametrize("recipe", ["int8", "int16x8"])
def test_full_integer_without_calibration_is_a_clear_error(recipe: str, keras_model: Path) -> None:
    """int8/int16x8 without representative data raise CalibrationError naming recipe and model."""
    assert needs_calibration(recipe)
    with pytest.raises(CalibrationError, match=rf"{recipe}.*--calib.*{keras_model.name}"):
        convert_keras(keras_model, recipe)


def test_bad_calibration_data_is_rejected() -> None:
    """Empty, unbatched or NaN calibration data is refused before conversion starts."""
    with pytest.raises(CalibrationError, match="non-empty"):
        representative_dataset(np.zeros((0, 8, 8, 1), np.float32))
    with pytest.raises(CalibrationError, match="non-empty"):
        representative_dataset(np.zeros(5, np.float32))
    with pytest.raises(CalibrationError, match="NaN"):
        representative_dataset(np.full((3, 8, 8, 1), np.nan, np.float32))
    gen = representative_dataset(np.ones((300, 2), np.float32))
    batches = list(gen())
    assert len(batches) == 200 and batches[0][0].shape == (1, 2)


def test_unknown_recipe(keras_model: Path) -> None:
    """An unknown recipe raises ValueError listing the valid ones."""
    with pytest.raises(ValueError, match=r"int4.*fp32"):
        convert_keras(keras_model, "int4")


def test_missing_and_corrupt_keras_files(tmp_path: Path) -> None:
    """A missing or corrupt .keras file raises ModelInputError naming the file."""
    with pytest.raises(ModelInputError, match="not found"):
        convert_keras(tmp_path / "absent.keras", "fp32")
    bad = tmp_path / "corrupt.keras"
    bad.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(ModelInputError, match=r"corrupt\.keras"):
        convert_keras(bad, "fp32")


def _tiny_model(tmp_path: Path, op: str) -> Path:
    """A Dense layer followed by keras.ops.<op>, saved as .keras."""
    import keras

    inp = keras.Input((4,))
    out = getattr(keras.ops, op)(keras.layers.Dense(4)(inp))
    path = tmp_path / f"{op}.keras"
    keras.Model(inp, out).save(path)
    return path


def test_op_without_int8_kernel_is_refused(tmp_path: Path) -> None:
    """SIN has only a float kernel: the int8 recipe refuses the float fallback, fp32 converts."""
    path = _tiny_model(tmp_path, "sin")
    assert "SIN" in inspect_bytes(convert_keras(path, "fp32")).op_versions
    calib = np.random.default_rng(0).random((20, 4), dtype=np.float32)
    with pytest.raises(ConversionError, match=r"no integer kernel.*SIN"):
        convert_keras(path, "int8", calib=calib)


def test_op_unknown_to_tflite_names_the_op(tmp_path: Path) -> None:
    """An op with no TFLite builtin (Erf) fails with a ConversionError naming it."""
    with pytest.raises(ConversionError, match="Erf"):
        convert_keras(_tiny_model(tmp_path, "erf"), "fp32")


@pytest.mark.slow
def test_saved_model_input(tmp_path: Path, keras_model: Path, calib: np.ndarray) -> None:
    """A SavedModel directory converts to fp32 and int8 with the same predictions as Keras."""
    import keras

    export_dir = tmp_path / "saved"
    keras.models.load_model(keras_model).export(export_dir, verbose=False)
    data = load_digits_dataset()
    fp32 = load_host_model(convert_saved_model(export_dir, "fp32"))
    ref = load_host_model(convert_keras(keras_model, "fp32"))
    np.testing.assert_allclose(fp32.predict(data.x_val), ref.predict(data.x_val), atol=1e-5)
    int8 = inspect_bytes(convert_saved_model(export_dir, "int8", calib=calib))
    assert int8.inputs[0].dtype == "int8"
    with pytest.raises(ModelInputError, match=r"saved_model\.pb"):
        convert_saved_model(tmp_path, "fp32")
    with pytest.raises(CalibrationError):
        convert_saved_model(export_dir, "int16x8")

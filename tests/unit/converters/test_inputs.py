"""Tests for converters.inputs, converters.requantize and converters.datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.datasets import load_samples
from converters.digits import digits_keras, digits_tflite, load_digits_dataset
from converters.errors import CalibrationError, ConversionError, ModelInputError
from converters.inputs import (
    ORIGINAL,
    convert_model,
    detect_format,
    recipes_for,
)
from converters.interpreter import load_host_model
from converters.recipes import RECIPES
from converters.requantize import STATIC_TFLITE_RECIPES, TFLITE_RECIPES, requantize_tflite
from converters.tflite_inspect import inspect_bytes
from converters.tflite_rewrite import fingerprint


def test_detect_format(tmp_path: Path, cache_dir: Path) -> None:
    """Formats are told by suffix, SavedModel by its saved_model.pb, .tflite by its identifier."""
    assert detect_format(digits_keras(cache_dir)) == "keras"
    assert detect_format(digits_tflite(cache_dir, "fp32")) == "tflite"
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    assert detect_format(tmp_path / "sm") == "saved_model"
    (tmp_path / "m.h5").write_bytes(b"")
    assert detect_format(tmp_path / "m.h5") == "keras"
    (tmp_path / "m.onnx").write_bytes(b"")
    assert detect_format(tmp_path / "m.onnx") == "onnx"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("absent.keras", None, "not found"),
        ("weights.bin", b"x", "Unknown model format '.bin'"),
        ("fake.tflite", b"\0" * 64, "TFL3"),
        ("empty.tflite", b"", "TFL3"),
        ("plain_dir", "dir", "no saved_model.pb"),
    ],
)
def test_bad_inputs_name_the_problem(
    tmp_path: Path, name: str, content: bytes | str | None, message: str
) -> None:
    """Missing files, unknown suffixes, fake .tflite and plain directories are clear errors."""
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ModelInputError, match=message):
        detect_format(path)
    with pytest.raises(ModelInputError, match=name):
        convert_model(path, "fp32")


def test_recipes_for_each_format(cache_dir: Path) -> None:
    """Keras models get the TF converter recipes; .tflite inputs get original + re-quantization."""
    assert recipes_for(digits_keras(cache_dir)) == RECIPES
    assert recipes_for(digits_tflite(cache_dir, "fp32")) == (ORIGINAL, *TFLITE_RECIPES)


def test_h5_input_converts(tmp_path: Path, cache_dir: Path) -> None:
    """A legacy .h5 file converts through the same path and predicts like the .keras original."""
    import keras

    h5 = tmp_path / "digits.h5"
    keras.models.load_model(digits_keras(cache_dir)).save(h5)
    x = load_digits_dataset().x_val[:20]
    a = load_host_model(convert_model(h5, "fp32")).predict(x)
    b = load_host_model(digits_tflite(cache_dir, "fp32")).predict(x)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_tflite_original_and_refusals(cache_dir: Path) -> None:
    """'original' returns the file unchanged; 'fp32' of an fp32 file is the same model;
    fp16 (TF converter only) is refused; int8 without calibration data says what it needs."""
    fp32 = digits_tflite(cache_dir, "fp32")
    assert convert_model(fp32, ORIGINAL) == fp32.read_bytes()
    assert fingerprint(convert_model(fp32, "fp32")) == fingerprint(fp32.read_bytes())
    with pytest.raises(ConversionError, match="Keras/SavedModel source"):
        convert_model(fp32, "fp16")
    with pytest.raises(CalibrationError, match="--calib"):
        convert_model(fp32, "int8")
    with pytest.raises(ValueError, match="weight-int8"):
        requantize_tflite(fp32, "int3")


@pytest.mark.parametrize("recipe", [r for r in TFLITE_RECIPES if r != "fp32"])
def test_requantize_tflite(recipe: str, cache_dir: Path) -> None:
    """litert-quantizer recipes shrink the model and keep accuracy within 1.5 points (LiteRT)."""
    pytest.importorskip("litert_quantizer")
    fp32 = digits_tflite(cache_dir, "fp32")
    ds = load_digits_dataset()
    calib = ds.x_train if recipe in STATIC_TFLITE_RECIPES else None
    data = convert_model(fp32, recipe, calib=calib)
    max_ratio = 0.2 if "int4" in recipe else 0.32  # int4 weights take half of int8's bytes
    assert len(data) <= max_ratio * fp32.stat().st_size
    acc = {}
    for name, model in (("fp32", fp32.read_bytes()), (recipe, data)):
        pred = load_host_model(model).predict(ds.x_val)
        acc[name] = float((pred.argmax(1) == ds.y_val).mean())
    assert acc[recipe] >= acc["fp32"] - 0.015, acc


def test_litert_quantizer_dynamic_output_has_understated_versions(cache_dir: Path) -> None:
    """litert-quantizer's dynamic recipe leaves hybrid ops at v1: the inspector flags each one."""
    pytest.importorskip("litert_quantizer")
    info = inspect_bytes(requantize_tflite(digits_tflite(cache_dir, "fp32"), "dynamic"))
    flagged = " ".join(info.understated_ops)
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
        assert f"{op} v1 is float-only" in flagged
    weight_only = inspect_bytes(requantize_tflite(digits_tflite(cache_dir, "fp32"), "weight-int8"))
    assert weight_only.understated_ops == ()


def test_requantize_refuses_integer_model(cache_dir: Path) -> None:
    """An int8 model cannot be re-quantized weight-only: the error names the file."""
    int8 = digits_tflite(cache_dir, "int8")
    with pytest.raises(ConversionError, match="already integer"):
        requantize_tflite(int8, "weight-int8")


def test_load_samples_formats(tmp_path: Path) -> None:
    """.npy gives inputs; .npz gives x and y by key; a directory concatenates its files."""
    x = np.arange(24, dtype=np.float64).reshape(6, 2, 2)
    y = np.arange(6)
    np.save(tmp_path / "a.npy", x)
    np.savez(tmp_path / "b.npz", x=x, y=y)
    np.savez(tmp_path / "c.npz", images=x[:2], labels=y[:2])
    a = load_samples(tmp_path / "a.npy")
    assert a.x.dtype == np.float32 and a.y is None and a.x.shape == (6, 2, 2)
    b = load_samples(tmp_path / "b.npz")
    np.testing.assert_array_equal(b.y, y)
    d = tmp_path / "dir"
    d.mkdir()
    np.savez(d / "1.npz", x=x, y=y)
    np.savez(d / "2.npz", x=x[:2], y=y[:2])
    both = load_samples(d)
    assert both.x.shape[0] == 8 and both.y is not None and both.y.shape == (8,)


def test_load_samples_errors(tmp_path: Path) -> None:
    """Missing files, ambiguous .npz keys, mismatched labels and odd suffixes are refused."""
    with pytest.raises(ModelInputError, match="not found"):
        load_samples(tmp_path / "nope.npz")
    np.savez(tmp_path / "amb.npz", a=np.zeros((2, 2)), b=np.zeros((2, 2)))
    with pytest.raises(ModelInputError, match="cannot tell the inputs"):
        load_samples(tmp_path / "amb.npz")
    np.savez(tmp_path / "mismatch.npz", x=np.zeros((3, 2)), y=np.zeros(2))
    with pytest.raises(ModelInputError, match="2 labels for 3 inputs"):
        load_samples(tmp_path / "mismatch.npz")
    (tmp_path / "data.csv").write_text("1,2\n")
    with pytest.raises(ModelInputError, match="Unsupported"):
        load_samples(tmp_path / "data.csv")
    (tmp_path / "broken.npy").write_bytes(b"not numpy")
    with pytest.raises(ModelInputError, match=r"broken\.npy"):
        load_samples(tmp_path / "broken.npy")

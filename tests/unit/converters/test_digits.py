"""Tests for converters.digits: dataset split, training and the cached TFLite conversions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.digits import digits_keras, digits_tflite, load_digits_dataset, train_digits_cnn
from converters.interpreter import load_host_model


def test_dataset_shapes_dtypes_and_range() -> None:
    """Images are float32 NHWC in [0, 1]; labels are ints 0..9; the split covers all 1797."""
    data = load_digits_dataset()
    splits = ((data.x_train, data.y_train), (data.x_val, data.y_val), (data.x_test, data.y_test))
    for x, y in splits:
        assert x.dtype == np.float32
        assert x.shape[1:] == (8, 8, 1)
        assert x.shape[0] == y.shape[0]
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert np.issubdtype(y.dtype, np.integer)
        assert set(np.unique(y)) == set(range(10))
    total = data.x_train.shape[0] + data.x_val.shape[0] + data.x_test.shape[0]
    assert total == 1797
    assert data.input_shape == (8, 8, 1)


def test_dataset_split_is_stratified_and_seeded() -> None:
    """Each split keeps the class proportions; the same seed gives the same split, others differ."""
    a, b, c = load_digits_dataset(0), load_digits_dataset(0), load_digits_dataset(1)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.x_val, c.x_val)
    overall = np.bincount(np.concatenate([a.y_train, a.y_val, a.y_test]), minlength=10) / 1797
    for y in (a.y_train, a.y_val, a.y_test):
        share = np.bincount(y, minlength=10) / len(y)
        assert np.abs(share - overall).max() < 0.01


def test_trained_model_reaches_95_percent_validation_accuracy(cache_dir: Path) -> None:
    """The cached digits CNN scores ≥ 0.95 on the validation split (fp32 TFLite, real runtime)."""
    data = load_digits_dataset()
    model = load_host_model(digits_tflite(cache_dir, "fp32"))
    pred = model.predict(data.x_val, batch=64)
    assert (pred.argmax(axis=1) == data.y_val).mean() >= 0.95


def test_digits_tflite_is_cached_by_content(cache_dir: Path) -> None:
    """A second call returns the same file without rewriting it; recipes get distinct files."""
    first = digits_tflite(cache_dir, "dynamic")
    mtime = first.stat().st_mtime_ns
    again = digits_tflite(cache_dir, "dynamic")
    assert again == first and again.stat().st_mtime_ns == mtime
    assert digits_tflite(cache_dir, "fp32") != first
    assert digits_keras(cache_dir).suffix == ".keras"


def test_int8_digits_has_int8_io_and_keeps_accuracy(cache_dir: Path) -> None:
    """The default recipe is full-integer with int8 in/out and loses ≤ 1 point of test accuracy."""
    data = load_digits_dataset()
    int8 = load_host_model(digits_tflite(cache_dir))
    fp32 = load_host_model(digits_tflite(cache_dir, "fp32"))
    assert np.dtype(int8.input_details[0]["dtype"]) == np.int8
    assert np.dtype(int8.output_details[0]["dtype"]) == np.int8
    acc8 = (int8.predict(data.x_test, batch=64).argmax(1) == data.y_test).mean()
    acc32 = (fp32.predict(data.x_test, batch=64).argmax(1) == data.y_test).mean()
    assert acc8 >= acc32 - 0.01
    int8_size = digits_tflite(cache_dir).stat().st_size
    assert int8_size <= 0.35 * digits_tflite(cache_dir, "fp32").stat().st_size


def test_unknown_recipe_is_rejected(cache_dir: Path) -> None:
    """An unknown recipe name raises ValueError naming it."""
    with pytest.raises(ValueError, match="int3"):
        digits_tflite(cache_dir, "int3")


def test_train_writes_keras_file_and_validates_arguments(tmp_path: Path) -> None:
    """Training for one epoch writes a loadable .keras file; bad suffix or epochs are refused."""
    with pytest.raises(ValueError, match=r"\.keras"):
        train_digits_cnn(tmp_path / "m.h5", epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        train_digits_cnn(tmp_path / "m.keras", epochs=0)
    out = train_digits_cnn(tmp_path / "sub" / "m.keras", epochs=1)
    assert out.is_file() and out.stat().st_size > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["m.keras"]  # no temp file left behind

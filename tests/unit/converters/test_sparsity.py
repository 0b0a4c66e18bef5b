"""Tests for converters.sparsity: kernels' zero share and gzip size, from real .tflite files."""

from __future__ import annotations

import gzip
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from converters.digits import digits_tflite
from converters.errors import InspectError
from converters.recipes import convert_keras
from converters.sparsity import (
    GZIP_LEVEL,
    _values,
    _zero_points,
    compressed_size,
    weight_sparsity,
    weight_sparsity_file,
)

# The digits CNN's kernels: 3×3×1×16 + 3×3×16 + 1×1×16×32 + 128×64 + 64×10 elements.
DIGITS_KERNEL_ELEMENTS = 144 + 144 + 512 + 8192 * 4 + 640


@pytest.fixture(scope="module")
def quarter_zero_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Dense(64→32) Keras model with exactly every 4th kernel column zero, |others| ≥ 0.5."""
    import keras

    rng = np.random.default_rng(0)
    kernel = rng.choice([-1.0, 1.0], (64, 32)) * rng.uniform(0.5, 1.0, (64, 32))
    kernel[:, ::4] = 0.0
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32)])
    model.layers[0].set_weights([kernel.astype(np.float32), np.ones(32, np.float32)])
    path = tmp_path_factory.mktemp("sparsity") / "quarter.keras"
    model.save(path)
    return path


@pytest.mark.parametrize("recipe", ["fp32", "fp16", "dynamic"])
def test_known_zero_share_is_measured_in_every_storage_type(
    quarter_zero_model: Path, recipe: str
) -> None:
    """float32, float16 and per-channel int8 kernels: exactly 25 %; the rank-1 bias is left out."""
    data = convert_keras(quarter_zero_model, recipe)
    got = weight_sparsity(data)
    assert got.weight_elements == 64 * 32 and got.weight_tensors == 1
    assert got.weight_zeros == 64 * 8
    assert got.weight_sparsity == pytest.approx(0.25)


def test_digits_files_count_every_kernel(cache_dir: Path) -> None:
    """fp32 digits has no zero weight; int8 has a few weights that quantization rounds to 0."""
    fp32 = weight_sparsity_file(digits_tflite(cache_dir, "fp32"))
    int8 = weight_sparsity_file(digits_tflite(cache_dir, "int8"))
    assert fp32.weight_elements == int8.weight_elements == DIGITS_KERNEL_ELEMENTS
    assert fp32.weight_tensors == int8.weight_tensors == 5
    assert fp32.weight_zeros == 0
    assert 0 < int8.weight_sparsity < 0.05


def test_compressed_size_is_gzip_9_and_deterministic(cache_dir: Path) -> None:
    """The figure is gzip -9 of the bytes, the same every time, smaller for zero runs."""
    data = digits_tflite(cache_dir, "int8").read_bytes()
    assert compressed_size(data) == compressed_size(data)
    assert compressed_size(data) == len(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0))
    assert compressed_size(bytes(len(data))) < compressed_size(data) < len(data)


def test_int4_values_are_unpacked_low_nibble_first() -> None:
    """Two signed 4-bit values per byte, low nibble first; an odd count drops the last nibble."""
    packed = bytes([0x10, 0x8F, 0x07])  # (0, 1), (-1, -8), (7, 0)
    values = _values(packed, "INT4", 5)
    assert values is not None
    assert values.tolist() == [0, 1, -1, -8, 7]
    assert _values(b"\x00", "STRING", 1) is None


def test_zero_point_per_channel_is_broadcast_along_its_axis() -> None:
    """A uint8 tensor with one zero point per output channel compares each row with its own."""
    zps = np.array([3, 5], dtype=np.int64)
    quant = SimpleNamespace(
        ZeroPointLength=lambda: 2,
        ZeroPointAsNumpy=lambda: zps,
        QuantizedDimension=lambda: 0,
    )
    tensor = SimpleNamespace(Quantization=lambda: quant)
    zero = _zero_points(tensor, (2, 3))
    assert np.asarray(zero).tolist() == [3, 3, 3, 5, 5, 5]
    symmetric = SimpleNamespace(
        Quantization=lambda: SimpleNamespace(
            ZeroPointLength=lambda: 2, ZeroPointAsNumpy=lambda: np.zeros(2, np.int64)
        )
    )
    assert _zero_points(symmetric, (2, 3)) == 0


def test_not_a_tflite_file_is_refused(tmp_path: Path) -> None:
    """Bytes without the TFL3 identifier, or a truncated flatbuffer, raise InspectError."""
    with pytest.raises(InspectError, match="TFL3"):
        weight_sparsity(b"not a model at all")
    bad = tmp_path / "cut.tflite"
    bad.write_bytes(b"\x18\x00\x00\x00TFL3" + b"\xff" * 16)
    with pytest.raises(InspectError, match=r"cut\.tflite"):
        weight_sparsity_file(bad)

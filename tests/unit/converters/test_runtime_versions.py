"""Tests for converters.runtime_versions: the op→runtime table and version arithmetic."""

from __future__ import annotations

import itertools

import pytest

from converters.runtime_versions import (
    OP_MIN_RUNTIME,
    max_version,
    parse_version,
    required_runtime,
    tflite_compat_version,
    version_at_least,
)

MODEL_OPS = [
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "FULLY_CONNECTED",
    "ADD",
    "MUL",
    "AVERAGE_POOL_2D",
    "MAX_POOL_2D",
    "RESHAPE",
    "SOFTMAX",
    "MEAN",
    "QUANTIZE",
    "DEQUANTIZE",
    "HARD_SWISH",
    "PAD",
    "CONCATENATION",
    "RELU6",
    "LOGISTIC",
]


@pytest.mark.parametrize("op", MODEL_OPS)
def test_table_covers_our_ops_from_version_1(op: str) -> None:
    """Every op our models use has an entry for v1, and later versions never need less."""
    versions = sorted(v for (name, v) in OP_MIN_RUNTIME if name == op)
    assert versions and versions[0] == 1
    needs = [OP_MIN_RUNTIME[(op, v)] for v in versions]
    for older, newer in itertools.pairwise(needs):
        assert version_at_least(newer, older), (op, older, newer)


def test_version_arithmetic() -> None:
    """Versions compare numerically, missing parts count as zero, suffixes are ignored."""
    assert parse_version("2.14.0rc1") == (2, 14, 0)
    assert version_at_least("2.17", "2.17.0")
    assert version_at_least("2.10.0", "2.9.1")
    assert not version_at_least("2.14.0", "2.17.0")
    assert max_version(["1.14.0", "2.3.0", "1.5.0"]) == "2.3.0"
    assert max_version([]) is None
    with pytest.raises(ValueError, match="Not a version"):
        parse_version("latest")


def test_required_runtime_takes_the_max_of_table_and_metadata() -> None:
    """FC v12 needs 2.17.0; metadata can raise the bar; unknown pairs are listed, not guessed."""
    req = required_runtime({"CONV_2D": 1, "FULLY_CONNECTED": 12}, "1.5.0")
    assert req.version == "2.17.0" and req.by_op["FULLY_CONNECTED v12"] == "2.17.0"
    assert required_runtime({"CONV_2D": 1}, "2.20.0").version == "2.20.0"
    odd = required_runtime({"CONV_2D": 99, "CUSTOM:ethos-u": 1})
    assert odd.unknown == (("CONV_2D", 99),) and odd.version is None


def test_runtime_names_map_to_tflite_versions() -> None:
    """tflite-runtime is itself; LiteRT maps to its TF registry; TFLM ignores versions."""
    assert tflite_compat_version("tflite-runtime", "2.14.0") == "2.14.0"
    assert tflite_compat_version("ai-edge-litert", "2.3.0") == "2.21.0"
    assert tflite_compat_version("ai-edge-litert", "1.2.0") == "2.19.0"
    assert tflite_compat_version("tflite-micro", "any") is None
    with pytest.raises(ValueError, match="Unknown runtime 'onnxruntime'"):
        tflite_compat_version("onnxruntime", "1.0")

"""Tests for converters.tflite_inspect on real converter output and on broken files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from converters.digits import digits_tflite
from converters.errors import InspectError
from converters.interpreter import load_host_model
from converters.tflite_inspect import inspect_bytes, inspect_tflite
from tests.paths import REPO_ROOT


def test_ops_match_the_interpreter(cache_dir: Path) -> None:
    """The op names read from the flatbuffer are exactly those the interpreter reports."""
    for recipe in ("fp32", "int8"):
        path = digits_tflite(cache_dir, recipe)
        info = inspect_tflite(path)
        interp = load_host_model(path).interpreter
        names = [op["op_name"] for op in interp._get_ops_details()]
        expected = [n for n in names if n != "DELEGATE"]
        if len(expected) == len(info.ops):  # no delegate rewrote the graph
            assert [op.name for op in info.ops] == expected
        assert set(info.op_versions) >= set(expected)


def test_int8_model_facts(cache_dir: Path) -> None:
    """The int8 digits model: int8 I/O with quantization, integer op versions, no float op."""
    info = inspect_tflite(digits_tflite(cache_dir, "int8"))
    assert info.inputs[0].dtype == "int8" and info.inputs[0].shape == (1, 8, 8, 1)
    assert info.inputs[0].quantization is not None and info.inputs[0].quantization[0] > 0
    assert info.outputs[0].dtype == "int8" and info.outputs[0].shape == (1, 10)
    assert info.op_versions["CONV_2D"] >= 3  # int8 kernels start at v3
    assert info.op_versions["FULLY_CONNECTED"] >= 4
    assert info.float_ops == ()
    assert info.min_runtime_version is not None
    assert "min_runtime_version" in info.metadata_names
    assert info.size_bytes == digits_tflite(cache_dir, "int8").stat().st_size


def test_fp32_and_dynamic_facts(cache_dir: Path) -> None:
    """fp32 computes in float; TF 2.21's dynamic recipe emits FULLY_CONNECTED v12 (2.17.0)."""
    fp32 = inspect_tflite(digits_tflite(cache_dir, "fp32"))
    assert "FULLY_CONNECTED" in fp32.float_ops and fp32.op_versions["FULLY_CONNECTED"] == 1
    dynamic = inspect_tflite(digits_tflite(cache_dir, "dynamic"))
    assert dynamic.op_versions["FULLY_CONNECTED"] >= 12
    assert dynamic.min_runtime_version is not None
    assert tuple(int(p) for p in dynamic.min_runtime_version.split(".")) >= (2, 17)


def test_memory_estimates(cache_dir: Path) -> None:
    """Weights dominate fp32; int8 weights are ~4× smaller; activations are a positive peak."""
    fp32 = inspect_tflite(digits_tflite(cache_dir, "fp32"))
    int8 = inspect_tflite(digits_tflite(cache_dir, "int8"))
    assert 0.8 * fp32.size_bytes < fp32.weights_bytes < fp32.size_bytes
    assert int8.weights_bytes < 0.3 * fp32.weights_bytes
    # fp32 first conv output 8×8×16 floats = 4 KiB must be live at once
    assert fp32.activation_peak_bytes >= 8 * 8 * 16 * 4
    assert int8.activation_peak_bytes < fp32.activation_peak_bytes
    assert fp32.estimated_memory_bytes == fp32.weights_bytes + fp32.activation_peak_bytes


def test_to_dict_is_json_ready(cache_dir: Path) -> None:
    """to_dict() round-trips through json with op counts and I/O tensors."""
    import json

    d = json.loads(json.dumps(inspect_tflite(digits_tflite(cache_dir, "int8")).to_dict()))
    assert d["inputs"][0]["dtype"] == "int8"
    assert d["op_counts"]["CONV_2D"] == 2
    assert d["float_ops"] == []


def test_broken_files(tmp_path: Path, cache_dir: Path) -> None:
    """Empty, random, truncated and missing files raise InspectError naming the file."""
    good = digits_tflite(cache_dir, "fp32").read_bytes()
    with pytest.raises(InspectError, match="TFL3"):
        inspect_bytes(b"", source="empty.tflite")
    with pytest.raises(InspectError, match=r"random\.tflite"):
        inspect_bytes(bytes(range(256)) * 8, source="random.tflite")
    with pytest.raises(InspectError, match=r"Corrupt.*half\.tflite"):
        inspect_bytes(good[: len(good) // 2], source="half.tflite")
    with pytest.raises(InspectError, match="not found"):
        inspect_tflite(tmp_path / "absent.tflite")


def test_inspection_does_not_import_tensorflow(cache_dir: Path) -> None:
    """Reading a .tflite must not pull TensorFlow in (the controller CLI starts fast)."""
    path = digits_tflite(cache_dir, "int8")
    code = (
        "import sys; from converters.tflite_inspect import inspect_tflite; "
        f"i = inspect_tflite({str(path)!r}); "
        "print('tensorflow' in sys.modules, 'keras' in sys.modules, i.inputs[0].dtype)"
    )
    root = REPO_ROOT
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["False", "False", "int8"]


def test_importing_converters_does_not_import_tensorflow() -> None:
    """`import converters.*` (all modules) leaves TensorFlow unimported."""
    code = (
        "import sys, pkgutil, importlib, converters\n"
        "for m in pkgutil.walk_packages(converters.__path__, 'converters.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('tensorflow' in sys.modules)"
    )
    root = REPO_ROOT
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "False"

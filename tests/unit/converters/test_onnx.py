"""Tests for converters.onnx_input: ONNX → SavedModel with onnx2tf, then the usual recipes."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import firmware_profiles
from converters._files import sha256_file
from converters.datasets import Samples
from converters.digits import digits_keras, load_digits_dataset
from converters.errors import ConversionError, ModelInputError
from converters.inputs import convert_model, prepare_source
from converters.interpreter import load_host_model
from converters.onnx_input import (
    SAMPLE_IMAGES_FILE,
    missing_onnx_modules,
    onnx_to_saved_model,
    write_sample_images,
)
from converters.pipeline import optimize
from tests.conftest import running_in_ci

# Opset 13 and IR version 8 are read by every onnx / onnxruntime release the extra allows.
OPSET = 13
IR_VERSION = 8
# fp32 TF Lite against onnxruntime on the same weights: float summation order differs only.
FP32_ATOL = 1e-5


def require_onnx_extra() -> None:
    """Skip without the onnx extra (onnxruntime included, the reference); fail under CI."""
    missing = list(missing_onnx_modules())
    if importlib.util.find_spec("onnxruntime") is None:
        missing.append("onnxruntime")
    if missing:
        reason = f"onnx extra not installed (missing: {', '.join(missing)}; make env installs it)"
        if running_in_ci():
            pytest.fail(f"{reason}; CI must run the ONNX tests", pytrace=False)
        pytest.skip(reason)


def build_onnx(
    path: Path,
    nodes: list[Any],
    weights: dict[str, np.ndarray],
    input_shape: list[int],
    output_shape: list[int],
) -> Path:
    """Write a checked single-input, single-output ONNX model ('x' → 'y') with float weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)],
        [
            numpy_helper.from_array(np.ascontiguousarray(v, dtype=np.float32), k)
            for k, v in weights.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def digits_onnx(cache_dir: Path) -> Path:
    """The trained digits CNN rebuilt as an NCHW ONNX graph from its Keras weights (cached)."""
    import keras
    from onnx import helper

    keras_path = digits_keras(cache_dir)
    out = Path(cache_dir) / f"digits_cnn_{sha256_file(keras_path)[:16]}.onnx"
    if out.is_file():
        return out
    model = keras.models.load_model(keras_path)
    conv1, depthwise, conv2, _pool, _flat, dense1, dense2, _softmax = model.layers
    (k1, b1), (dk, db), (k2, b2) = (lyr.get_weights() for lyr in (conv1, depthwise, conv2))
    (d1, e1), (d2, e2) = dense1.get_weights(), dense2.get_weights()
    weights = {
        "c1_w": k1.transpose(3, 2, 0, 1),  # HWIO → OIHW
        "c1_b": b1,
        "dw_w": dk.transpose(2, 3, 0, 1),  # H W C 1 → C 1 H W, one group per channel
        "dw_b": db,
        "c2_w": k2.transpose(3, 2, 0, 1),
        "c2_b": b2,
        # Keras flattens (h, w, c), ONNX flattens (c, h, w): reorder the Dense rows to match.
        "d1_w": d1.reshape(4, 4, 32, 64).transpose(2, 0, 1, 3).reshape(512, 64),
        "d1_b": e1,
        "d2_w": d2,
        "d2_b": e2,
    }
    node = helper.make_node
    same = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        node("Conv", ["x", "c1_w", "c1_b"], ["c1"], **same),
        node("Relu", ["c1"], ["r1"]),
        node("Conv", ["r1", "dw_w", "dw_b"], ["dw"], group=16, **same),
        node("Relu", ["dw"], ["r2"]),
        node("Conv", ["r2", "c2_w", "c2_b"], ["c2"], kernel_shape=[1, 1]),
        node("Relu", ["c2"], ["r3"]),
        node("MaxPool", ["r3"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Flatten", ["p"], ["f"], axis=1),
        node("Gemm", ["f", "d1_w", "d1_b"], ["g1"]),
        node("Relu", ["g1"], ["r4"]),
        node("Gemm", ["r4", "d2_w", "d2_b"], ["g2"]),
        node("Softmax", ["g2"], ["y"], axis=1),
    ]
    return build_onnx(out, nodes, weights, [1, 1, 8, 8], [1, 10])


def rgb_onnx(path: Path) -> Path:
    """A random Conv+Relu+GlobalAveragePool+Gemm model on a 1×3×16×16 (RGB) input."""
    from onnx import helper

    rng = np.random.default_rng(0)
    weights = {
        "w": rng.normal(0.0, 0.3, (4, 3, 3, 3)),
        "b": rng.normal(0.0, 0.1, 4),
        "fw": rng.normal(0.0, 0.3, (4, 5)),
        "fb": rng.normal(0.0, 0.1, 5),
    }
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        node("Relu", ["c"], ["r"]),
        node("GlobalAveragePool", ["r"], ["g"]),
        node("Flatten", ["g"], ["f"]),
        node("Gemm", ["f", "fw", "fb"], ["y"]),
    ]
    return build_onnx(path, nodes, weights, [1, 3, 16, 16], [1, 5])


def onnxruntime_outputs(onnx_path: Path, x_nhwc: np.ndarray) -> np.ndarray:
    """Reference outputs from onnxruntime, one sample at a time, for NHWC inputs (fed as NCHW)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x_nchw = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    return np.concatenate(
        [session.run(None, {"x": x_nchw[i : i + 1]})[0] for i in range(len(x_nchw))]
    )


def narrowed(profile_id: str, *allowed: str) -> firmware_profiles.Profile:
    """A real profile with its allowed recipes narrowed (to keep a test fast)."""
    profile = firmware_profiles.load(profile_id)
    quant = firmware_profiles.Quantization(preferred=allowed[0], allowed=tuple(allowed))
    return dataclasses.replace(profile, quantization=quant)


# =========================================================================== without the extra


def test_missing_extra_names_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With onnx2tf or a module it imports absent, ONNX inputs fail naming each one and the fix."""
    absent = {"onnx2tf", "sng4onnx"}

    def find_spec(name: str, *args: Any) -> Any:
        """find_spec that reports only the `absent` modules as not installed."""
        return None if name in absent else object()

    monkeypatch.setattr("converters.onnx_input.importlib.util.find_spec", find_spec)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07")
    pattern = r"model\.onnx needs the onnx extra \(missing: onnx2tf, sng4onnx\).*edgefleet\[onnx\]"
    with pytest.raises(ModelInputError, match=pattern):
        convert_model(model, "fp32")
    with pytest.raises(ModelInputError, match="tf-keras"):
        prepare_source(model, tmp_path)
    with pytest.raises(ModelInputError, match="missing: onnx2tf"):
        optimize(model, [firmware_profiles.load("rpi5")], out_dir=tmp_path / "out")


def test_sample_images_are_written_locally(tmp_path: Path) -> None:
    """The file onnx2tf would download is written, seeded, as 20 RGB images in [0, 1)."""
    path = write_sample_images(tmp_path)
    assert path.name == SAMPLE_IMAGES_FILE
    images = np.load(path)
    assert images.shape[0] == 20 and images.shape[-1] == 3 and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() < 1.0
    (tmp_path / "again").mkdir()
    np.testing.assert_array_equal(images, np.load(write_sample_images(tmp_path / "again")))


# =========================================================================== with the extra


@pytest.mark.slow
def test_digits_onnx_fp32_matches_onnxruntime(cache_dir: Path, tmp_path: Path) -> None:
    """ONNX → SavedModel → fp32 .tflite predicts like onnxruntime; the .onnx is left untouched."""
    require_onnx_extra()
    model = digits_onnx(cache_dir)
    before = sha256_file(model)
    saved = onnx_to_saved_model(model, tmp_path / "sm")
    assert sha256_file(model) == before
    assert not (tmp_path / "sm_onnx2tf").exists()  # onnx2tf's scratch dir is removed
    ds = load_digits_dataset()
    host = load_host_model(convert_model(saved, "fp32"))
    assert tuple(host.input_details[0]["shape"]) == (1, 8, 8, 1)  # NCHW became NHWC
    got = host.predict(ds.x_val)
    want = onnxruntime_outputs(model, ds.x_val)
    err = float(np.abs(got - want).max())
    assert err <= FP32_ATOL, err
    assert float((got.argmax(1) == ds.y_val).mean()) >= 0.95


@pytest.mark.slow
def test_rgb_input_converts_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 3-channel 4-D input, for which onnx2tf fetches sample images, converts with no network."""
    require_onnx_extra()
    # Any download attempt in the child now fails at once, network or not.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    model = rgb_onnx(tmp_path / "rgb.onnx")
    x = np.random.default_rng(1).random((16, 16, 16, 3), dtype=np.float32)
    got = load_host_model(convert_model(model, "fp32")).predict(x)
    want = onnxruntime_outputs(model, x)
    assert float(np.abs(got - want).max()) <= FP32_ATOL


@pytest.mark.slow
def test_corrupt_onnx_is_a_conversion_error(tmp_path: Path) -> None:
    """A file onnx2tf cannot parse fails with a ConversionError quoting onnx2tf's last lines."""
    require_onnx_extra()
    model = tmp_path / "broken.onnx"
    model.write_bytes(b"not a protobuf at all")
    with pytest.raises(ConversionError, match=r"onnx2tf failed on .*broken\.onnx \(exit "):
        convert_model(model, "fp32")


@pytest.mark.slow
def test_optimize_onnx_fp32_and_int8(cache_dir: Path, tmp_path: Path) -> None:
    """optimize() on the .onnx: fp32 and int8 are converted, evaluated, checked and written."""
    require_onnx_extra()
    model = digits_onnx(cache_dir)
    before = sha256_file(model)
    ds = load_digits_dataset()
    rep = optimize(
        model,
        [narrowed("rpi5", "int8", "fp32")],
        calib=ds.x_train,
        val=Samples(ds.x_val, ds.y_val),
        max_accuracy_drop=1.0,
        out_dir=tmp_path,
    )
    assert sha256_file(model) == before
    prof = rep.profiles[0]
    assert prof.status == "ok", prof.to_dict()
    by_recipe = {v.recipe: v for v in prof.variants}
    assert set(by_recipe) == {"int8", "fp32"}
    for recipe, variant in by_recipe.items():
        assert variant.evaluation is not None, (recipe, variant.reason)
        assert variant.evaluation.samples == len(ds.x_val)
        assert (tmp_path / "variants" / f"{model.stem}-{recipe}.tflite").is_file()
    fp32, int8 = by_recipe["fp32"].evaluation, by_recipe["int8"].evaluation
    assert fp32.accuracy is not None and fp32.accuracy >= 0.95
    assert int8.accuracy_drop_points is not None and int8.accuracy_drop_points <= 1.0
    assert int8.size_bytes < 0.5 * fp32.size_bytes
    selected = prof.selected
    assert selected is not None and selected.artifact is not None and selected.artifact.is_file()
    assert selected.manifest is not None and selected.manifest.is_file()
    assert load_host_model(selected.artifact).input_details[0]["dtype"] in (np.int8, np.float32)


@pytest.mark.slow
def test_cli_optimize_onnx_with_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's `edgefleet optimize model.onnx … --out out/`, run from the model's directory
    with relative paths, converts (onnx2tf runs in a scratch directory of its own) offline."""
    from typer.testing import CliRunner

    from controller.cli.main import app

    require_onnx_extra()
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # a download attempt fails at once
    rgb_onnx(tmp_path / "rgb.onnx")
    monkeypatch.chdir(tmp_path)
    args = ["optimize", "rgb.onnx", "--profile", "x86-64-gateway", "--out", "out/", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    selected = next(iter((tmp_path / "out" / "x86-64-gateway").glob("rgb-*.tflite")))
    x = np.random.default_rng(2).random((4, 16, 16, 3), dtype=np.float32)
    want = onnxruntime_outputs(tmp_path / "rgb.onnx", x)
    got = load_host_model(selected).predict(x)
    assert float(np.abs(got - want).max()) <= 0.05  # fp32/fp16/dynamic all stay this close

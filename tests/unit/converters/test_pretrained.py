"""Pretrained-style .tflite inputs (fp16 weights, two outputs, no signature) through the recipes,
the compilers and optimize(): real recipes, duplicates dropped, missing compilers survived."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import firmware_profiles
from controller.cli.main import app
from converters.compilers import CompileResult
from converters.errors import CalibrationError
from converters.inputs import ORIGINAL, convert_model
from converters.interpreter import load_host_model
from converters.pipeline import optimize
from converters.requantize import TFLITE_RECIPES, requantize_tflite
from converters.tflite_inspect import inspect_bytes
from converters.tflite_rewrite import fingerprint, normalize_tflite
from tests.paths import TEST_DATA
from tests.pretrained_models import detector_scenes

DATA = TEST_DATA / "pretrained"
DETECTOR = DATA / "detector_fp16.tflite"
SPARSE = DATA / "sparse.tflite"
# Calibration scenes: enough for stable int8 ranges on this small detector, quick to run.
CALIB_SAMPLES = 32


@pytest.fixture(scope="module")
def scenes() -> np.ndarray:
    """Calibration/validation images: one bright square each (the detector was trained on them)."""
    return detector_scenes(CALIB_SAMPLES, seed=21)[0]


def detector_outputs(data: bytes, x: np.ndarray) -> list[np.ndarray]:
    """Both outputs, dequantized to float, for every sample (boxes and scores by tensor name)."""
    return load_host_model(data).predict_all(x)


def snr_db(got: np.ndarray, want: np.ndarray) -> float:
    """Signal-to-noise ratio of `got` against `want`, in dB."""
    noise = float(np.mean((got - want) ** 2))
    return 10 * np.log10(float(np.mean(want**2)) / max(noise, 1e-30))


def test_every_recipe_changes_an_fp16_file(scenes: np.ndarray) -> None:
    """No recipe returns the fp16 input under a new name: each one's tensors differ from it and
    from every other recipe's (the bug: dynamic/weight-int8 were the input ±0.14 %)."""
    original = DETECTOR.read_bytes()
    made = {ORIGINAL: original}
    for recipe in TFLITE_RECIPES:
        made[recipe] = convert_model(DETECTOR, recipe, calib=scenes)
    marks = {name: fingerprint(data) for name, data in made.items()}
    assert len(set(marks.values())) == len(marks), marks
    sizes = {name: len(data) for name, data in made.items()}
    assert sizes["fp32"] > 1.5 * sizes[ORIGINAL]  # fp16 → fp32 doubles the weights
    for recipe in ("weight-int8", "dynamic", "int8", "int16x8"):
        assert sizes[recipe] < 0.85 * sizes[ORIGINAL], sizes  # int8 weights beat fp16 ones


@pytest.mark.parametrize(
    ("recipe", "dtype", "min_snr"), [("int8", "int8", 20), ("int16x8", "int16", 20)]
)
def test_static_recipes_give_integer_io_on_both_outputs(
    scenes: np.ndarray, recipe: str, dtype: str, min_snr: float
) -> None:
    """int8/int16x8 from a signature-less fp16 file: integer I/O, no float op, both outputs
    close to the original's (SNR in dB per output) and the same top-scoring anchor."""
    data = requantize_tflite(DETECTOR, recipe, calib=scenes)
    info = inspect_bytes(data)
    assert info.float_ops == ()
    assert [t.dtype for t in (*info.inputs, *info.outputs)] == [dtype] * 3
    want = detector_outputs(DETECTOR.read_bytes(), scenes)
    got = detector_outputs(data, scenes)
    for g, w in zip(got, want, strict=True):
        assert snr_db(g, w) >= min_snr, snr_db(g, w)
    scores = next(k for k, w in enumerate(want) if w.shape[-1] == 1)
    agree = (got[scores][:, :, 0].argmax(1) == want[scores][:, :, 0].argmax(1)).mean()
    assert agree >= 0.95


def test_static_recipes_need_matching_calibration(scenes: np.ndarray) -> None:
    """No --calib, or calibration of the wrong shape, is a CalibrationError saying so."""
    with pytest.raises(CalibrationError, match="--calib"):
        requantize_tflite(DETECTOR, "int8")
    with pytest.raises(CalibrationError, match=r"shape \(16, 16, 3\).*\(32, 32, 3\)"):
        requantize_tflite(DETECTOR, "int8", calib=scenes[:, :16, :16])
    with pytest.raises(CalibrationError, match="NaN"):
        requantize_tflite(DETECTOR, "int8", calib=np.full_like(scenes, np.nan))


def test_sparse_file_gets_dynamic_and_int8() -> None:
    """A DENSIFY model quantizes once its sparse constants are dense (weights really int8)."""
    x = np.random.default_rng(5).random((16, 64), dtype=np.float32)
    for recipe in ("dynamic", "int8"):
        info = inspect_bytes(requantize_tflite(SPARSE, recipe, calib=x))
        assert "DENSIFY" not in info.op_versions
        assert info.tensor_dtypes.get("int8", 0) >= 2, info.tensor_dtypes


def narrowed(profile_id: str, *allowed: str) -> firmware_profiles.Profile:
    """A real profile with its allowed recipes narrowed (to keep a test fast)."""
    profile = firmware_profiles.load(profile_id)
    quant = firmware_profiles.Quantization(preferred=allowed[0], allowed=tuple(allowed))
    return dataclasses.replace(profile, quantization=quant)


def test_identical_recipe_is_dropped_not_shipped(tmp_path: Path) -> None:
    """An fp32 file's 'fp32' recipe equals the original in every tensor: dropped with a note."""
    plain = tmp_path / "plain.tflite"
    plain.write_bytes(normalize_tflite(DETECTOR.read_bytes())[0])
    rep = optimize(plain, [narrowed("x86-64-gateway", "fp32")], out_dir=tmp_path / "out")
    by_recipe = {v.recipe: v for v in rep.profiles[0].variants}
    assert by_recipe["fp32"].status == "dropped"
    assert "equal in every tensor to original" in by_recipe["fp32"].reason
    assert any("recipe fp32 dropped" in n for n in rep.notes)
    assert not list((tmp_path / "out" / "x86-64-gateway").glob("plain-fp32*"))


def test_missing_edgetpu_compiler_still_ships_a_cpu_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenes: np.ndarray
) -> None:
    """Without edgetpu_compiler the Coral profile gets the int8 .tflite for its CPU, a warning
    naming the tool and how to install it, and the run counts as ok."""
    monkeypatch.setenv("PATH", str(tmp_path))  # edgetpu_compiler is surely absent
    rep = optimize(
        DETECTOR, [firmware_profiles.load("coral-dev-board")], calib=scenes, out_dir=tmp_path / "o"
    )
    prof = rep.profiles[0]
    assert prof.status == "ok" and rep.ok
    chosen = prof.selected
    assert chosen is not None and chosen.recipe == "int8"
    assert chosen.compiled is not None and chosen.compiled.missing_tool == "edgetpu_compiler"
    assert "runs on CPU (edgetpu_compiler not installed)" in chosen.reason
    assert chosen.artifact is not None and chosen.artifact.name == "detector_fp16-int8.tflite"
    manifest = json.loads(chosen.manifest.read_text()) if chosen.manifest else {}
    assert manifest["compiler"]["kind"] == "none"
    assert manifest["compiler"]["profile_kind"] == "edgetpu"
    assert prof.warnings and "edgetpu-compiler" in prof.warnings[0]
    assert rep.summary() == "all 1 profile(s) have an artifact"


def test_cpu_only_compile_has_no_latency_estimate() -> None:
    """A compile result with no NPU op, or from a missing tool, gives no compiler latency."""
    npu = CompileResult("vela", Path("m.tflite"), {"inference_time_ms": 0.5}, npu_ops=3, cpu_ops=0)
    cpu = CompileResult("vela", Path("m.tflite"), {"inference_time_ms": 0.0}, npu_ops=0, cpu_ops=9)
    absent = CompileResult("none", Path("m.tflite"), missing_tool="edgetpu_compiler")
    assert npu.estimated_latency_ms == 0.5 and not npu.runs_on_cpu
    assert cpu.estimated_latency_ms is None and cpu.runs_on_cpu
    assert absent.estimated_latency_ms is None and absent.to_dict()["runs_on_cpu"]


def test_cli_closing_line_names_profiles_without_an_artifact(tmp_path: Path) -> None:
    """Without --calib the Ethos-U profile (int8/int16x8 only) gets nothing: exit 1, and the
    closing line names the profile and the missing calibration data, not a progress line."""
    result = CliRunner().invoke(
        app,
        [
            "optimize",
            str(DETECTOR),
            "--profile",
            "corstone-300-u55,x86-64-gateway",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("1 of 2 profile(s) have no artifact — corstone-300-u55:"), last
    assert "--calib" in last and "x86-64-gateway" not in last


@pytest.mark.slow
def test_same_recipe_built_two_ways_is_reused_not_dropped(tmp_path: Path) -> None:
    """A model without Dense layers gives the same file for dynamic and per-tensor dynamic
    (dynamic-pt, for runtimes before 2.17): the old-runtime profile reuses 'dynamic', whose name
    is right for it, instead of losing the recipe as a duplicate."""
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input(shape=(16, 16, 3), batch_size=1)
    x = keras.layers.Conv2D(64, 3, activation="relu")(inputs)  # 1728 weights: quantized
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    path = tmp_path / "convs.keras"
    keras.Model(inputs, outputs).save(path)
    profiles = [narrowed("x86-64-gateway", "dynamic"), narrowed("rpi4", "dynamic")]
    # Random weights: the budget is not what this test is about, so it admits any fidelity.
    rep = optimize(path, profiles, out_dir=tmp_path / "out", max_accuracy_drop=100.0)
    new, old = (p.variants[0] for p in rep.profiles)
    assert new.variant == "dynamic" and new.status == "selected"
    assert old.variant == "dynamic" and old.status == "selected", old.reason
    assert any("recipe dynamic-pt dropped" in n for n in rep.notes)

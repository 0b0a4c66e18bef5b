"""Tests for converters.pipeline.optimize on the digits CNN and real device profiles."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import firmware_profiles
from converters._files import sha256_file
from converters.datasets import Samples
from converters.digits import digits_keras, digits_tflite, load_digits_dataset
from converters.errors import ModelInputError
from converters.evaluate import verify_golden
from converters.manifest import MANIFEST_SCHEMA
from converters.pipeline import LATENCY_TIE, optimize
from converters.report import ProgressEvent


def narrowed(profile_id: str, *allowed: str) -> firmware_profiles.Profile:
    """A real profile with its allowed recipes narrowed (to keep a test fast)."""
    profile = firmware_profiles.load(profile_id)
    quant = firmware_profiles.Quantization(preferred=allowed[0], allowed=tuple(allowed))
    return dataclasses.replace(profile, quantization=quant)


@pytest.fixture(scope="module")
def report(cache_dir: Path, digits: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One optimize() run over a CPU profile, a Vela MCU, a Vela SoC and the Edge TPU board."""
    calib, val = digits
    out = tmp_path_factory.mktemp("optimize")
    events: list[ProgressEvent] = []
    profiles = [
        narrowed("rpi4", "int8", "fp32", "dynamic"),
        firmware_profiles.load("imx93"),
        narrowed("corstone-300-u55", "int8"),
        firmware_profiles.load("coral-dev-board"),
    ]
    rep = optimize(
        digits_keras(cache_dir),
        profiles,
        calib=calib,
        val=val,
        max_accuracy_drop=1.0,
        out_dir=out,
        progress=events.append,
    )
    return rep, events, out


def test_every_profile_gets_a_verdict(report: tuple) -> None:
    """CPU and Vela profiles get an artifact; without edgetpu_compiler the Coral gets the int8
    .tflite for its CPU and a warning saying what it lacks; progress covers all."""
    rep, events, _ = report
    status = {p.profile: p.status for p in rep.profiles}
    assert status["rpi4"] == status["imx93"] == status["corstone-300-u55"] == "ok"
    coral = next(p for p in rep.profiles if p.profile == "coral-dev-board")
    if shutil.which("edgetpu_compiler") is None:
        assert coral.status == "ok" and coral.selected is not None
        assert coral.selected.compiled is not None
        assert coral.selected.compiled.missing_tool == "edgetpu_compiler"
        assert any("edgetpu_compiler is not on PATH" in w for w in coral.warnings)
        assert any(w.startswith("coral-dev-board: edgetpu_compiler") for w in rep.warnings)
    assert rep.ok == (set(status.values()) == {"ok"})
    done = {e.profile for e in events if e.stage == "done"}
    assert done == set(status)
    assert {e.stage for e in events} >= {"start", "convert", "evaluate", "compile", "check"}


def test_vela_profiles_select_by_vela_estimate(report: tuple) -> None:
    """NPU profiles rank by Vela's estimate; int8 wins on the i.MX 93 over int16x8."""
    rep, _, _ = report
    imx93 = next(p for p in rep.profiles if p.profile == "imx93")
    assert all(v.latency_source == "vela" for v in imx93.variants if v.latency_ms is not None)
    assert imx93.selected is not None and imx93.selected.recipe == "int8"
    loser = next(v for v in imx93.variants if v.recipe == "int16x8")
    assert loser.status == "rejected" and "slower" in loser.reason


def test_selected_is_never_slower_than_a_passing_alternative(report: tuple) -> None:
    """The selected variant's latency is within the tie margin of every other passing one."""
    rep, _, _ = report
    for prof in rep.profiles:
        chosen = prof.selected
        if chosen is None:
            continue
        for v in prof.variants:
            if v.status == "rejected" and v.reason.startswith(("slower", "tied")):
                assert chosen.latency_ms <= v.latency_ms * (1 + LATENCY_TIE), (prof.profile, v)


def test_old_runtime_gets_the_compatible_dynamic_variant(report: tuple) -> None:
    """On tflite-runtime 2.14 the dynamic recipe is built with per-tensor Dense (FC v9)."""
    rep, _, _ = report
    rpi4 = next(p for p in rep.profiles if p.profile == "rpi4")
    dynamic = next(v for v in rpi4.variants if v.recipe == "dynamic")
    assert dynamic.variant == "dynamic-pt"
    assert dynamic.status in ("selected", "rejected") and dynamic.checks
    assert all(c.ok for c in dynamic.checks if c.name.startswith("op_versions"))


def test_artifacts_manifests_and_goldens(report: tuple) -> None:
    """Each selected artifact has a manifest whose sha256/size match and a golden that verifies."""
    rep, _, out = report
    for prof in rep.profiles:
        chosen = prof.selected
        if chosen is None:
            continue
        assert chosen.artifact is not None and chosen.artifact.parent == out / prof.profile
        manifest = json.loads(Path(chosen.manifest).read_text())
        assert manifest["schema"] == MANIFEST_SCHEMA
        assert manifest["sha256"] == sha256_file(chosen.artifact)
        assert manifest["size_bytes"] == chosen.artifact.stat().st_size
        assert manifest["recipe"] == chosen.recipe and manifest["profile"] == prof.profile
        assert manifest["metrics"]["accuracy_drop_points"] <= 1.0
        golden = manifest["golden"]
        assert golden["sha256"] == sha256_file(chosen.golden)
        # The golden verifies against the model it was computed with (pre-compile for Vela).
        assert verify_golden(out / "variants" / golden["computed_with"], chosen.golden) <= 1.0
        if prof.profile == "corstone-300-u55":
            assert manifest["compiler"]["estimates"]["inference_time_ms"] > 0
            assert manifest["file"].endswith("-vela.tflite")


def test_report_to_dict_is_json(report: tuple) -> None:
    """to_dict() serializes: selected recipe per profile and a reason for every variant."""
    rep, _, _ = report
    d = json.loads(json.dumps(rep.to_dict()))
    assert {p["profile"]: p["selected"] for p in d["profiles"]}["imx93"] == "int8"
    for p in d["profiles"]:
        for v in p["variants"]:
            assert v["status"] in ("selected", "rejected", "failed") and v["reason"]


def test_missing_calibration_fails_full_integer_recipes(cache_dir: Path, tmp_path: Path) -> None:
    """Without --calib, int8/int16x8 fail with the calibration error; the profile has no variant."""
    rep = optimize(digits_keras(cache_dir), [firmware_profiles.load("imx93")], out_dir=tmp_path)
    prof = rep.profiles[0]
    assert prof.status == "no_variant"
    assert all(v.status == "failed" and "--calib" in v.reason for v in prof.variants)


def test_one_broken_profile_does_not_stop_the_others(cache_dir: Path, tmp_path: Path) -> None:
    """A profile that raises is reported as an error and the next profile still completes."""
    broken = SimpleNamespace(id="broken")  # no quantization section at all
    x = load_digits_dataset().x_val
    rep = optimize(
        digits_keras(cache_dir),
        [broken, narrowed("rpi5", "fp16")],
        val=x,
        out_dir=tmp_path,
    )
    assert [p.status for p in rep.profiles] == ["error", "ok"]
    assert "AttributeError" in (rep.profiles[0].error or "")
    assert rep.profiles[1].selected and rep.profiles[1].selected.evaluation.accuracy is None


def test_fidelity_budget_without_labels(cache_dir: Path, tmp_path: Path) -> None:
    """Without labels the budget applies to top-1 disagreement with fp32 (here: zero allowed)."""
    # Inputs up to 4 while int8 was calibrated on [0, 1]: the int8 input saturates, so int8
    # must disagree with fp32 on some samples, whatever the trained weights are.
    noise = 4 * np.random.default_rng(0).random((270, 8, 8, 1), dtype=np.float32)
    rep = optimize(
        digits_keras(cache_dir),
        [narrowed("rpi5", "fp32", "fp16", "int8")],
        calib=load_digits_dataset().x_train,
        val=noise,
        max_accuracy_drop=0.0,
        out_dir=tmp_path,
    )
    variants = {v.recipe: v for v in rep.profiles[0].variants}
    assert variants["fp32"].status in ("selected", "rejected")
    assert "exceeds" not in variants["fp32"].reason
    over = [v for v in variants.values() if "exceeds the budget" in v.reason]
    for v in variants.values():
        disagrees = v.evaluation is not None and v.evaluation.top1_agreement < 1.0
        assert ("exceeds the budget" in v.reason) == disagrees, v.recipe
    assert "int8" in {v.recipe for v in over}


def test_tflite_input_uses_tflite_recipes(cache_dir: Path, tmp_path: Path) -> None:
    """A .tflite input tries 'original' plus litert-quantizer recipes; the unsafe one is refused."""
    pytest.importorskip("litert_quantizer")
    rep = optimize(
        digits_tflite(cache_dir, "fp32"),
        [narrowed("rpi4", "dynamic"), narrowed("rpi5", "dynamic")],
        val=Samples(load_digits_dataset().x_val, load_digits_dataset().y_val),
        out_dir=tmp_path,
    )
    rpi4, rpi5 = ({v.recipe: v for v in p.variants} for p in rep.profiles)
    assert set(rpi4) == {"original", "dynamic"}
    assert rpi4["dynamic"].status == "rejected"
    assert "op_versions_consistent" in rpi4["dynamic"].reason
    assert rpi5["dynamic"].status != "failed" and "op_versions" not in rpi5["dynamic"].reason


def test_bad_arguments(cache_dir: Path, tmp_path: Path) -> None:
    """A negative budget and an unreadable model are refused before any work starts."""
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        optimize(digits_keras(cache_dir), [], max_accuracy_drop=-1, out_dir=tmp_path)
    torch_file = tmp_path / "x.pt"
    torch_file.write_bytes(b"x")
    with pytest.raises(ModelInputError, match="Unknown model format"):
        optimize(torch_file, [], out_dir=tmp_path)


@pytest.mark.slow
def test_mobilenet_v3_small_end_to_end(tmp_path: Path) -> None:
    """MobileNetV3Small (weights=None): int8 fully on the U65 NPU; int16x8 fails on HARD_SWISH."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(96, 96, 3))
    path = tmp_path / "mnv3s.keras"
    model.save(path)
    rng = np.random.default_rng(0)
    calib = 255 * rng.random((16, 96, 96, 3), dtype=np.float32)
    rep = optimize(
        path,
        [firmware_profiles.load("imx93"), narrowed("rpi5", "fp16", "int8")],
        calib=calib,
        val=calib[:8],
        max_accuracy_drop=100.0,  # random weights: fidelity is not the point here
        out_dir=tmp_path / "out",
    )
    imx93, rpi5 = rep.profiles
    assert imx93.status == "ok" and imx93.selected and imx93.selected.recipe == "int8"
    assert imx93.selected.compiled and imx93.selected.compiled.cpu_ops == 0
    int16 = next(v for v in imx93.variants if v.recipe == "int16x8")
    assert int16.status == "failed" and "HARD_SWISH" in int16.reason
    assert rpi5.status == "ok"

"""optimize() on the shapes people deploy: two heads, four outputs, a flat random-weight softmax."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import firmware_profiles
from agent.golden import parse_golden
from converters.golden import verify_golden
from converters.pipeline import optimize
from tests import model_fixtures

pytestmark = pytest.mark.slow


def narrowed(profile_id: str, *allowed: str) -> firmware_profiles.Profile:
    """A real profile with its allowed recipes narrowed (to keep a test fast)."""
    profile = firmware_profiles.load(profile_id)
    quant = firmware_profiles.Quantization(preferred=allowed[0], allowed=tuple(allowed))
    return dataclasses.replace(profile, quantization=quant)


def test_four_outputs_each_judged_and_golden_holds_all(cache_dir: Path, tmp_path: Path) -> None:
    """Every output gets its numbers; the golden has all four and verifies; the manifest too."""
    images = model_fixtures.calibration_images()
    rep = optimize(
        model_fixtures.landmarks_keras(cache_dir),
        [narrowed("x86-64-gateway", "int8", "fp16")],
        calib=images,
        val=model_fixtures.calibration_images(32, seed=9),
        out_dir=tmp_path,
    )
    (prof,) = rep.profiles
    chosen = prof.selected
    assert chosen is not None and chosen.evaluation is not None, prof.to_dict()
    outputs = chosen.evaluation.outputs
    assert len(outputs) == 4 and all(o.kind == "tensor" for o in outputs)
    assert all(o.snr_db >= 20.0 for o in outputs)
    assert "worst SNR" in chosen.reason
    golden = parse_golden(chosen.golden)
    assert len(golden.outputs) == 4 and golden.version == 2
    manifest = json.loads(Path(chosen.manifest).read_text())
    assert verify_golden(
        tmp_path / "variants" / manifest["golden"]["computed_with"], chosen.golden
    ) <= max(golden.atol)
    assert len(manifest["metrics"]["outputs"]) == 4 and len(manifest["io"]["outputs"]) == 4


def test_a_tight_snr_budget_names_the_worst_output(cache_dir: Path, tmp_path: Path) -> None:
    """--min-snr-db above what int8 reaches: int8 is refused and the reason names an output."""
    rep = optimize(
        model_fixtures.two_head_keras(cache_dir),
        [narrowed("x86-64-gateway", "int8", "fp32")],
        calib=model_fixtures.calibration_images(),
        out_dir=tmp_path,
        min_snr_db=120.0,
    )
    variants = {v.recipe: v for v in rep.profiles[0].variants}
    assert variants["int8"].status == "rejected"
    assert (
        "SNR" in variants["int8"].reason and "below the budget of 120 dB" in variants["int8"].reason
    )
    assert variants["int8"].reason.count("output ") >= 1
    # Keras source: the reason adds the quantization debugger's worst layers.
    assert "worst int8 layers (TF quantization debugger): " in variants["int8"].reason
    assert "rmse/scale" in variants["int8"].reason
    assert variants["fp32"].status == "selected"


def test_flat_reference_is_a_warning_not_a_refusal(cache_dir: Path, tmp_path: Path) -> None:
    """The random-weight softmax: int8 is judged on nothing flat and ships, with a warning."""
    rep = optimize(
        model_fixtures.flat_softmax_keras(cache_dir),
        [narrowed("x86-64-gateway", "int8")],
        calib=model_fixtures.calibration_images(),
        out_dir=tmp_path,
    )
    (prof,) = rep.profiles
    assert prof.status == "ok", prof.to_dict()
    assert prof.selected is not None and "top-1 disagreement" not in prof.selected.reason
    assert any("fp32 reference is flat" in w for w in prof.warnings), prof.warnings
    assert prof.selected.evaluation is not None and prof.selected.evaluation.outputs[0].flat


def test_golden_of_a_segmentation_model_fits_the_cap(cache_dir: Path, tmp_path: Path) -> None:
    """128x128 mask output, ~1 KiB model: one sample, strided mask, under 256 KiB, verifies."""
    from converters.golden import GOLDEN_MIN_CAP_BYTES, build_golden, golden_cap

    model = model_fixtures.tflite_of(cache_dir, model_fixtures.segmentation_keras(cache_dir))
    images = np.random.default_rng(0).random((4, *model_fixtures.SEGMENTATION_SHAPE), np.float32)
    cap = golden_cap(model.stat().st_size)
    assert cap == GOLDEN_MIN_CAP_BYTES
    written = build_golden(model, images, tmp_path / "g.npz", max_bytes=cap)
    assert written.path is not None and written.size_bytes <= cap
    assert written.samples == 1 and written.stride[0] > 1, written
    assert "1 of 4 samples" in written.note and "output 0 every" in written.note
    assert verify_golden(model, written.path) <= parse_golden(written.path).atol[0]

"""Tests for converters.evaluate: metrics on real variants, latency, golden files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.digits import digits_tflite, load_digits_dataset
from converters.errors import GoldenMismatchError
from converters.evaluate import (
    GOLDEN_SAMPLES,
    evaluate_variant,
    fidelity,
    top1_accuracy,
    verify_golden,
    write_golden,
)
from converters.interpreter import load_host_model


@pytest.fixture(scope="module")
def reference(cache_dir: Path) -> np.ndarray:
    """fp32 outputs on the validation split."""
    return load_host_model(digits_tflite(cache_dir, "fp32")).predict(load_digits_dataset().x_val)


def test_fidelity_metrics_on_known_arrays() -> None:
    """Identical outputs: agreement 1, cosine 1, error 0; a flipped row lowers all three."""
    a = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert fidelity(a, a) == (1.0, pytest.approx(1.0), 0.0)
    b = np.array([[0.9, 0.1], [0.8, 0.2]])
    agreement, cos, err = fidelity(b, a)
    assert agreement == 0.5 and cos < 1.0 and err == pytest.approx(0.6)
    assert top1_accuracy(a, np.array([0, 1])) == 1.0
    with pytest.raises(ValueError, match="differs from reference"):
        fidelity(a, a[:1])


def test_fp32_against_itself(cache_dir: Path, reference: np.ndarray) -> None:
    """The reference compared with itself: no drop, perfect fidelity, a real latency."""
    data = load_digits_dataset()
    ev = evaluate_variant(digits_tflite(cache_dir, "fp32"), data.x_val, reference, y_val=data.y_val)
    assert ev.accuracy == ev.reference_accuracy and ev.accuracy_drop_points == 0.0
    assert ev.top1_agreement == 1.0 and ev.max_abs_error < 1e-6
    assert ev.cosine_similarity == pytest.approx(1.0)
    assert 0 < ev.latency_ms_median <= ev.latency_ms_p95 and ev.latency_runs >= 10
    assert ev.samples == data.x_val.shape[0]


def test_int8_variant_metrics(cache_dir: Path, reference: np.ndarray) -> None:
    """int8 vs fp32: drop ≤ 1 point, high fidelity but not exact; to_dict is JSON-ready."""
    data = load_digits_dataset()
    path = digits_tflite(cache_dir, "int8")
    ev = evaluate_variant(path, data.x_val, reference, y_val=data.y_val)
    assert ev.accuracy_drop_points is not None and ev.accuracy_drop_points <= 1.0
    assert ev.top1_agreement >= 0.97 and ev.cosine_similarity > 0.99
    assert 0 < ev.max_abs_error < 0.5
    assert ev.size_bytes == path.stat().st_size
    d = json.loads(json.dumps(ev.to_dict()))
    assert d["accuracy_drop_points"] == ev.accuracy_drop_points


def test_without_labels_only_fidelity(cache_dir: Path, reference: np.ndarray) -> None:
    """Without labels there is no accuracy, only fidelity."""
    x = load_digits_dataset().x_val
    ev = evaluate_variant(digits_tflite(cache_dir, "fp16"), x, reference)
    assert ev.accuracy is None and ev.accuracy_drop_points is None
    assert ev.top1_agreement > 0.99 and ev.max_abs_error < 0.01


def test_golden_round_trip(cache_dir: Path, tmp_path: Path) -> None:
    """Golden inputs/outputs are stored in the model's dtypes and verify against the model."""
    x = load_digits_dataset().x_test
    int8 = digits_tflite(cache_dir, "int8")
    path = write_golden(int8, x, tmp_path / "g.npz")
    with np.load(path) as g:
        assert g["inputs"].dtype == np.int8 and g["outputs"].dtype == np.int8
        assert g["inputs"].shape == (GOLDEN_SAMPLES, 8, 8, 1)
        assert float(g["atol"]) == 1.0
    assert verify_golden(int8, path) <= 1.0
    fp32_golden = write_golden(digits_tflite(cache_dir, "fp32"), x, tmp_path / "f.npz")
    assert verify_golden(digits_tflite(cache_dir, "fp32"), fp32_golden) < 1e-6


def test_golden_catches_a_different_model(cache_dir: Path, tmp_path: Path) -> None:
    """A golden file made from one model fails against another (here: untrained outputs)."""
    x = load_digits_dataset().x_test
    path = write_golden(digits_tflite(cache_dir, "fp32"), x, tmp_path / "g.npz")
    with np.load(path) as g:
        tampered = {k: g[k] for k in g.files}
    tampered["outputs"] = tampered["outputs"][::-1].copy()  # outputs of other samples
    np.savez(tmp_path / "bad.npz", **tampered)
    with pytest.raises(GoldenMismatchError, match=r"bad\.npz"):
        verify_golden(digits_tflite(cache_dir, "fp32"), tmp_path / "bad.npz")

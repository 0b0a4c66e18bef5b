"""Per-output fidelity on synthetic arrays: SNR, cosine, class kind, flat references, budget."""

from __future__ import annotations

import numpy as np
import pytest

from converters.fidelity import (
    SNR_CAP_DB,
    Budget,
    compare_output,
    compare_outputs,
    is_class_vector,
    is_flat,
    judge,
    snr_db,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_snr_is_peak_over_mse_in_db() -> None:
    """Error of 1 % of the peak everywhere is 40 dB; identical outputs hit the cap."""
    ref = np.array([[1.0, -0.5, 0.25]])
    assert snr_db(ref + 0.01, ref) == pytest.approx(40.0)
    assert snr_db(ref, ref) == SNR_CAP_DB


def test_class_vectors_are_softmax_like_or_labelled() -> None:
    """(N, C) probabilities are class vectors; logits only with labels; boxes never."""
    rng = np.random.default_rng(0)
    probs = _softmax(rng.normal(size=(8, 10)))
    assert is_class_vector(probs)
    logits = rng.normal(size=(8, 10))
    assert not is_class_vector(logits) and is_class_vector(logits, labelled=True)
    boxes = rng.random((8, 64, 4))
    assert not is_class_vector(boxes) and not is_class_vector(boxes, labelled=True)
    landmarks = rng.random((8, 63)) * 10
    assert not is_class_vector(landmarks)


def test_flat_reference_is_detected() -> None:
    """A near-uniform 1000-way softmax is flat; a real one is not."""
    flat = np.full((4, 1000), 1e-3) + np.random.default_rng(0).normal(0, 1e-8, (4, 1000))
    assert is_flat(flat)[0]
    peaked = _softmax(np.random.default_rng(1).normal(0, 3, (4, 1000)))
    assert not is_flat(peaked)[0]


def test_top1_only_for_class_outputs() -> None:
    """A box output gets no top-1 agreement; a softmax output does."""
    rng = np.random.default_rng(2)
    boxes = rng.random((8, 64, 4))
    assert compare_output(0, "boxes", boxes, boxes).top1_agreement is None
    probs = _softmax(rng.normal(size=(8, 5)))
    swapped = probs[:, ::-1].copy()
    fid = compare_output(1, "probs", swapped, probs)
    assert fid.kind == "class" and fid.top1_agreement is not None and fid.top1_agreement < 1.0


def test_worst_output_decides_and_is_named() -> None:
    """Boxes fine, scores broken: refused, and the reason names the scores output."""
    rng = np.random.default_rng(3)
    boxes, scores = rng.random((16, 64, 4)), rng.random((16, 64, 1))
    noisy_scores = scores + rng.normal(0, 0.3, scores.shape)
    outs = compare_outputs([boxes + 1e-4, noisy_scores], [boxes, scores], ["boxes", "scores"])
    verdict = judge(outs, Budget(1.0, 20.0))
    assert not verdict.ok
    assert "output 1 'scores' SNR" in verdict.text and "below the budget of 20 dB" in verdict.text
    assert "boxes" not in verdict.text
    ok = judge(compare_outputs([boxes, scores], [boxes, scores], ["b", "s"]), Budget(1.0, 20.0))
    assert ok.ok and "worst SNR" in ok.text


def test_flat_reference_warns_instead_of_refusing() -> None:
    """The EfficientNetB0-with-random-weights case: argmax noise on a flat softmax is a warning."""
    ref = np.full((8, 1000), 1e-3) + np.random.default_rng(4).normal(0, 1e-9, (8, 1000))
    quantized = np.round(ref / 0.0039) * 0.0039  # int8 output scale: every value to 0
    verdict = judge(compare_outputs([quantized], [ref], ["probs"]), Budget(1.0, 20.0))
    assert verdict.ok
    assert any("flat" in w and "random or untrained weights" in w for w in verdict.warnings)


def test_accuracy_drop_with_labels_judges_the_labelled_output() -> None:
    """With labels, the class output is judged by accuracy drop; tensors still by SNR."""
    rng = np.random.default_rng(5)
    logits, aux = rng.normal(size=(10, 4)), rng.random((10, 3, 2))
    outs = compare_outputs([logits, aux], [logits, aux], ["logits", "aux"], labelled=True)
    assert outs[0].kind == "class" and outs[1].kind == "tensor"
    assert not judge(outs, Budget(1.0, 20.0), accuracy_drop=2.5).ok
    passed = judge(outs, Budget(1.0, 20.0), accuracy_drop=0.5)
    assert passed.ok and "accuracy drop 0.50 points" in passed.text


def test_output_count_mismatch_is_an_error() -> None:
    """A variant with fewer outputs than the reference cannot be compared."""
    a = np.zeros((2, 3))
    with pytest.raises(ValueError, match="variant has 1 outputs, the reference 2"):
        compare_outputs([a], [a, a], ["x", "y"])

"""Task-aware fidelity of a variant's outputs against the fp32 reference, one output at a time.

Every output gets SNR in dB (peak signal over mean squared error, the PSNR Qualcomm AI Hub
reports), cosine similarity and max abs error. Top-1 agreement is computed only for
classification-shaped outputs; accuracy only when labels are given. `judge` applies the budgets
(the worst output decides) and turns a flat fp32 reference (random or untrained weights) into a
warning instead of a refusal that the other numbers contradict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# A softmax row sums to 1; int8/fp16 rounding of up to ~1000 probabilities moves the sum by
# well under 2 %, and logits or box coordinates almost never sum to 1 this closely.
SOFTMAX_SUM_TOLERANCE = 0.02
# SNR of outputs equal to float64 precision would be +inf, which JSON cannot carry: report this.
SNR_CAP_DB = 200.0
# An output whose fp32 values span less than 0.1 % of their magnitude across all validation
# samples carries no signal (EfficientNetB0 with random weights: softmax ≈ 1/1000 everywhere,
# spread ~1e-6); top-1 and SNR on it measure noise, not the model.
FLAT_RELATIVE_RANGE = 1e-3
# Documented budget default: int8 variants of the digits CNN and of the two-head detector
# fixture measure 30-45 dB here; a saturated or broken quantization measures under 15 dB.
DEFAULT_MIN_SNR_DB = 20.0


@dataclass(frozen=True)
class OutputFidelity:
    """How one output of a variant compares with the same output of the fp32 reference."""

    index: int
    name: str
    shape: tuple[int, ...]  # per sample, without the batch dimension
    kind: str  # "class" (top-1 is meaningful) or "tensor" (boxes, landmarks, masks, logits...)
    snr_db: float
    cosine: float
    max_abs_error: float
    top1_agreement: float | None
    flat: bool
    reference_range: float

    @property
    def label(self) -> str:
        """`output 1 'scores'` for messages."""
        return f"output {self.index} '{self.name}'" if self.name else f"output {self.index}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


def _flatten(a: np.ndarray) -> np.ndarray:
    """(N, ...) → (N, features) as float64."""
    return a.reshape(a.shape[0], -1).astype(np.float64)


def snr_db(output: np.ndarray, reference: np.ndarray) -> float:
    """Peak SNR in dB: 10·log10(max|ref|² / MSE), capped at SNR_CAP_DB for identical outputs."""
    a, b = np.asarray(output, np.float64), np.asarray(reference, np.float64)
    mse = float(np.mean((a - b) ** 2)) if a.size else 0.0
    peak = float(np.max(np.abs(b))) if b.size else 0.0
    if mse == 0.0:
        return SNR_CAP_DB
    if peak == 0.0:
        return -SNR_CAP_DB
    return float(min(SNR_CAP_DB, 10.0 * math.log10(peak * peak / mse)))


def cosine(output: np.ndarray, reference: np.ndarray) -> float:
    """Mean per-sample cosine similarity (two all-zero rows count as identical)."""
    a, b = _flatten(output), _flatten(reference)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    cos = np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1.0), 0.0)
    return float(np.mean(np.where(both_zero, 1.0, cos)))


def is_class_vector(reference: np.ndarray, *, labelled: bool = False) -> bool:
    """Whether an output is classification-shaped: (N, C) with C ≥ 2, softmax-like or labelled.

    Softmax-like means values in [0, 1] whose rows sum to 1. A 1-D vector that is neither
    (landmark coordinates, an embedding, logits without labels) is judged as a tensor.
    """
    if reference.ndim != 2 or reference.shape[1] < 2:
        return False
    if labelled:
        return True
    ref = reference.astype(np.float64)
    in_range = bool(np.all(ref >= -1e-6) and np.all(ref <= 1.0 + 1e-6))
    sums_to_one = bool(np.all(np.abs(ref.sum(axis=1) - 1.0) <= SOFTMAX_SUM_TOLERANCE))
    return in_range and sums_to_one


def is_flat(reference: np.ndarray) -> tuple[bool, float]:
    """(flat, range): the fp32 output barely varies across all samples and elements."""
    if reference.size == 0:
        return True, 0.0
    ref = reference.astype(np.float64)
    spread = float(np.max(ref) - np.min(ref))
    magnitude = float(np.max(np.abs(ref)))
    return spread <= FLAT_RELATIVE_RANGE * magnitude or magnitude == 0.0, spread


def compare_output(
    index: int, name: str, output: np.ndarray, reference: np.ndarray, *, labelled: bool = False
) -> OutputFidelity:
    """All fidelity numbers for one output (arrays (N, ...) in float)."""
    if output.shape != reference.shape:
        raise ValueError(
            f"output {index} '{name}' has shape {output.shape}, the reference {reference.shape}"
        )
    kind = "class" if is_class_vector(reference, labelled=labelled) else "tensor"
    agreement = None
    if kind == "class":
        agreement = float(np.mean(output.argmax(axis=1) == reference.argmax(axis=1)))
    flat, spread = is_flat(reference)
    err = float(np.max(np.abs(output.astype(np.float64) - reference))) if output.size else 0.0
    return OutputFidelity(
        index=index,
        name=name,
        shape=tuple(int(d) for d in reference.shape[1:]),
        kind=kind,
        snr_db=snr_db(output, reference),
        cosine=cosine(output, reference),
        max_abs_error=err,
        top1_agreement=agreement,
        flat=flat,
        reference_range=spread,
    )


def labelled_output(references: list[np.ndarray]) -> int | None:
    """Which output labels refer to: the first (N, C) output with C ≥ 2, if any."""
    return next((i for i, r in enumerate(references) if is_class_vector(r, labelled=True)), None)


def compare_outputs(
    outputs: list[np.ndarray],
    references: list[np.ndarray],
    names: list[str],
    *,
    labelled: bool = False,
) -> list[OutputFidelity]:
    """Per-output fidelity; with labels, the labelled output is a class output by definition."""
    if len(outputs) != len(references):
        raise ValueError(f"variant has {len(outputs)} outputs, the reference {len(references)}")
    target = labelled_output(references) if labelled else None
    return [
        compare_output(i, names[i] if i < len(names) else "", o, r, labelled=i == target)
        for i, (o, r) in enumerate(zip(outputs, references, strict=True))
    ]


def top1_accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose arg-max output equals the label."""
    return float(np.mean(_flatten(outputs).argmax(axis=1) == labels))


@dataclass(frozen=True)
class Budget:
    """The fidelity budgets a variant must meet (documented defaults in docs/converters.md)."""

    max_drop_points: float = 1.0  # accuracy drop with labels, else top-1 disagreement, in points
    min_snr_db: float = DEFAULT_MIN_SNR_DB  # every tensor-shaped output


@dataclass(frozen=True)
class Verdict:
    """Whether a variant meets the budget, the one-line reason, and warnings to show anyway."""

    ok: bool
    text: str
    warnings: tuple[str, ...] = ()


def judge(
    outputs: list[OutputFidelity], budget: Budget, accuracy_drop: float | None = None
) -> Verdict:
    """Apply the budget to every output; the worst output decides and is named in the text.

    With labels the accuracy drop judges the labelled output; other class outputs are judged by
    top-1 disagreement, tensor outputs by SNR. An output whose fp32 reference is flat is not
    judged (its numbers measure noise) and yields a warning.
    """
    warnings: list[str] = []
    failures: list[str] = []
    passes: list[str] = []
    if accuracy_drop is not None:
        line = f"accuracy drop {accuracy_drop:.2f} points"
        if accuracy_drop > budget.max_drop_points:
            failures.append(f"{line} exceeds the budget of {budget.max_drop_points:g}")
        else:
            passes.append(line)
    for out in outputs:
        if out.flat:
            warnings.append(
                f"{out.label}: the fp32 reference is flat (range {out.reference_range:.3g} over "
                "all samples): random or untrained weights? its SNR/top-1 measure noise, so it "
                "is not judged"
            )
            continue
        if out.kind == "class" and out.top1_agreement is not None:
            if accuracy_drop is not None and out.index == _first_class(outputs):
                continue
            disagreement = (1.0 - out.top1_agreement) * 100.0
            line = f"{out.label} top-1 disagreement {disagreement:.2f} points"
            if disagreement > budget.max_drop_points:
                failures.append(f"{line} exceeds the budget of {budget.max_drop_points:g}")
            else:
                passes.append(line)
            continue
        line = f"{out.label} SNR {out.snr_db:.1f} dB"
        if out.snr_db < budget.min_snr_db:
            failures.append(f"{line} is below the budget of {budget.min_snr_db:g} dB")
        else:
            passes.append(line)
    if failures:
        return Verdict(False, "; ".join(failures), tuple(warnings))
    if not passes:
        return Verdict(True, "no output could be judged (all flat)", tuple(warnings))
    return Verdict(True, _summary(passes, outputs), tuple(warnings))


def _first_class(outputs: list[OutputFidelity]) -> int | None:
    """Index of the first class output (the one labels refer to)."""
    return next((o.index for o in outputs if o.kind == "class"), None)


def _summary(passes: list[str], outputs: list[OutputFidelity]) -> str:
    """Short pass text: the accuracy/top-1 line(s) and the worst tensor SNR."""
    judged = [o for o in outputs if not o.flat and o.kind == "tensor"]
    lines = [p for p in passes if "SNR" not in p]
    if judged:
        worst = min(judged, key=lambda o: o.snr_db)
        lines.append(f"worst SNR {worst.snr_db:.1f} dB ({worst.label})")
    return "; ".join(lines)

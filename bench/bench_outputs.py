"""Per-output fidelity, selection and golden size over multi-output and flat-output models.

    .venv/bin/python -m bench.bench_outputs [--profiles x86-64-gateway,rpi4,corstone-300-u55]

Runs the real `optimize` (TF converter, Vela) on: the digits CNN (one logits output), the
two-head detector shape (boxes + scores), the four-output landmark shape, and EfficientNetB0 with
random weights (`weights=None`, 96×96 input: a flat softmax). Prints one Markdown row per
(model, profile): selected recipe, size ratio to fp32, per-output SNR of the selection, golden
size and cap, notes about flat references, wall time. Numbers come from one run on this machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import firmware_profiles
from converters.digits import digits_keras, load_digits_dataset
from converters.golden import golden_cap
from converters.pipeline import optimize
from tests import model_fixtures

# EfficientNetB0 needs ≥ 32 px; 96 px keeps its int8 conversion under a minute on 2 cores.
EFFICIENTNET_SIDE = 96
# Calibration/validation images per model: enough for stable SNR figures, cheap to run.
SAMPLES = 32


def _efficientnet(cache: Path) -> Path:
    """EfficientNetB0 with random weights (no download) as .keras."""
    import keras

    path = cache / f"efficientnetb0_random_{EFFICIENTNET_SIDE}.keras"
    if not path.exists():
        keras.utils.set_random_seed(0)
        model = keras.applications.EfficientNetB0(
            weights=None, input_shape=(EFFICIENTNET_SIDE, EFFICIENTNET_SIDE, 3)
        )
        model.save(path)
    return path


def _models(cache: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """name → (model file, calibration/validation inputs)."""
    rng = np.random.default_rng(0)
    side = EFFICIENTNET_SIDE
    return {
        "digits CNN": (digits_keras(cache), load_digits_dataset().x_val[:SAMPLES]),
        "two-head detector": (
            model_fixtures.two_head_keras(cache),
            model_fixtures.calibration_images(SAMPLES),
        ),
        "4-output landmarks": (
            model_fixtures.landmarks_keras(cache),
            model_fixtures.calibration_images(SAMPLES),
        ),
        "EfficientNetB0 (random)": (
            _efficientnet(cache),
            rng.random((SAMPLES, side, side, 3), dtype=np.float32) * 255.0,
        ),
    }


def _row(name: str, prof: Any, fp32_size: int | None, seconds: float) -> str:
    """One Markdown row for a profile's outcome."""
    chosen = prof.selected
    if chosen is None or chosen.evaluation is None:
        why = f"{prof.status}: {(prof.error or '')[:80]}"
        return f"| {name} | {prof.profile} | - | - | {why} | - | {seconds:.0f} |"
    ev = chosen.evaluation
    snrs = ", ".join(f"{o.name} {'flat' if o.flat else f'{o.snr_db:.1f}'}" for o in ev.outputs)
    ratio = f"{ev.size_bytes / fp32_size:.2f}" if fp32_size else "-"
    golden = chosen.golden.stat().st_size if chosen.golden else 0
    cap = golden_cap(chosen.artifact.stat().st_size) if chosen.artifact else 0
    return (
        f"| {name} | {prof.profile} | {chosen.variant} | {ratio} | {snrs} | "
        f"{golden / 1024:.1f} / {cap / 1024:.0f} KiB | {seconds:.0f} |"
    )


def main() -> int:
    """Run every model through optimize and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--profiles", default="x86-64-gateway,rpi4,corstone-300-u55")
    args = parser.parse_args()
    profiles = [firmware_profiles.load(p) for p in args.profiles.split(",")]
    cache = Path(tempfile.gettempdir()) / "edgefleet-test-cache"
    cache.mkdir(parents=True, exist_ok=True)
    print("| model | profile | selected | size / fp32 | SNR dB per output | golden / cap | s |")
    print("|---|---|---|---:|---|---|---:|")
    notes: list[str] = []
    for name, (model, x) in _models(cache).items():
        with tempfile.TemporaryDirectory() as out:
            started = time.perf_counter()
            report = optimize(model, profiles, calib=x, val=x, out_dir=Path(out))
            seconds = time.perf_counter() - started
            fp32 = Path(out) / "variants"
            sizes = [p.stat().st_size for p in fp32.glob("*-fp32.tflite")]
            for prof in report.profiles:
                print(_row(name, prof, sizes[0] if sizes else None, seconds), flush=True)
            notes += [f"{name}: {n}" for n in report.notes if "flat" in n or "golden" in n]
    for note in notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

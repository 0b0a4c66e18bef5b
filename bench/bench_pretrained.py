"""Benchmark optimize() over architectures and profiles: recipe, size, per-output SNR, Vela.

Run: PYTHONPATH=. .venv/bin/python bench/bench_pretrained.py [--models digits,detector_fp16,...]
     [--profiles x86-64-gateway,rpi4,imx93,corstone-300-u55,coral-dev-board]
Prints one markdown table (one row per model × profile), measured in this run: the selected
recipe, its size against the reference (fp32 for Keras/ONNX sources, the file itself for a
.tflite), the SNR in dB of every output against the reference on the validation inputs, Vela's
NPU op share and estimate when the profile compiles for Ethos-U, and the wall time per profile
(the first profile of a model also pays for the conversions it shares with the others).
Keras applications use weights=None (no downloads) at 96×96 to keep the run bounded.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import firmware_profiles
from converters.datasets import Samples
from converters.interpreter import load_host_model
from converters.pipeline import optimize
from converters.report import ProgressEvent

DEFAULT_PROFILES = "x86-64-gateway,rpi4,imx93,corstone-300-u55,coral-dev-board"
DEFAULT_MODELS = "digits,mobilenet_v3_small,efficientnet_b0,detector_fp16,mobilenet_v3_fp16,onnx"
# 96×96 keeps MobileNetV3Small/EfficientNetB0 conversions + Vela within minutes on 2 cores.
IMAGE_SHAPE = (96, 96, 3)
# Calibration/validation samples for the image models: enough for stable int8 ranges on
# random-weight models, few enough that int16x8 (reference kernels) evaluates in minutes.
SAMPLES = 16
SEED = 18  # any fixed value: the same random inputs on every run


def all_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    """Every output of a .tflite for each sample, dequantized to float32."""
    return load_host_model(path).predict_all(x.astype(np.float32))


def snr_db(got: np.ndarray, want: np.ndarray) -> float:
    """SNR of `got` against `want` in dB (inf when equal)."""
    noise = float(np.mean((got.astype(np.float64) - want) ** 2))
    signal = float(np.mean(want.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def _images(n: int = SAMPLES) -> np.ndarray:
    """Seeded uniform 0..255 images (keras.applications models rescale inside)."""
    return 255 * np.random.default_rng(SEED).random((n, *IMAGE_SHAPE), dtype=np.float32)


def _keras_app(name: str, work: Path) -> tuple[Path, Samples, Samples]:
    """A keras.applications model with weights=None saved as .keras, with random images."""
    import keras

    ctor = {"mobilenet_v3_small": keras.applications.MobileNetV3Small,
            "efficientnet_b0": keras.applications.EfficientNetB0}[name]  # fmt: skip
    keras.utils.set_random_seed(SEED)
    model = ctor(input_shape=IMAGE_SHAPE, weights=None)
    path = work / f"{name}.keras"
    model.save(path)
    x = _images()
    return path, Samples(x), Samples(x)


def _digits(work: Path) -> tuple[Path, Samples, Samples]:
    """The trained digits CNN with its labelled validation split."""
    from converters.digits import digits_keras, load_digits_dataset

    ds = load_digits_dataset()
    return digits_keras(work / "cache"), Samples(ds.x_train[:200]), Samples(ds.x_val, ds.y_val)


def _detector_fp16(work: Path) -> tuple[Path, Samples, Samples]:
    """The two-output detector as a pretrained-style fp16 .tflite without a signature."""
    from tests.pretrained_models import (
        detector_scenes,
        fp16_tflite,
        strip_signatures,
        trained_detector,
    )

    path = work / "detector_fp16.tflite"
    path.write_bytes(strip_signatures(fp16_tflite(trained_detector())))
    x = detector_scenes(SAMPLES, seed=SEED + 1)[0]
    return path, Samples(x), Samples(x)


def _mobilenet_v3_fp16(work: Path) -> tuple[Path, Samples, Samples]:
    """MobileNetV3Small (weights=None) as an fp16 .tflite without a signature, batch fixed to 1
    as published files have it (a dynamic batch adds SHAPE/STRIDED_SLICE/PACK that stay on CPU)."""
    import keras

    from converters.recipes import with_fixed_batch
    from tests.pretrained_models import fp16_tflite, strip_signatures

    keras.utils.set_random_seed(SEED)
    model = keras.applications.MobileNetV3Small(input_shape=IMAGE_SHAPE, weights=None)
    model = with_fixed_batch(model, 1)
    path = work / "mobilenet_v3_fp16.tflite"
    path.write_bytes(strip_signatures(fp16_tflite(model)))
    x = _images()
    return path, Samples(x), Samples(x)


def _onnx(work: Path) -> tuple[Path, Samples, Samples]:
    """The digits CNN rebuilt as an NCHW ONNX graph (needs the onnx extra)."""
    from converters.digits import load_digits_dataset
    from tests.unit.test_converters_onnx import digits_onnx

    ds = load_digits_dataset()
    return digits_onnx(work / "cache"), Samples(ds.x_train[:200]), Samples(ds.x_val, ds.y_val)


BUILDERS: dict[str, Callable[[Path], tuple[Path, Samples, Samples]]] = {
    "digits": _digits,
    "mobilenet_v3_small": lambda w: _keras_app("mobilenet_v3_small", w),
    "efficientnet_b0": lambda w: _keras_app("efficientnet_b0", w),
    "detector_fp16": _detector_fp16,
    "mobilenet_v3_fp16": _mobilenet_v3_fp16,
    "onnx": _onnx,
}


def bench_model(name: str, work: Path, profile_ids: list[str]) -> list[dict[str, Any]]:
    """optimize() one model for the profiles; one result row per profile."""
    model, calib, val = BUILDERS[name](work)
    out = work / f"out-{name}"
    stamps: dict[str, list[float]] = {}

    def progress(event: ProgressEvent) -> None:
        """Remember when each profile started and finished."""
        if event.stage in ("start", "done"):
            stamps.setdefault(event.profile, []).append(time.perf_counter())

    profiles = [firmware_profiles.load(p) for p in profile_ids]
    report = optimize(model, profiles, calib=calib, val=val, out_dir=out, progress=progress)
    is_tflite = model.suffix == ".tflite"
    stem = model.stem
    reference = model if is_tflite else out / "variants" / f"{stem}-fp32.tflite"
    ref_outputs = all_outputs(reference, val.x)
    rows = []
    for prof in report.profiles:
        row: dict[str, Any] = {"model": name, "profile": prof.profile, "status": prof.status}
        start, *rest = stamps.get(prof.profile, [0.0, 0.0])
        row["seconds"] = round((rest[-1] if rest else start) - start, 1)
        row["warnings"] = prof.warnings
        chosen = prof.selected
        if chosen is None:
            row["why"] = (prof.error or "")[:200]
            rows.append(row)
            continue
        variant = out / "variants" / f"{stem}-{chosen.variant}.tflite"
        row["recipe"] = chosen.variant
        row["size_ratio"] = round(variant.stat().st_size / reference.stat().st_size, 3)
        got = all_outputs(variant, val.x)
        row["snr_db"] = [round(snr_db(g, w), 1) for g, w in zip(got, ref_outputs, strict=True)]
        compiled = chosen.compiled
        if compiled is not None and compiled.compiler == "vela":
            row["npu_share"] = compiled.npu_op_share
            row["vela_ms"] = compiled.estimated_latency_ms
        row["latency"] = f"{chosen.latency_ms:.3f} ({chosen.latency_source})"
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """One markdown table over every model × profile row."""
    lines = ["| model | profile | selected | size × ref | SNR dB per output | NPU op share | "
             "Vela est. ms | latency ms (source) | wall s |",
             "|---|---|---|---:|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "recipe" not in r:
            lines.append(f"| {r['model']} | {r['profile']} | none: {r.get('why', '')} | | | | | | "
                         f"{r['seconds']} |")  # fmt: skip
            continue
        share = f"{100 * r['npu_share']:.0f} %" if r.get("npu_share") is not None else "—"
        vela = f"{r['vela_ms']:.3f}" if r.get("vela_ms") is not None else "—"
        snr = ", ".join("∞" if s == float("inf") else f"{s:.1f}" for s in r["snr_db"])
        cpu = " (CPU: compiler absent)" if r["warnings"] else ""
        lines.append(
            f"| {r['model']} | {r['profile']} | {r['recipe']}{cpu} | {r['size_ratio']:.3f} | "
            f"{snr} | {share} | {vela} | {r['latency']} | {r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every model, print the markdown table (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--profiles", default=DEFAULT_PROFILES)
    parser.add_argument("--json", type=Path, help="also write the raw rows to this file")
    args = parser.parse_args(argv)
    profile_ids = [p.strip() for p in args.profiles.split(",") if p.strip()]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-pretrained-") as tmp:
        for name in (m.strip() for m in args.models.split(",") if m.strip()):
            t0 = time.perf_counter()
            model_rows = bench_model(name, Path(tmp), profile_ids)
            rows += model_rows
            # Each model's rows as soon as they exist: a long run stopped later keeps them.
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            print(markdown(model_rows), file=sys.stderr, flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2, default=str))
    print(markdown(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

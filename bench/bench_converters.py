"""Benchmark the converters: size, accuracy/fidelity and host latency per recipe; Vela estimates.

Run: PYTHONPATH=. .venv/bin/python bench/bench_converters.py [--models digits,mobilenet_v2,...]
     [--prune 0.5,0.75]
Prints one markdown table per model, measured in this run (ratios against fp32 of the same run).
With the prune extra installed, the digits CNN is also magnitude-pruned (TF-MOT, fine-tuned on
its training split) to each --prune sparsity and every recipe is run on it: "int8+pruned50".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from converters.compilers import get_compiler
from converters.datasets import Samples
from converters.digits import digits_keras, load_digits_dataset
from converters.errors import ConverterError
from converters.evaluate import evaluate_variant, interleaved_latency
from converters.interpreter import load_host_model
from converters.prune import prune_keras_model, pruned_suffix, pruning_available
from converters.recipes import RECIPES, convert_keras

VELA_PROFILES = ("corstone-300-u55", "imx93", "corstone-320-u85")
# Random (untrained) Keras applications are evaluated on random inputs: fidelity only.
MOBILENET_SAMPLES = 32
MOBILENET_CALIB = 32


def build_model(name: str, work: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray | None]:
    """(.keras path, calibration inputs, validation inputs, labels or None) for a model name."""
    if name == "digits":
        data = load_digits_dataset()
        return digits_keras(work / "cache"), data.x_train, data.x_test, data.y_test
    import keras

    builders = {
        "mobilenet_v2": keras.applications.MobileNetV2,
        "mobilenet_v3_small": keras.applications.MobileNetV3Small,
    }
    if name not in builders:
        raise SystemExit(f"unknown model {name!r}: expected digits, {', '.join(builders)}")
    keras.utils.set_random_seed(0)
    model = builders[name](weights=None, input_shape=(224, 224, 3))
    path = work / f"{name}.keras"
    model.save(path)
    rng = np.random.default_rng(0)
    # MobileNetV2 expects [-1, 1]; V3Small rescales [0, 255] itself.
    scale = (2.0, -1.0) if name == "mobilenet_v2" else (255.0, 0.0)
    calib = rng.random((MOBILENET_CALIB, 224, 224, 3), dtype=np.float32) * scale[0] + scale[1]
    val = rng.random((MOBILENET_SAMPLES, 224, 224, 3), dtype=np.float32) * scale[0] + scale[1]
    return path, calib, val, None


def convert_all(
    keras_path: Path, calib: np.ndarray, work: Path, tag: str = ""
) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """Convert one Keras model with every recipe: files and rows keyed '<recipe><tag>'."""
    files: dict[str, Path] = {}
    rows: dict[str, dict[str, Any]] = {}
    for recipe in RECIPES:
        key = recipe + tag
        t0 = time.perf_counter()
        try:
            data = convert_keras(keras_path, recipe, calib=calib)
        except ConverterError as exc:
            rows[key] = {"error": str(exc)[:200]}
            continue
        files[key] = work / f"{keras_path.stem}-{key}.tflite"
        files[key].write_bytes(data)
        rows[key] = {"convert_s": round(time.perf_counter() - t0, 2), "size_bytes": len(data)}
    return files, rows


def prune_digits(
    keras_path: Path, work: Path, sparsities: list[float]
) -> tuple[dict[str, Path], dict[str, dict[str, Any]], dict[str, Any]]:
    """Prune the digits CNN to each sparsity (TF-MOT child process) and convert every recipe."""
    data = load_digits_dataset()
    files: dict[str, Path] = {}
    rows: dict[str, dict[str, Any]] = {}
    runs: dict[str, Any] = {}
    for sparsity in sparsities:
        tag = pruned_suffix(sparsity)
        result = prune_keras_model(
            keras_path,
            Samples(data.x_train, data.y_train),
            work / f"digits{tag}.keras",
            sparsity=sparsity,
        )
        info = result.to_dict()
        runs[tag] = {k: info[k] for k in ("kernel_sparsity", "epochs", "train_accuracy")}
        runs[tag]["seconds"] = round(result.seconds, 1)
        more_files, more_rows = convert_all(result.model_path, data.x_train, work, tag)
        files |= more_files
        rows |= more_rows
    return files, rows, runs


def bench_model(name: str, work: Path, sparsities: list[float]) -> dict[str, Any]:
    """Convert with every recipe, evaluate against fp32, time all interleaved, compile with Vela."""
    keras_path, calib, val, labels = build_model(name, work)
    files, rows = convert_all(keras_path, calib, work)
    pruning: dict[str, Any] = {}
    if name == "digits" and sparsities:
        if not pruning_available():
            raise SystemExit("--prune needs the prune extra (make env); pass --prune '' to skip")
        more_files, more_rows, pruning = prune_digits(keras_path, work, sparsities)
        files |= more_files
        rows |= more_rows
    reference = load_host_model(files["fp32"]).predict(val)
    for recipe, path in list(files.items()):
        try:
            ev = evaluate_variant(path, val, reference, y_val=labels)
        except ConverterError as exc:  # e.g. a variant the interpreter refuses to load
            rows[recipe]["error"] = str(exc)[:200]
            del files[recipe]
            continue
        rows[recipe].update(
            size_ratio=round(ev.size_bytes / rows["fp32"]["size_bytes"], 3),
            accuracy=ev.accuracy,
            accuracy_drop_points=ev.accuracy_drop_points,
            top1_agreement=round(ev.top1_agreement, 4),
            cosine=round(ev.cosine_similarity, 5),
            max_abs_error=round(ev.max_abs_error, 5),
            compressed_bytes=ev.compressed_bytes,
            weight_sparsity=ev.weight_sparsity,
        )
    for recipe, ms in interleaved_latency(files, val).items():
        rows[recipe]["host_latency_ms"] = round(ms, 4)
    vela: dict[str, dict[str, Any]] = {}
    import firmware_profiles

    for pid in VELA_PROFILES:
        opts = dict(firmware_profiles.load(pid).compiler.options)
        for recipe in [k for k in files if k.partition("+")[0] in ("int8", "int16x8")]:
            try:
                res = get_compiler("vela").compile(
                    files[recipe], work / "vela" / pid / recipe, opts
                )
            except ConverterError as exc:
                vela[f"{pid}/{recipe}"] = {"error": str(exc)[:200]}
                continue
            est = res.estimates
            vela[f"{pid}/{recipe}"] = {
                "accelerator": est["accelerator_config"],
                "inference_ms": round(est["inference_time_ms"], 4),
                "npu_op_share": res.npu_op_share,
                "cpu_ops": res.cpu_ops,
                "sram_kib": round(est["sram_used_kib"], 1),
                "flash_or_dram_kib": round(
                    est["off_chip_flash_used_kib"] + est["dram_used_kib"], 1
                ),
            }
    return {"model": name, "recipes": rows, "vela": vela, "pruning": pruning}


def markdown(result: dict[str, Any]) -> str:
    """Two markdown tables: recipes, then Vela estimates."""
    lines = [f"### {result['model']}", ""]
    lines.append("| recipe | size (B) | × fp32 | gzip -9 (B) | zero weights | accuracy | "
                 "drop (pts) | top-1 agree | cosine | host ms |")  # fmt: skip
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for recipe, r in result["recipes"].items():
        if "error" in r:
            lines.append(f"| {recipe} | error: {r['error']} | | | | | | | | |")
            continue
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "—"
        drop = f"{r['accuracy_drop_points']:.2f}" if r["accuracy_drop_points"] is not None else "—"
        lines.append(
            f"| {recipe} | {r['size_bytes']} | {r['size_ratio']:.3f} | {r['compressed_bytes']} | "
            f"{100 * r['weight_sparsity']:.1f} % | {acc} | {drop} | {r['top1_agreement']:.4f} | "
            f"{r['cosine']:.5f} | {r['host_latency_ms']:.4f} |"
        )
    for tag, run in result.get("pruning", {}).items():
        lines.append(
            f"\n{tag}: TF-MOT kernel sparsity {run['kernel_sparsity']:.4f} after {run['epochs']} "
            f"epochs (train accuracy {run['train_accuracy']:.4f}), {run['seconds']} s"
        )
    lines += ["", "| Vela target / recipe | accelerator | est. ms | NPU op share | CPU ops | "
              "SRAM KiB | flash+DRAM KiB |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for key, v in result["vela"].items():
        if "error" in v:
            lines.append(f"| {key} | error: {v['error']} | | | | | |")
            continue
        lines.append(
            f"| {key} | {v['accelerator']} | {v['inference_ms']} | {v['npu_op_share']} | "
            f"{v['cpu_ops']} | {v['sram_kib']} | {v['flash_or_dram_kib']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmarks, print markdown (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="digits,mobilenet_v2,mobilenet_v3_small")
    parser.add_argument("--json", type=Path, help="also write the raw results to this file")
    parser.add_argument(
        "--prune", default="0.5,0.75", help="digits pruning sparsities ('' to skip pruning)"
    )
    args = parser.parse_args(argv)
    sparsities = [float(s) for s in args.prune.split(",") if s.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-converters-") as tmp:
        for name in args.models.split(","):
            t0 = time.perf_counter()
            result = bench_model(name.strip(), Path(tmp), sparsities)
            result["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(result)
            print(markdown(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

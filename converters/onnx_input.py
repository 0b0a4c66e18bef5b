"""ONNX inputs: convert an .onnx file to a TF SavedModel with onnx2tf, in a child process."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from converters.errors import ConversionError, ModelInputError

# What `python -m onnx2tf` imports that the base install does not have. tf_keras is not in the
# onnx extra: it depends on `tensorflow` (not tensorflow-cpu), so `make env` installs it with
# --no-deps for the prune extra (docs/converters.md); onnx2tf imports it at start-up.
ONNX_MODULES = ("onnx2tf", "onnx", "onnx_graphsurgeon", "sng4onnx", "tf_keras")
ONNX_HINT = (
    "pip install 'edgefleet[onnx]' (onnx2tf 1.28.8, onnx, onnx-graphsurgeon, sng4onnx, "
    "onnxruntime), and tf_keras: pip install --no-deps 'tf-keras==<TF major.minor>.*' (make env)"
)
# onnx2tf can take minutes on big graphs; a bound keeps a stuck conversion from hanging a run.
ONNX_TIMEOUT_S = 1800
# onnx2tf validates models whose inputs are all 4-D with 3 channels on sample images that it
# downloads unless this file is in its working directory (onnx2tf/utils/common_functions.py,
# download_test_image_data): we write seeded random images there, so it never goes online.
SAMPLE_IMAGES_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
# onnx2tf resizes the sample images to the model's input size, so small ones do (20 of 32×32×3).
SAMPLE_IMAGES_SHAPE = (20, 32, 32, 3)
# Lines of onnx2tf's output quoted in a ConversionError.
ERROR_TAIL_LINES = 5


def missing_onnx_modules() -> tuple[str, ...]:
    """The modules the ONNX path needs that are not installed (empty when it can run)."""
    return tuple(m for m in ONNX_MODULES if importlib.util.find_spec(m) is None)


def onnx_available() -> bool:
    """Whether the optional onnx2tf converter and what it imports are installed."""
    return not missing_onnx_modules()


def require_onnx(onnx_path: Path) -> None:
    """Raise ModelInputError naming what to install when the ONNX path cannot run."""
    missing = missing_onnx_modules()
    if missing:
        raise ModelInputError(
            f"ONNX input {onnx_path} needs the onnx extra (missing: {', '.join(missing)}): "
            f"{ONNX_HINT}"
        )


def write_sample_images(work_dir: Path) -> Path:
    """Write the sample-image file onnx2tf would otherwise download into `work_dir`."""
    images = np.random.default_rng(0).random(SAMPLE_IMAGES_SHAPE, dtype=np.float32)
    path = Path(work_dir) / SAMPLE_IMAGES_FILE
    np.save(path, images)
    return path


def onnx_to_saved_model(onnx_path: Path, out_dir: Path) -> Path:
    """Convert an ONNX file to a SavedModel in `out_dir` with onnx2tf (child process, offline).

    onnx2tf sets TF_USE_LEGACY_KERAS=1 and seeds and configures TensorFlow globally, hence the
    child. It may rewrite its input file (onnxsim, cleared output shapes), so it gets a copy.
    A 4-D input in NCHW becomes NHWC: calibration and validation data follow the TF layout.
    """
    src = Path(onnx_path)
    require_onnx(src)
    if not src.is_file():
        raise ModelInputError(f"Model not found: {src}")
    # onnx2tf runs in `work` as its working directory: every path it gets must be absolute, or
    # a relative --out (the README's `--out out/`) points into the wrong directory.
    src, out = src.resolve(), Path(out_dir).resolve()
    work = out.with_name(out.name + "_onnx2tf")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model_copy = Path(shutil.copy2(src, work / src.name))
    write_sample_images(work)
    cmd = [
        sys.executable,
        "-m",
        "onnx2tf",
        "-i",
        str(model_copy),
        "-o",
        str(out),
        "-osd",  # also write signature defs, which TFLiteConverter.from_saved_model reads
        "-n",  # non-verbose
    ]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=ONNX_TIMEOUT_S, cwd=work, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ConversionError(f"onnx2tf took over {ONNX_TIMEOUT_S} s on {src}") from exc
    if proc.returncode != 0 or not (out / "saved_model.pb").is_file():
        lines = [ln for ln in f"{proc.stdout}\n{proc.stderr}".splitlines() if ln.strip()]
        tail = " | ".join(lines[-ERROR_TAIL_LINES:])
        raise ConversionError(f"onnx2tf failed on {src} (exit {proc.returncode}): {tail}")
    shutil.rmtree(work, ignore_errors=True)
    return out

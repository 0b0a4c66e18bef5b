"""`edgefleet optimize` output: progress with N/M and elapsed time, no TensorFlow noise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from controller.cli.quiet import NOISE
from tests import model_fixtures

EXE = Path(sys.executable).parent / "edgefleet"
# What TensorFlow prints on its own: absl's pre-init warning, oneDNN, MLIR's quantizer, XNNPACK,
# Python warnings from inside TF.
TF_NOISE = re.compile(
    r"absl::InitializeLog|oneDNN|fully_quantize|XNNPACK|^[IW]\d{4} |Warning: |warnings\.warn"
)


def _optimize(model: Path, calib: Path, out: Path, *global_opts: str) -> str:
    """stderr of a real `edgefleet optimize` process for two profiles (int8 with calibration)."""
    unset = ("TF_CPP_MIN_LOG_LEVEL", "EDGEFLEET_DEBUG")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    done = subprocess.run(
        [str(EXE), *global_opts, "optimize", str(model), "-p", "x86-64-gateway,rpi4",
         "--calib", str(calib), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return done.stderr


@pytest.mark.slow
def test_optimize_shows_progress_and_no_tensorflow_noise(cache_dir: Path, tmp_path: Path) -> None:
    model = model_fixtures.flat_softmax_keras(cache_dir)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=model_fixtures.calibration_images())
    quiet = _optimize(model, calib, tmp_path / "out")
    noisy = [line for line in quiet.splitlines() if TF_NOISE.search(line)]
    assert noisy == [], "\n".join(noisy)
    assert re.search(r"\[1/2 x86-64-gateway +\d+\.\ds\] convert +int8", quiet), quiet
    assert re.search(r"\[2/2 rpi4 +\d+\.\ds\] done", quiet), quiet
    loud = _optimize(model, calib, tmp_path / "out-debug", "--debug")
    assert any(TF_NOISE.search(line) for line in loud.splitlines()), "--debug keeps TF's logging"


def test_noise_pattern_keeps_real_errors() -> None:
    assert NOISE.search("I0000 00:00:1796596719.189291   31865 port.cc:153] oneDNN custom ops")
    assert NOISE.search("WARNING: All log messages before absl::InitializeLog() is called")
    assert not NOISE.search("error: calibration data has shape (3, 4), expected (N, 8, 8, 1)")

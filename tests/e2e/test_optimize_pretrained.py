"""The issue's "done when": a two-output fp16 .tflite without a signature goes through
`edgefleet optimize model.tflite --profile all --calib calib.npz --out out/` with exit 0 on a
machine without edgetpu_compiler, and an Ethos-U profile gets a full-int8 artifact with NPU ops.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from converters.tflite_inspect import inspect_tflite
from tests.pretrained_models import write_pretrained_fixtures

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
# Building the fixture (~20 s) and 12 profiles with Vela (~15 s) on 2 cores, with headroom.
RUN_TIMEOUT_S = 600
ETHOS_U_PROFILES = ("corstone-300-u55", "corstone-320-u85", "imx93")


@pytest.mark.slow
def test_pretrained_fp16_detector_through_every_profile(tmp_path: Path) -> None:
    """Fresh TF-built fixture, relative paths, the exact CLI call; PATH without edgetpu_compiler."""
    fixtures = write_pretrained_fixtures(tmp_path / "built")
    shutil.copyfile(fixtures["detector_fp16"], tmp_path / "model.tflite")
    shutil.copyfile(fixtures["calib"], tmp_path / "calib.npz")
    model = inspect_tflite(tmp_path / "model.tflite")
    assert len(model.outputs) == 2 and "float16" in model.tensor_dtypes
    env = dict(os.environ)
    bin_dirs = [d for d in env.get("PATH", "").split(os.pathsep) if d]
    env["PATH"] = os.pathsep.join(
        d for d in bin_dirs if not (Path(d) / "edgetpu_compiler").exists()
    )
    cmd = [EDGEFLEET, "optimize", "model.tflite", "--profile", "all"]
    cmd += ["--calib", "calib.npz", "--out", "out/"]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("all 12 profile(s) have an artifact")
    assert "warning: coral-dev-board: edgetpu_compiler is not installed" in proc.stderr
    assert "edgetpu-compiler" in proc.stderr  # how to get it
    coral = json.loads(
        next((tmp_path / "out" / "coral-dev-board").glob("*.manifest.json")).read_text()
    )
    assert coral["compiler"]["kind"] == "none" and coral["recipe"] == "int8"
    for profile in ETHOS_U_PROFILES:
        manifests = list((tmp_path / "out" / profile).glob("model-*.manifest.json"))
        assert len(manifests) == 1, (profile, manifests)
        manifest = json.loads(manifests[0].read_text())
        assert manifest["recipe"] == "int8", (profile, manifest["recipe"])
        assert manifest["compiler"]["kind"] == "vela"
        assert manifest["compiler"]["npu_ops"] > 0, manifest["compiler"]
        assert manifest["compiler"]["runs_on_cpu"] is False
        dtypes = [t["dtype"] for t in (*manifest["io"]["inputs"], *manifest["io"]["outputs"])]
        assert dtypes == ["int8", "int8", "int8"], dtypes  # full int8, both outputs
        artifact = tmp_path / "out" / profile / manifest["file"]
        assert "CUSTOM:ethos-u" in inspect_tflite(artifact).op_versions

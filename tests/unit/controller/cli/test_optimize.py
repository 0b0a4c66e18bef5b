"""`edgefleet optimize` through CliRunner: checks of real files, a real run, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from controller.cli.main import app
from tests.paths import TEST_DATA

DATA = TEST_DATA
runner = CliRunner()


def test_check_refuses_newer_op_versions_on_an_old_runtime() -> None:
    result = runner.invoke(
        app,
        [
            "optimize",
            str(DATA / "tiny_dynamic_tf221.tflite"),
            "--profile",
            "rpi4,rpi5",
            "--check",
            "--json",
        ],
    )
    assert result.exit_code == 1, result.output
    checks = json.loads(result.output)
    by_name = {p: {c["name"]: c for c in rs} for p, rs in checks.items()}
    assert by_name["rpi4"]["op_versions_supported"]["ok"] is False
    assert "FULLY_CONNECTED v12" in by_name["rpi4"]["op_versions_supported"]["detail"]
    assert by_name["rpi5"]["op_versions_supported"]["ok"] is True


def test_check_passes_a_compatible_model() -> None:
    result = runner.invoke(
        app, ["optimize", str(DATA / "tiny_int8.tflite"), "--profile", "rpi4", "--check"]
    )
    assert result.exit_code == 0, result.output
    assert "op_versions_supported" in result.output and "FAIL" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["optimize", str(DATA / "tiny_int8.tflite"), "--profile", "no-such"], "no-such"),
        (["optimize", str(DATA / "missing.keras"), "--profile", "rpi4"], "no such file"),
        (["optimize", str(DATA / "README.md"), "--profile", "rpi4", "--check"], "needs a .tflite"),
        (
            ["optimize", str(DATA / "tiny_int8.tflite"), "--profile", "rpi4", "--candidates", "0"],
            "--candidates) must be ≥ 1, got 0",
        ),
    ],
)
def test_bad_input_exits_2(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output


def test_candidates_per_profile_in_json_and_table(tmp_path: Path) -> None:
    """--candidates 3: the 4-core rpi4 gets its one variant with 1 and 4 threads, the U55 null."""
    args = ["optimize", str(DATA / "tiny_int8.tflite"), "--profile", "rpi4,corstone-300-u55"]
    args += ["--candidates", "3", "--out", str(tmp_path)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    threads = {p["profile"]: [c["threads"] for c in p["candidates"]] for p in report["profiles"]}
    assert threads == {"rpi4": [1, 4], "corstone-300-u55": [None]}
    for prof in report["profiles"]:
        on_disk = json.loads((tmp_path / prof["profile"] / "candidates.json").read_text())
        assert on_disk["candidates"] == prof["candidates"]
    table_run = runner.invoke(app, args)
    assert table_run.exit_code == 0, table_run.output
    assert "candidate rpi4 #2: original threads=4" in table_run.stdout
    assert "candidate corstone-300-u55 #1: original threads=- (compiled)" in table_run.stdout


@pytest.mark.slow
def test_optimize_digits_for_a_cpu_and_an_npu_profile(tmp_path: Path) -> None:
    from converters.digits import digits_keras, load_digits_dataset

    data = load_digits_dataset()
    np.savez(tmp_path / "calib.npz", x=data.x_train[:200])
    np.savez(tmp_path / "val.npz", x=data.x_val, y=data.y_val)
    model = digits_keras(tmp_path / "cache")
    result = runner.invoke(
        app,
        [
            "optimize",
            str(model),
            "--profile",
            "rpi4,imx93",
            "--calib",
            str(tmp_path / "calib.npz"),
            "--val",
            str(tmp_path / "val.npz"),
            "--out",
            str(tmp_path / "out"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    selected = {p["profile"]: p["selected"] for p in report["profiles"]}
    assert selected["imx93"] == "int8", "an Ethos-U profile must get the full-int8 variant"
    assert selected["rpi4"] is not None
    for prof in report["profiles"]:
        chosen = next(v for v in prof["variants"] if v["status"] == "selected")
        assert Path(chosen["artifact"]).is_file() and Path(chosen["manifest"]).is_file()
        assert chosen["evaluation"]["accuracy"] >= 0.95
        assert all(c["ok"] or not c["blocking"] for c in chosen["checks"])

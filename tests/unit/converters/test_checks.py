"""Tests for converters.checks on real converted files and real device profiles."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import firmware_profiles
from converters.checks import (
    CHECKS,
    blocking_failures,
    check_tflite,
    describe_checks,
    run_checks,
)
from converters.compilers import get_compiler
from converters.digits import digits_tflite, load_digits_dataset
from converters.errors import ModelInputError
from converters.requantize import requantize_tflite
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT


@pytest.fixture(scope="module")
def models(cache_dir: Path) -> dict[str, Path]:
    """fp32, int8, int16x8 and TF's dynamic (FC v12) digits files."""
    return {r: digits_tflite(cache_dir, r) for r in ("fp32", "int8", "dynamic", "int16x8")}


@pytest.fixture(scope="module")
def lq_dynamic(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """litert-quantizer's dynamic recipe applied to the fp32 file (hybrid ops left at v1)."""
    pytest.importorskip("litert_quantizer")
    path = tmp_path_factory.mktemp("lq") / "digits_lq_dynamic.tflite"
    path.write_bytes(requantize_tflite(models["fp32"], "dynamic"))
    return path


def by_name(results: list) -> dict:
    """Check results keyed by check name."""
    return {r.name: r for r in results}


def test_every_check_has_a_reason() -> None:
    """Each check's docstring is a non-trivial sentence, listed in run order."""
    described = describe_checks()
    assert list(described) == [c.__name__ for c in CHECKS]
    for reason in described.values():
        assert len(reason) > 40 and "\n" not in reason


def test_newer_op_version_than_the_runtime_is_refused(models: dict[str, Path]) -> None:
    """TF 2.21's dynamic model (FC v12) fails on tflite-runtime 2.14 and passes on LiteRT 2.3."""
    rpi4 = by_name(run_checks(models["dynamic"], firmware_profiles.load("rpi4")))
    check = rpi4["op_versions_supported"]
    assert not check.ok and check.blocking
    assert "FULLY_CONNECTED v12 needs 2.17.0" in check.detail and "2.14.0" in check.detail
    assert "2.17" in check.reason
    rpi5 = by_name(run_checks(models["dynamic"], firmware_profiles.load("rpi5")))
    assert rpi5["op_versions_supported"].ok
    for recipe in ("fp32", "int8", "int16x8"):
        assert by_name(run_checks(models[recipe], firmware_profiles.load("rpi4")))[
            "op_versions_supported"
        ].ok, recipe


def test_understated_versions_are_refused_on_old_runtimes(lq_dynamic: Path) -> None:
    """litert-quantizer's dynamic output (hybrid ops at v1) fails on 2.14, passes on LiteRT 2.3."""
    old = by_name(run_checks(lq_dynamic, firmware_profiles.load("rpi4")))
    assert old["op_versions_supported"].ok  # it *looks* compatible: versions are all 1 …
    assert not old["op_versions_consistent"].ok  # … but they lie about the kernels
    assert "FULLY_CONNECTED v1 is float-only" in old["op_versions_consistent"].detail
    new = by_name(run_checks(lq_dynamic, firmware_profiles.load("rpi5")))
    assert new["op_versions_consistent"].ok


SLIM_PYTHON = Path(os.environ.get("EDGEFLEET_SLIM_PYTHON", ROOT / ".venv-slim" / "bin" / "python"))


@pytest.mark.skipif(not SLIM_PYTHON.exists(), reason="no tflite-runtime 2.14 venv (.venv-slim)")
def test_check_verdicts_match_real_tflite_runtime_2_14(
    models: dict[str, Path], lq_dynamic: Path, tmp_path: Path
) -> None:
    """On real tflite-runtime 2.14: the models the checks pass load and score; refused ones fail.

    The fp32 and int8 files must load and reach ≥ 0.9 accuracy; TF's dynamic file must fail to
    load; litert-quantizer's dynamic file loads but scores far lower — which is why it is refused.
    """
    data = load_digits_dataset()
    np.savez(tmp_path / "val.npz", x=data.x_val, y=data.y_val)
    script = """
import json, sys, numpy as np
from tflite_runtime.interpreter import Interpreter
val = np.load(sys.argv[1]); x, y = val["x"], val["y"]
out = {}
for name, path in json.loads(sys.argv[2]).items():
    try:
        it = Interpreter(model_path=path); it.allocate_tensors()
    except Exception as exc:
        out[name] = None; continue
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    hits = 0
    for k in range(len(x)):
        xi = x[k:k + 1]
        if i["dtype"] != np.float32:
            s, z = i["quantization"]; info = np.iinfo(i["dtype"])
            xi = np.clip(np.round(xi / s + z), info.min, info.max).astype(i["dtype"])
        it.set_tensor(i["index"], xi); it.invoke()
        hits += int(it.get_tensor(o["index"]).argmax() == y[k])
    out[name] = hits / len(x)
print(json.dumps(out))
"""
    models = {**models, "lq_dynamic": lq_dynamic}
    paths = {k: str(v) for k, v in models.items()}
    proc = subprocess.run(
        [str(SLIM_PYTHON), "-c", script, str(tmp_path / "val.npz"), json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    accuracy = json.loads(proc.stdout.strip().splitlines()[-1])
    rpi4 = firmware_profiles.load("rpi4")  # tflite-runtime 2.14.0
    for name, path in models.items():
        passed = not blocking_failures(run_checks(path, rpi4))
        works = accuracy[name] is not None and accuracy[name] >= 0.9
        assert passed == works, (name, accuracy[name], passed)
    assert accuracy["dynamic"] is None  # refused to load
    assert accuracy["lq_dynamic"] is not None and accuracy["lq_dynamic"] < 0.5  # silent garbage


def test_vela_profiles_pass_with_the_int8_model(models: dict[str, Path], tmp_path: Path) -> None:
    """The int8 digits CNN compiles for U55/U65/U85 with every op on the NPU and fits budgets."""
    for pid in ("corstone-300-u55", "imx93", "corstone-320-u85"):
        profile = firmware_profiles.load(pid)
        compiled = get_compiler("vela").compile(
            models["int8"], tmp_path / pid, profile.compiler.options
        )
        results = run_checks(models["int8"], profile, compiled=compiled)
        assert not [r for r in results if not r.ok], (pid, [r.to_dict() for r in results])
        assert "Vela SRAM+DRAM" in by_name(results)["fits_ram_budget"].detail


def test_cpu_fallbacks_block_on_mcu_only(models: dict[str, Path], tmp_path: Path) -> None:
    """A float model on Ethos-U falls back to the CPU: blocking on Corstone, advisory on i.MX 93."""
    for pid, blocking in (("corstone-300-u55", True), ("imx93", False)):
        profile = firmware_profiles.load(pid)
        compiled = get_compiler("vela").compile(
            models["fp32"], tmp_path / pid, profile.compiler.options
        )
        check = by_name(run_checks(models["fp32"], profile, compiled=compiled))[
            "accelerator_runs_all_ops"
        ]
        assert not check.ok and check.blocking == blocking
        assert "FULLY_CONNECTED" in check.detail and "Float32" in check.detail


def test_float_io_on_integer_only_accelerator(models: dict[str, Path]) -> None:
    """fp32 I/O fails the dtype check on the Coral (blocking) and on the i.MX 8M Plus (advisory)."""
    coral = by_name(run_checks(models["fp32"], firmware_profiles.load("coral-dev-board")))
    assert not coral["io_dtypes_match_accelerator"].ok
    assert coral["io_dtypes_match_accelerator"].blocking
    assert "float32" in coral["io_dtypes_match_accelerator"].detail
    imx8 = by_name(run_checks(models["fp32"], firmware_profiles.load("imx8mp")))
    assert not imx8["io_dtypes_match_accelerator"].ok
    assert not imx8["io_dtypes_match_accelerator"].blocking
    assert by_name(run_checks(models["int8"], firmware_profiles.load("coral-dev-board")))[
        "io_dtypes_match_accelerator"
    ].ok
    assert not by_name(run_checks(models["int16x8"], firmware_profiles.load("coral-dev-board")))[
        "io_dtypes_match_accelerator"
    ].ok


def test_storage_and_ram_budgets(models: dict[str, Path]) -> None:
    """A budget smaller than the file or its memory estimate fails, naming both sizes."""
    rpi4 = firmware_profiles.load("rpi4")
    assert by_name(run_checks(models["fp32"], rpi4))["fits_storage_budget"].ok
    size_mib = models["fp32"].stat().st_size / (1024 * 1024)
    tight = dataclasses.replace(
        rpi4,
        memory=dataclasses.replace(
            rpi4.memory, storage_budget_mb=size_mib / 2, model_ram_budget_mb=0.05
        ),
    )
    results = by_name(run_checks(models["fp32"], tight))
    assert not results["fits_storage_budget"].ok
    assert f"{size_mib:.3f} MiB" in results["fits_storage_budget"].detail
    assert not results["fits_ram_budget"].ok
    assert "weights + peak activations" in results["fits_ram_budget"].detail
    assert by_name(run_checks(models["int8"], tight))["fits_storage_budget"].ok


def test_results_serialize(models: dict[str, Path]) -> None:
    """CheckResult.to_dict is JSON-ready and carries the reason."""
    rows = [r.to_dict() for r in run_checks(models["int8"], firmware_profiles.load("rpi4"))]
    assert json.loads(json.dumps(rows))[0]["name"] == "op_versions_supported"
    assert all(r["reason"] for r in rows)


def test_check_tflite_compiles_then_checks(models: dict[str, Path], tmp_path: Path) -> None:
    """`--check` compiles with Vela for Ethos-U; a missing compiler is itself a failed check."""
    imx93 = check_tflite(models["int8"], firmware_profiles.load("imx93"), work_dir=tmp_path / "a")
    assert [r.name for r in imx93] == [c.__name__ for c in CHECKS]
    assert all(r.ok for r in imx93)
    assert "34 ops on the accelerator" in by_name(imx93)["accelerator_runs_all_ops"].detail
    if shutil.which("edgetpu_compiler") is None:
        coral = check_tflite(
            models["int8"], firmware_profiles.load("coral-dev-board"), work_dir=tmp_path / "b"
        )
        assert coral[0].name == "compiles_for_profile" and not coral[0].ok
        assert "edgetpu_compiler is not on PATH" in coral[0].detail
        assert len(coral) == len(CHECKS) + 1
    keras_file = tmp_path / "m.keras"
    keras_file.write_bytes(b"")
    with pytest.raises(ModelInputError, match=r"takes a \.tflite"):
        check_tflite(keras_file, firmware_profiles.load("rpi4"), work_dir=tmp_path)

"""Tests for converters.compilers: real Vela compiles, the pass-through and Edge TPU plugins."""

from __future__ import annotations

from pathlib import Path

import pytest

import firmware_profiles
from converters.compilers import COMPILERS, get_compiler
from converters.compilers.edgetpu import EdgeTpuCompiler, parse_edgetpu_log
from converters.compilers.vela import VelaCompiler, parse_summary_csv, parse_vela_log
from converters.digits import digits_tflite
from converters.errors import CompilerError
from converters.tflite_inspect import inspect_tflite


def test_registry() -> None:
    """The three compiler kinds of the profile schema are registered; others are refused."""
    assert set(COMPILERS) == {"none", "vela", "edgetpu"}
    with pytest.raises(CompilerError, match="Unknown compiler 'tvm'"):
        get_compiler("tvm")


def test_none_passes_through(cache_dir: Path, tmp_path: Path) -> None:
    """'none' returns the .tflite unchanged, with no estimate, and refuses options."""
    model = digits_tflite(cache_dir, "int8")
    result = get_compiler("none").compile(model, tmp_path, {})
    assert result.artifact == model and result.estimates == {} and result.npu_op_share is None
    with pytest.raises(CompilerError, match="takes no options"):
        get_compiler("none").compile(model, tmp_path, {"x": 1})


@pytest.mark.parametrize(
    ("profile_id", "accel"),
    [
        ("corstone-300-u55", "Ethos_U55_128"),
        ("imx93", "Ethos_U65_256"),
        ("corstone-320-u85", "Ethos_U85_256"),
    ],
)
def test_vela_compiles_int8_digits(
    profile_id: str, accel: str, cache_dir: Path, tmp_path: Path
) -> None:
    """Vela turns the int8 CNN into one ethos-u custom op and reports its estimate."""
    profile = firmware_profiles.load(profile_id)
    result = get_compiler("vela").compile(
        digits_tflite(cache_dir, "int8"), tmp_path, profile.compiler.options
    )
    assert result.artifact.name.endswith("_vela.tflite") and result.artifact.is_file()
    ops = inspect_tflite(result.artifact).op_versions
    assert any(op.startswith("CUSTOM:ethos-u") for op in ops)
    est = result.estimates
    assert est["accelerator_config"] == accel
    assert est["system_config"] == profile.compiler.options["system_config"]
    assert est["memory_mode"] == profile.compiler.options["memory_mode"]
    assert 0 < est["inference_time_ms"] < 10
    assert est["cycles_total"] >= est["cycles_npu"] > 0
    assert est["macs"] > 50_000
    assert est["sram_used_kib"] > 0
    assert result.cpu_ops == 0 and result.npu_ops and result.npu_op_share == 1.0
    # inference time = total cycles / clock
    assert est["inference_time_ms"] == pytest.approx(
        est["cycles_total"] / est["core_clock_hz"] * 1000, rel=0.01
    )


def test_faster_npu_gets_a_faster_estimate(cache_dir: Path, tmp_path: Path) -> None:
    """The 1 GHz U65-256 (i.MX 93) is estimated faster than the 500 MHz U55-128 (Corstone-300)."""
    model = digits_tflite(cache_dir, "int8")
    times = {}
    for pid in ("corstone-300-u55", "imx93"):
        opts = firmware_profiles.load(pid).compiler.options
        times[pid] = get_compiler("vela").compile(model, tmp_path / pid, opts).estimated_latency_ms
    assert times["imx93"] < times["corstone-300-u55"]


def test_vela_reports_cpu_fallbacks_for_float_models(cache_dir: Path, tmp_path: Path) -> None:
    """A float model keeps its ops on the CPU; each fallback carries Vela's reason."""
    result = VelaCompiler().compile(
        digits_tflite(cache_dir, "fp32"), tmp_path, {"accelerator_config": "ethos-u55-128"}
    )
    assert result.npu_ops == 0 and result.cpu_ops and result.cpu_ops > 0
    assert result.npu_op_share == 0.0
    # No op on the NPU: "runs on CPU", never Vela's 0-cycle estimate as a latency.
    assert result.runs_on_cpu and result.estimated_latency_ms is None
    ops = {f.op for f in result.cpu_fallbacks}
    assert {"FULLY_CONNECTED", "SOFTMAX"} <= ops
    assert all("Float32" in f.reason for f in result.cpu_fallbacks)


def test_vela_option_errors(cache_dir: Path, tmp_path: Path) -> None:
    """Unknown options, a missing accelerator and a bad config name are clear CompilerErrors."""
    model = digits_tflite(cache_dir, "int8")
    vela = VelaCompiler()
    with pytest.raises(CompilerError, match=r"Unknown Vela option.*turbo"):
        vela.compile(model, tmp_path, {"accelerator_config": "ethos-u55-128", "turbo": 1})
    with pytest.raises(CompilerError, match="accelerator_config"):
        vela.compile(model, tmp_path, {})
    with pytest.raises(CompilerError, match="Vela failed"):
        vela.compile(model, tmp_path, {"accelerator_config": "ethos-u99-1"})
    cmd = vela.command(model, tmp_path, {"accelerator_config": "ethos-u65-256", "optimise": "Size"})
    assert cmd[cmd.index("--accelerator-config") + 1] == "ethos-u65-256"
    assert cmd[cmd.index("--optimise") + 1] == "Size"


def test_vela_parsers_on_empty_input(tmp_path: Path) -> None:
    """An empty summary CSV is an error; a log without counts yields None counts."""
    (tmp_path / "s.csv").write_text("inference_time\n")
    with pytest.raises(CompilerError, match="no rows"):
        parse_summary_csv(tmp_path / "s.csv")
    assert parse_vela_log("nothing here") == (None, None, [])


def test_edgetpu_missing_names_what_to_install(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without edgetpu_compiler on PATH the plugin says what is missing and how to get it."""
    monkeypatch.setenv("PATH", str(tmp_path))
    compiler = EdgeTpuCompiler()
    assert not compiler.available()
    with pytest.raises(CompilerError, match=r"edgetpu_compiler is not on PATH.*edgetpu-compiler"):
        compiler.compile(digits_tflite(cache_dir, "int8"), tmp_path, {})


def test_edgetpu_log_parser() -> None:
    """The op counts and the per-op table of edgetpu_compiler's report are read."""
    log = """Edge TPU Compiler version 16.0.384591198
Model compiled successfully in 52 ms.

Number of operations that will run on Edge TPU: 7
Number of operations that will run on CPU: 2

Operator                       Count      Status

SOFTMAX                        1          Mapped to Edge TPU
CONV_2D                        2          Mapped to Edge TPU
SIN                            1          Operation not supported
FULLY_CONNECTED                1          More than one subgraph is not supported
"""
    tpu, cpu, rows = parse_edgetpu_log(log)
    assert (tpu, cpu) == (7, 2)
    assert ("SIN", 1, "Operation not supported") in rows
    assert len(rows) == 4

"""The Vela plugin: compile for Arm Ethos-U55/U65/U85 and keep Vela's performance estimate."""

from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from converters.compilers.base import CompileResult, CpuFallback
from converters.errors import CompilerError

# Profile option → Vela command-line flag. Anything else is refused so a typo cannot be ignored.
VELA_OPTIONS = {
    "accelerator_config": "--accelerator-config",
    "config": "--config",
    "system_config": "--system-config",
    "memory_mode": "--memory-mode",
    "optimise": "--optimise",
    "arena_cache_size": "--arena-cache-size",
    "max_block_dependency": "--max-block-dependency",
    "cpu_tensor_alignment": "--cpu-tensor-alignment",
}
VELA_HINT = "pip install ethos-u-vela (the version your device's Ethos-U driver stack accepts)"
# Vela compiles digits in under a second and MobileNetV2 in about a minute on 2 cores.
VELA_TIMEOUT_S = 900
# Summary CSV columns kept with the artifact (name in the CSV → name in our estimates).
CSV_FIELDS = {
    "accelerator_configuration": "accelerator_config",
    "system_config": "system_config",
    "memory_mode": "memory_mode",
    "core_clock": "core_clock_hz",
    "inferences_per_second": "inferences_per_second",
    "cycles_total": "cycles_total",
    "cycles_npu": "cycles_npu",
    "sram_memory_used": "sram_used_kib",
    "dram_memory_used": "dram_used_kib",
    "on_chip_flash_memory_used": "on_chip_flash_used_kib",
    "off_chip_flash_memory_used": "off_chip_flash_used_kib",
    "total_original_weights": "original_weights_bytes",
    "total_npu_encoded_weights": "npu_encoded_weights_bytes",
    "nn_macs": "macs",
}
_OP_COUNT = re.compile(r"^(CPU|NPU) operators = (\d+)")
_FALLBACK = re.compile(r"^Warning \(supported operators\) operator: (\w+), ofm: '(.*)'$")


def _number(text: str) -> int | float | str:
    """Parse a CSV cell as int, else float, else keep the text."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_summary_csv(path: Path) -> dict[str, Any]:
    """Read Vela's `<model>_summary_<system>.csv` into our estimate names (times in ms)."""
    with Path(path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise CompilerError(f"Vela summary CSV has no rows: {path}")
    row = rows[0]
    out: dict[str, Any] = {ours: _number(row[theirs]) for theirs, ours in CSV_FIELDS.items()}
    out["inference_time_ms"] = float(row["inference_time"]) * 1000.0
    return out


def parse_vela_log(log: str) -> tuple[int | None, int | None, list[CpuFallback]]:
    """Read the NPU/CPU operator counts and each CPU fallback (op, tensor, reason) from stdout."""
    counts: dict[str, int] = {}
    fallbacks: list[CpuFallback] = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        count = _OP_COUNT.match(line.strip())
        if count:
            counts[count.group(1)] = int(count.group(2))
        fb = _FALLBACK.match(line.strip())
        if fb:
            reason = lines[i + 1].strip() if i + 1 < len(lines) else ""
            fallbacks.append(CpuFallback(fb.group(1), fb.group(2), reason.removeprefix("Reason: ")))
    return counts.get("NPU"), counts.get("CPU"), fallbacks


class VelaCompiler:
    """Run `python -m ethosu.vela` in a subprocess (Vela keeps global state between calls)."""

    kind = "vela"
    tool = "ethos-u-vela"
    install_hint = VELA_HINT

    def available(self) -> bool:
        """Whether ethos-u-vela is installed in this interpreter."""
        return importlib.util.find_spec("ethosu.vela") is not None

    def command(self, tflite: Path, out_dir: Path, options: Mapping[str, Any]) -> list[str]:
        """The Vela command line for these profile options (unknown options are an error)."""
        unknown = sorted(set(options) - set(VELA_OPTIONS))
        if unknown:
            raise CompilerError(
                f"Unknown Vela option(s) {', '.join(unknown)}: expected {', '.join(VELA_OPTIONS)}"
            )
        if "accelerator_config" not in options:
            hint = "e.g. ethos-u55-128"
            raise CompilerError(f"Vela needs compiler.options.accelerator_config ({hint})")
        cmd = [sys.executable, "-m", "ethosu.vela", str(tflite), "--output-dir", str(out_dir)]
        for key, flag in VELA_OPTIONS.items():
            if key in options:
                cmd += [flag, str(options[key])]
        return cmd

    def compile(self, tflite: Path, out_dir: Path, options: Mapping[str, Any]) -> CompileResult:
        """Compile, then collect `<stem>_vela.tflite`, the summary CSV and the CPU fallbacks."""
        if not self.available():
            raise CompilerError(f"Vela is not installed: {VELA_HINT}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cmd = self.command(Path(tflite), out, options)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=VELA_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise CompilerError(f"Vela timed out after {VELA_TIMEOUT_S} s on {tflite}") from exc
        log = proc.stdout + proc.stderr
        stem = Path(tflite).stem
        artifact = out / f"{stem}_vela.tflite"
        if proc.returncode != 0 or not artifact.is_file():
            tail = " | ".join(log.strip().splitlines()[-4:])
            raise CompilerError(f"Vela failed on {tflite} (exit {proc.returncode}): {tail}")
        summaries = sorted(out.glob(f"{stem}_summary_*.csv"))
        if not summaries:
            raise CompilerError(f"Vela wrote no summary CSV for {tflite} in {out}")
        estimates = parse_summary_csv(summaries[0])
        npu, cpu, fallbacks = parse_vela_log(log)
        return CompileResult(self.kind, artifact, estimates, tuple(fallbacks), npu, cpu, log)

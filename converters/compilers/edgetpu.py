"""The Edge TPU compiler plugin: runs `edgetpu_compiler` when it is on PATH."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from converters.compilers.base import CompileResult, CpuFallback
from converters.errors import CompilerError

EDGETPU_BINARY = "edgetpu_compiler"
MISSING_HINT = (
    "edgetpu_compiler is not on PATH: install the 'edgetpu-compiler' Debian package from "
    "Coral's apt repository (x86-64 Linux only), or compile on a machine that has it"
)
# The compiler finishes digits-sized models in seconds; large graphs in a few minutes.
EDGETPU_TIMEOUT_S = 600
_ON_TPU = re.compile(r"Number of operations that will run on Edge TPU:\s*(\d+)")
_ON_CPU = re.compile(r"Number of operations that will run on CPU:\s*(\d+)")
_OP_ROW = re.compile(r"^(\w+)\s+(\d+)\s+(.+?)\s*$")


def parse_edgetpu_log(log: str) -> tuple[int | None, int | None, list[tuple[str, int, str]]]:
    """Read TPU/CPU op counts and the per-op table (op, count, status) from the compiler's log."""
    tpu = _ON_TPU.search(log)
    cpu = _ON_CPU.search(log)
    rows = []
    in_table = False
    for line in log.splitlines():
        if line.startswith("Operator") and "Status" in line:
            in_table = True
            continue
        if in_table:
            match = _OP_ROW.match(line.strip())
            if match:
                rows.append((match.group(1), int(match.group(2)), match.group(3)))
    return (int(tpu.group(1)) if tpu else None, int(cpu.group(1)) if cpu else None, rows)


class EdgeTpuCompiler:
    """Compile a full-int8 .tflite for the Coral Edge TPU."""

    kind = "edgetpu"
    tool = EDGETPU_BINARY
    install_hint = MISSING_HINT

    def available(self) -> bool:
        """Whether edgetpu_compiler is on PATH."""
        return shutil.which(EDGETPU_BINARY) is not None

    def compile(self, tflite: Path, out_dir: Path, options: Mapping[str, Any]) -> CompileResult:
        """Run `edgetpu_compiler -s -o out_dir model`; ops it cannot map stay on the CPU."""
        binary = shutil.which(EDGETPU_BINARY)
        if binary is None:
            raise CompilerError(MISSING_HINT)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "-s", "-o", str(out)]
        for key, value in sorted(options.items()):
            cmd += [f"--{key}", str(value)]
        proc = subprocess.run(
            [*cmd, str(tflite)], capture_output=True, text=True, timeout=EDGETPU_TIMEOUT_S
        )
        log = proc.stdout + proc.stderr
        artifact = out / f"{Path(tflite).stem}_edgetpu.tflite"
        if proc.returncode != 0 or not artifact.is_file():
            raise CompilerError(f"edgetpu_compiler failed on {tflite}: {log.strip()[-500:]}")
        tpu, cpu, rows = parse_edgetpu_log(log)
        mapped = "Mapped to Edge TPU"
        fallbacks = tuple(CpuFallback(op, "", st) for op, _, st in rows if mapped not in st)
        return CompileResult(self.kind, artifact, {}, fallbacks, tpu, cpu, log)

"""The compiler plugin interface and the result every compiler returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class CpuFallback:
    """An op the accelerator compiler left on the CPU, with the compiler's reason."""

    op: str
    tensor: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """JSON-friendly form."""
        return {"op": self.op, "tensor": self.tensor, "reason": self.reason}


@dataclass(frozen=True)
class CompileResult:
    """A compiled (or passed-through) artifact plus what the compiler estimated about it."""

    compiler: str
    artifact: Path
    estimates: dict[str, Any] = field(default_factory=dict)
    cpu_fallbacks: tuple[CpuFallback, ...] = ()
    npu_ops: int | None = None
    cpu_ops: int | None = None
    log: str = ""
    # Set when the profile's compiler was not installed and the .tflite ships uncompiled.
    missing_tool: str | None = None

    @property
    def runs_on_cpu(self) -> bool:
        """True when the accelerator runs nothing: no op mapped, or the compiler was absent."""
        return self.missing_tool is not None or self.npu_ops == 0

    @property
    def npu_op_share(self) -> float | None:
        """Share of operators the accelerator runs (0..1), None when the compiler says nothing."""
        if self.npu_ops is None or self.cpu_ops is None or self.npu_ops + self.cpu_ops == 0:
            return None
        return self.npu_ops / (self.npu_ops + self.cpu_ops)

    @property
    def estimated_latency_ms(self) -> float | None:
        """The compiler's inference-time estimate in milliseconds, if it made one.

        None when no op runs on the accelerator: Vela then reports 0 NPU cycles (0.0 ms),
        which says nothing about the CPU that does all the work.
        """
        if self.runs_on_cpu:
            return None
        value = self.estimates.get("inference_time_ms")
        return float(value) if value is not None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (artifact path as a string, log left out)."""
        return {
            "compiler": self.compiler,
            "artifact": str(self.artifact),
            "estimates": dict(self.estimates),
            "cpu_fallbacks": [f.to_dict() for f in self.cpu_fallbacks],
            "npu_ops": self.npu_ops,
            "cpu_ops": self.cpu_ops,
            "npu_op_share": self.npu_op_share,
            "runs_on_cpu": self.runs_on_cpu,
            "missing_tool": self.missing_tool,
        }


class ModelCompiler(Protocol):
    """One ahead-of-time compiler: none, vela or edgetpu."""

    kind: str
    tool: str  # what a user installs: the binary or package name
    install_hint: str  # how to get it, quoted when it is missing

    def available(self) -> bool:
        """Whether the compiler can run on this machine."""
        ...

    def compile(self, tflite: Path, out_dir: Path, options: Mapping[str, Any]) -> CompileResult:
        """Compile `tflite` into `out_dir` with profile `options`."""
        ...

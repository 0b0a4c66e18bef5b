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

    @property
    def npu_op_share(self) -> float | None:
        """Share of operators the accelerator runs (0..1), None when the compiler says nothing."""
        if self.npu_ops is None or self.cpu_ops is None or self.npu_ops + self.cpu_ops == 0:
            return None
        return self.npu_ops / (self.npu_ops + self.cpu_ops)

    @property
    def estimated_latency_ms(self) -> float | None:
        """The compiler's inference-time estimate in milliseconds, if it made one."""
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
        }


class ModelCompiler(Protocol):
    """One ahead-of-time compiler: none, vela or edgetpu."""

    kind: str

    def available(self) -> bool:
        """Whether the compiler can run on this machine."""
        ...

    def compile(self, tflite: Path, out_dir: Path, options: Mapping[str, Any]) -> CompileResult:
        """Compile `tflite` into `out_dir` with profile `options`."""
        ...

"""The 'none' compiler: CPU/GPU/NNAPI profiles ship the .tflite as is (the agent picks)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from converters.compilers.base import CompileResult
from converters.errors import CompilerError


class NoCompiler:
    """Pass-through: the artifact is the converted .tflite itself."""

    kind = "none"
    tool = ""
    install_hint = ""

    def available(self) -> bool:
        """Always available."""
        return True

    def compile(self, tflite: Path, out_dir: Path, options: Mapping[str, Any]) -> CompileResult:
        """Return the input unchanged; options must be empty."""
        if options:
            raise CompilerError(f"Compiler 'none' takes no options, got {sorted(options)}")
        return CompileResult(compiler=self.kind, artifact=Path(tflite))

"""Ahead-of-time compiler plugins (none, vela, edgetpu) behind one interface."""

from __future__ import annotations

from converters.compilers.base import CompileResult, CpuFallback, ModelCompiler
from converters.compilers.edgetpu import EdgeTpuCompiler
from converters.compilers.none import NoCompiler
from converters.compilers.vela import VelaCompiler
from converters.errors import CompilerError

COMPILERS: dict[str, type[NoCompiler] | type[VelaCompiler] | type[EdgeTpuCompiler]] = {
    "none": NoCompiler,
    "vela": VelaCompiler,
    "edgetpu": EdgeTpuCompiler,
}

__all__ = [
    "COMPILERS",
    "CompileResult",
    "CpuFallback",
    "ModelCompiler",
    "get_compiler",
]


def get_compiler(kind: str) -> ModelCompiler:
    """The compiler plugin for a profile's compiler.kind, raising CompilerError if unknown."""
    try:
        return COMPILERS[kind]()
    except KeyError:
        raise CompilerError(
            f"Unknown compiler {kind!r}: expected one of {', '.join(COMPILERS)}"
        ) from None

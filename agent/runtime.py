"""TFLite runtime shim: picks ai-edge-litert or tflite-runtime, loads models, feeds and runs them.

The agent never imports TensorFlow. Either runtime exposes the same `Interpreter` class, so the
rest of the agent codes against the small `Interpreter` protocol below and never names a runtime.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

RUNTIME_ENV_VAR = "EDGEFLEET_TFLITE_RUNTIME"


@dataclass(frozen=True)
class _Candidate:
    """One runtime the shim can use: how users name it, its distribution and its module."""

    key: str
    dist: str
    module: str
    install_hint: str


# Order matters: ai-edge-litert is Google's maintained runtime; tflite-runtime stopped at 2.14 and
# is the fallback for devices that cannot install litert (32-bit ARM, old Pythons).
_CANDIDATES: tuple[_Candidate, ...] = (
    _Candidate(
        "litert", "ai-edge-litert", "ai_edge_litert.interpreter", "pip install ai-edge-litert"
    ),
    _Candidate(
        "tflite-runtime",
        "tflite-runtime",
        "tflite_runtime.interpreter",
        "pip install tflite-runtime",
    ),
)
_ALIASES = {"litert": "litert", "ai-edge-litert": "litert", "tflite-runtime": "tflite-runtime"}


class ModelLoadError(Exception):
    """A model file could not be loaded or allocated; the message carries the runtime's text."""


@dataclass(frozen=True)
class RuntimeInfo:
    """Which TFLite runtime this process uses (reported to the controller in `hello`)."""

    name: str
    version: str
    module: str


class Interpreter(Protocol):
    """The part of tf.lite.Interpreter the agent uses; both runtimes implement it."""

    def allocate_tensors(self) -> None:
        """Plan and allocate tensor memory."""

    def invoke(self) -> None:
        """Run the graph once."""

    def get_input_details(self) -> list[dict[str, Any]]:
        """Index, shape, dtype and quantization of every input."""

    def get_output_details(self) -> list[dict[str, Any]]:
        """Index, shape, dtype and quantization of every output."""

    def set_tensor(self, tensor_index: int, value: np.ndarray) -> None:
        """Copy `value` into a tensor."""

    def get_tensor(self, tensor_index: int) -> np.ndarray:
        """Return a copy of a tensor."""


def _candidates_in_order() -> tuple[_Candidate, ...]:
    """The candidates to try, narrowed to one when EDGEFLEET_TFLITE_RUNTIME forces it."""
    forced = os.environ.get(RUNTIME_ENV_VAR, "").strip().lower().replace("_", "-")
    if not forced:
        return _CANDIDATES
    key = _ALIASES.get(forced)
    if key is None:
        raise RuntimeError(
            f"{RUNTIME_ENV_VAR}={os.environ[RUNTIME_ENV_VAR]!r} is not a TFLite runtime; "
            "use 'litert' or 'tflite-runtime' (or unset it to pick automatically)"
        )
    return tuple(c for c in _CANDIDATES if c.key == key)


def _version_of(candidate: _Candidate, module: ModuleType) -> str:
    """Installed distribution version; the module's __version__ for unpackaged (vendored) copies."""
    try:
        return importlib.metadata.version(candidate.dist)
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(module, "__version__", "unknown"))


@functools.cache
def runtime_info() -> RuntimeInfo:
    """The TFLite runtime in use: litert, else tflite-runtime, unless the env var forces one."""
    candidates = _candidates_in_order()
    failures = []
    for candidate in candidates:
        try:
            module = importlib.import_module(candidate.module)
        except (ImportError, OSError) as exc:  # OSError: a wheel whose shared library won't load
            failures.append(f"{candidate.module}: {exc}")
            continue
        return RuntimeInfo(candidate.dist, _version_of(candidate, module), candidate.module)
    hints = " or ".join(f"`{c.install_hint}`" for c in candidates)
    forced = f" ({RUNTIME_ENV_VAR} forces it)" if len(candidates) == 1 else ""
    raise RuntimeError(
        f"No TFLite runtime importable{forced}: install {hints}. Tried: " + "; ".join(failures)
    )


def _error_text(exc: BaseException) -> str:
    """The runtime's message; tflite-runtime 2.14 wraps non-UTF-8 text in a decode error."""
    if isinstance(exc, UnicodeDecodeError) and isinstance(exc.object, bytes | bytearray):
        return exc.object.decode("utf-8", errors="backslashreplace").strip()
    return (str(exc) or type(exc).__name__).strip()


def load_interpreter(
    model_path: str | os.PathLike[str], num_threads: int | None = None
) -> Interpreter:
    """Load a .tflite file and allocate its tensors; any failure becomes ModelLoadError."""
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
    info = runtime_info()
    path = os.fspath(model_path)
    if info.name == "tflite-runtime":
        # tflite-runtime 2.14 builds the model without the flatbuffer verifier and segfaults on a
        # truncated file; litert verifies itself, so only this runtime needs the pre-check.
        try:
            problem = flatbuffer_bounds_problem(Path(path).read_bytes())
        except OSError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
        if problem is not None:
            raise ModelLoadError(
                f"{path}: malformed TFLite flatbuffer (truncated or corrupt file?): {problem}"
            )
    interpreter_class = importlib.import_module(info.module).Interpreter
    try:
        interpreter = interpreter_class(model_path=path, num_threads=num_threads)
        interpreter.allocate_tensors()
    except Exception as exc:  # the runtimes raise ValueError, RuntimeError or decode errors
        empty = " (the file is empty)" if _is_empty_file(path) else ""
        raise ModelLoadError(f"{path}: {_error_text(exc)}{empty}") from exc
    return interpreter


def _is_empty_file(path: str) -> bool:
    """True when path is an existing zero-byte file (runtimes report that cryptically)."""
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


# Integer inputs are usually indices or lengths; small non-negative values are valid for any
# vocabulary or sequence, where full-range random values would make gathers fail.
_INDEX_LIKE_HIGH = 10


def random_inputs(interpreter: Interpreter, seed: int = 0) -> list[np.ndarray]:
    """One seeded random array per input, with the input's exact shape and dtype."""
    rng = np.random.default_rng(seed)
    arrays = []
    for detail in interpreter.get_input_details():
        dtype = np.dtype(detail["dtype"])
        shape = tuple(int(d) for d in detail["shape"])
        if dtype.kind == "f":
            array = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
        elif dtype.kind == "b":
            array = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype in (np.int8, np.uint8, np.int16, np.uint16):
            # Quantized activations: the whole range is meaningful.
            info = np.iinfo(dtype)
            array = rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
        elif dtype.kind in "iu":
            array = rng.integers(0, _INDEX_LIKE_HIGH, size=shape, dtype=dtype)
        else:
            raise ValueError(f"cannot make random data for input {detail['name']!r} of {dtype}")
        arrays.append(array)
    return arrays


def run_once(interpreter: Interpreter, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Set every input, invoke once and return copies of the outputs."""
    details = interpreter.get_input_details()
    if len(inputs) != len(details):
        raise ValueError(f"model has {len(details)} inputs, got {len(inputs)} arrays")
    for detail, array in zip(details, inputs, strict=True):
        interpreter.set_tensor(detail["index"], array)
    interpreter.invoke()
    # get_tensor already returns a copy in both runtimes, so outputs survive the next invoke.
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


# --- flatbuffer bounds check (only for runtimes that skip flatbuffers' own verifier) ----------

# The TFLite tables the interpreter walks (tensorflow/lite/schema/schema.fbs): field index ->
# (name, kind, arg). kind "scalar"/"vector": arg = bytes per element; "table"/"tables"/"union":
# arg = the pointed-to schema (a union member's schema, or None when members differ); "string".
_Field = tuple[str, str, Any]
_Schema = dict[int, _Field]
# fmt: off
_TENSOR_MAP: _Schema = {0: ("name", "string", None), 1: ("tensor_index", "scalar", 4)}
_SIGNATURE_DEF: _Schema = {
    0: ("inputs", "tables", _TENSOR_MAP), 1: ("outputs", "tables", _TENSOR_MAP),
    2: ("signature_key", "string", None), 3: ("deprecated_tag", "string", None),
    4: ("subgraph_index", "scalar", 4),
}
_METADATA: _Schema = {0: ("name", "string", None), 1: ("buffer", "scalar", 4)}
_BUFFER: _Schema = {
    0: ("data", "vector", 1), 1: ("offset", "scalar", 8), 2: ("size", "scalar", 8),
}
# Int32Vector / Uint16Vector / Uint8Vector: checked at 1 byte per value so no valid file fails.
_INDEX_VECTOR: _Schema = {0: ("values", "vector", 1)}
_DIM_METADATA: _Schema = {
    0: ("format", "scalar", 1), 1: ("dense_size", "scalar", 4),
    2: ("array_segments_type", "scalar", 1), 3: ("array_segments", "union", _INDEX_VECTOR),
    4: ("array_indices_type", "scalar", 1), 5: ("array_indices", "union", _INDEX_VECTOR),
}
_SPARSITY: _Schema = {
    0: ("traversal_order", "vector", 4), 1: ("block_map", "vector", 4),
    2: ("dim_metadata", "tables", _DIM_METADATA),
}
_QUANTIZATION: _Schema = {
    0: ("min", "vector", 4), 1: ("max", "vector", 4), 2: ("scale", "vector", 4),
    3: ("zero_point", "vector", 8), 4: ("details_type", "scalar", 1),
    5: ("details", "union", None), 6: ("quantized_dimension", "scalar", 4),
}
_VARIANT: _Schema = {
    0: ("shape", "vector", 4), 1: ("type", "scalar", 1), 2: ("has_rank", "scalar", 1),
}
_TENSOR: _Schema = {
    0: ("shape", "vector", 4), 1: ("type", "scalar", 1), 2: ("buffer", "scalar", 4),
    3: ("name", "string", None), 4: ("quantization", "table", _QUANTIZATION),
    5: ("is_variable", "scalar", 1), 6: ("sparsity", "table", _SPARSITY),
    7: ("shape_signature", "vector", 4), 8: ("has_rank", "scalar", 1),
    9: ("variant_tensors", "tables", _VARIANT),
}
_OPERATOR: _Schema = {
    0: ("opcode_index", "scalar", 4), 1: ("inputs", "vector", 4), 2: ("outputs", "vector", 4),
    3: ("builtin_options_type", "scalar", 1), 4: ("builtin_options", "union", None),
    5: ("custom_options", "vector", 1), 6: ("custom_options_format", "scalar", 1),
    7: ("mutating_variable_inputs", "vector", 1), 8: ("intermediates", "vector", 4),
    9: ("large_custom_options_offset", "scalar", 8),
    10: ("large_custom_options_size", "scalar", 8),
    11: ("builtin_options_2_type", "scalar", 1), 12: ("builtin_options_2", "union", None),
}
_SUBGRAPH: _Schema = {
    0: ("tensors", "tables", _TENSOR), 1: ("inputs", "vector", 4),
    2: ("outputs", "vector", 4), 3: ("operators", "tables", _OPERATOR),
    4: ("name", "string", None), 5: ("debug_metadata_index", "scalar", 4),
}
_OPERATOR_CODE: _Schema = {
    0: ("deprecated_builtin_code", "scalar", 1), 1: ("custom_code", "string", None),
    2: ("version", "scalar", 4), 3: ("builtin_code", "scalar", 4),
}
_MODEL: _Schema = {
    0: ("version", "scalar", 4), 1: ("operator_codes", "tables", _OPERATOR_CODE),
    2: ("subgraphs", "tables", _SUBGRAPH), 3: ("description", "string", None),
    4: ("buffers", "tables", _BUFFER), 5: ("metadata_buffer", "vector", 4),
    6: ("metadata", "tables", _METADATA), 7: ("signature_defs", "tables", _SIGNATURE_DEF),
}
# fmt: on
_UNKNOWN_FIELD: _Field = ("?", "scalar", 1)  # newer schema fields: only their first byte is known
_MAX_TABLES = 1_000_000  # same cap as flatbuffers' C++ Verifier default (max_tables)
_MAX_DEPTH = 64  # same as the C++ Verifier's max_depth; TFLite nests at most 5 levels


class _Malformed(Exception):
    """Internal: the flatbuffer points outside the file."""


class _BoundsChecker:
    """Walks TFLite tables checking every offset, vtable, vector and string stays in the file."""

    def __init__(self, data: bytes) -> None:
        """Remember the file bytes and start the table budget."""
        self.data = data
        self.tables = 0

    def need(self, pos: int, size: int, what: str) -> None:
        """Fail unless data[pos:pos+size] lies inside the file."""
        if pos < 0 or pos + size > len(self.data):
            end = len(self.data)
            raise _Malformed(f"{what} at byte {pos} (+{size}) is outside the {end}-byte file")

    def uoffset(self, pos: int, what: str) -> int:
        """Follow a forward uint32 offset stored at pos."""
        self.need(pos, 4, what)
        return pos + int(struct.unpack_from("<I", self.data, pos)[0])

    def vector(self, pos: int, element: int, what: str) -> int:
        """Check a vector header and body at pos; return its length."""
        self.need(pos, 4, what)
        count = int(struct.unpack_from("<I", self.data, pos)[0])
        self.need(pos + 4, count * element, what)
        return count

    def table(self, pos: int, schema: _Schema | None, what: str, depth: int = 0) -> None:
        """Check a table's vtable and fields, recursing into the fields the schema knows."""
        self.tables += 1
        if self.tables > _MAX_TABLES or depth > _MAX_DEPTH:
            raise _Malformed("too many or too deeply nested tables")
        self.need(pos, 4, f"{what} table")
        vtable = pos - int(struct.unpack_from("<i", self.data, pos)[0])
        self.need(vtable, 4, f"{what} vtable")
        vt_size, table_size = struct.unpack_from("<HH", self.data, vtable)
        if vt_size < 4 or vt_size % 2 or table_size < 4:
            raise _Malformed(f"{what} vtable at byte {vtable} has impossible sizes")
        self.need(vtable, vt_size, f"{what} vtable")
        self.need(pos, table_size, f"{what} table")
        for index in range((vt_size - 4) // 2):
            offset = int(struct.unpack_from("<H", self.data, vtable + 4 + 2 * index)[0])
            if offset == 0:
                continue  # field absent
            name, kind, arg = (schema or {}).get(index, _UNKNOWN_FIELD)
            width = arg if kind == "scalar" else 4  # every non-scalar field is a uint32 offset
            if offset < 4 or offset + width > table_size:
                raise _Malformed(f"{what}.{name} lies outside its table")
            if kind != "scalar":
                self.field(pos + offset, kind, arg, f"{what}.{name}", depth)

    def field(self, pos: int, kind: str, arg: Any, what: str, depth: int) -> None:
        """Check what one offset field points to."""
        target = self.uoffset(pos, what)
        if kind in ("table", "union"):
            self.table(target, arg, what, depth + 1)
        elif kind == "vector":
            self.vector(target, arg, what)
        elif kind == "string":
            self.need(target, 4 + self.vector(target, 1, what) + 1, what)  # NUL-terminated
        elif kind == "tables":
            for i in range(self.vector(target, 4, what)):
                element = self.uoffset(target + 4 + 4 * i, what)
                self.table(element, arg, f"{what}[{i}]", depth + 1)


def flatbuffer_bounds_problem(data: bytes) -> str | None:
    """Why this TFLite flatbuffer would make a non-verifying runtime read outside it, or None.

    Empty files and files without the `TFL3` identifier are left to the runtime, which rejects
    them safely with its own message.
    """
    if not data or (len(data) >= 8 and data[4:8] != b"TFL3"):
        return None
    checker = _BoundsChecker(data)
    try:
        checker.need(0, 8, "flatbuffer header")
        root = checker.uoffset(0, "root offset")
        checker.table(root, _MODEL, "model")
        for i, (offset, size) in enumerate(_external_buffers(data, root)):
            # offset/size (models > 2 GB) place buffer data after the flatbuffer; 0/1 mean unset
            if offset > 1:
                checker.need(offset, size, f"model.buffers[{i}] external data")
    except _Malformed as exc:
        return str(exc)
    return None


def _external_buffers(data: bytes, model: int) -> list[tuple[int, int]]:
    """(offset, size) of every Buffer table that sets them; call after the bounds check."""

    def field_offset(table: int, index: int) -> int:
        vtable = table - struct.unpack_from("<i", data, table)[0]
        vt_size = struct.unpack_from("<H", data, vtable)[0]
        if 4 + 2 * index >= vt_size:
            return 0
        return int(struct.unpack_from("<H", data, vtable + 4 + 2 * index)[0])

    buffers = field_offset(model, 4)
    if not buffers:
        return []
    vector = model + buffers + struct.unpack_from("<I", data, model + buffers)[0]
    result = []
    for i in range(struct.unpack_from("<I", data, vector)[0]):
        element = vector + 4 + 4 * i
        buffer = element + struct.unpack_from("<I", data, element)[0]
        offset_at, size_at = field_offset(buffer, 1), field_offset(buffer, 2)
        if offset_at and size_at:
            offset = struct.unpack_from("<Q", data, buffer + offset_at)[0]
            size = struct.unpack_from("<Q", data, buffer + size_at)[0]
            result.append((int(offset), int(size)))
    return result

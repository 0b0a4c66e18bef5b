"""Read a .tflite flatbuffer without running it: ops and versions, I/O dtypes, metadata, memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from converters.errors import InspectError

TFLITE_FILE_IDENTIFIER = b"TFL3"
# Ops that only move data between float and integer domains: not "compute in float".
CONVERSION_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})
FLOAT_DTYPES = frozenset({"float32", "float16", "float64", "bfloat16"})
INTEGER_WEIGHT_DTYPES = frozenset({"int8", "int4", "uint8"})
# Ops whose version 1 is the float kernel and that TF versions up when weights are integer.
HYBRID_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL"})


@cache
def schema() -> ModuleType:
    """The flatc-generated TFLite schema module: LiteRT's, else TensorFlow's, else `tflite`'s."""
    for name in (
        "ai_edge_litert.schema_py_generated",
        "tensorflow.lite.python.schema_py_generated",
    ):
        try:
            return __import__(name, fromlist=["Model"])
        except ImportError:
            continue
    try:
        import tflite

        return tflite
    except ImportError as exc:
        raise InspectError(
            "No TFLite schema available: install ai-edge-litert (or tensorflow, or tflite)"
        ) from exc


@cache
def _enum_names(enum_name: str) -> dict[int, str]:
    """Reverse map of a schema enum class (value → NAME), e.g. BuiltinOperator, TensorType."""
    enum = getattr(schema(), enum_name)
    return {v: k for k, v in vars(enum).items() if not k.startswith("_") and isinstance(v, int)}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's name, static shape, dtype name and first (scale, zero_point)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    quantization: tuple[float, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "quantization": list(self.quantization) if self.quantization else None,
        }


@dataclass(frozen=True)
class OpUse:
    """One operator in the graph: builtin name, opcode version and the dtypes it computes in."""

    index: int
    name: str
    version: int
    input_dtypes: tuple[str, ...]
    output_dtypes: tuple[str, ...]
    weight_dtypes: tuple[str, ...] = ()

    @property
    def computes_in_float(self) -> bool:
        """True when a non-conversion op produces a float tensor (i.e. it runs a float kernel)."""
        float_out = any(d in FLOAT_DTYPES for d in self.output_dtypes)
        return float_out and self.name not in CONVERSION_OPS

    @property
    def understated_version(self) -> str | None:
        """Why this op's version is too low for its tensor types (None when it is consistent).

        The runtime registers kernels per (op, version): CONV_2D, DEPTHWISE_CONV_2D and
        FULLY_CONNECTED v1 predate integer weights. Tools that rewrite weights without bumping
        versions (litert-quantizer's dynamic recipes) make models that tflite-runtime 2.14
        loads and then runs to wrong results; its int4 DEQUANTIZE v1 fails to load there.
        (int8 DEQUANTIZE at v1 runs correctly on 2.14, so it is not flagged.)
        """
        integer_weights = [d for d in self.weight_dtypes if d in INTEGER_WEIGHT_DTYPES]
        float_acts = bool(self.input_dtypes) and self.input_dtypes[0] in FLOAT_DTYPES
        if self.version == 1 and self.name in HYBRID_OPS and integer_weights and float_acts:
            return f"{self.name} v1 is float-only but has {integer_weights[0]} weights (hybrid)"
        if self.name == "DEQUANTIZE" and self.version == 1 and self.input_dtypes[:1] == ("int4",):
            return "DEQUANTIZE v1 predates int4 inputs"
        return None


@dataclass(frozen=True)
class ModelInfo:
    """Everything checks need to know about a .tflite file, read from its flatbuffer."""

    size_bytes: int
    op_versions: dict[str, int]
    ops: tuple[OpUse, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    min_runtime_version: str | None
    metadata_names: tuple[str, ...]
    custom_ops: tuple[str, ...]
    subgraphs: int
    weights_bytes: int
    activation_peak_bytes: int
    tensor_dtypes: dict[str, int] = field(default_factory=dict)

    @property
    def float_ops(self) -> tuple[str, ...]:
        """Names of ops that compute in floating point (empty for a fully integer model)."""
        return tuple(sorted({op.name for op in self.ops if op.computes_in_float}))

    @property
    def understated_ops(self) -> tuple[str, ...]:
        """Reasons for every op whose declared version is too low for its tensor types."""
        return tuple(dict.fromkeys(r for op in self.ops if (r := op.understated_version)))

    @property
    def estimated_memory_bytes(self) -> int:
        """Weights plus peak live activations: a lower bound of the interpreter's footprint."""
        return self.weights_bytes + self.activation_peak_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (per-op list aggregated into op → version)."""
        return {
            "size_bytes": self.size_bytes,
            "op_versions": dict(sorted(self.op_versions.items())),
            "op_counts": _op_counts(self.ops),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "min_runtime_version": self.min_runtime_version,
            "metadata": list(self.metadata_names),
            "custom_ops": list(self.custom_ops),
            "float_ops": list(self.float_ops),
            "understated_ops": list(self.understated_ops),
            "subgraphs": self.subgraphs,
            "weights_bytes": self.weights_bytes,
            "activation_peak_bytes": self.activation_peak_bytes,
            "tensor_dtypes": dict(sorted(self.tensor_dtypes.items())),
        }


def _op_counts(ops: tuple[OpUse, ...]) -> dict[str, int]:
    """How many times each op name appears."""
    counts: dict[str, int] = {}
    for op in ops:
        counts[op.name] = counts.get(op.name, 0) + 1
    return dict(sorted(counts.items()))


def _dtype_name(code: int) -> str:
    """Lower-case numpy-style name of a TensorType code ('int8', 'float32', …)."""
    return _enum_names("TensorType").get(code, f"type{code}").lower()


def _itemsize(dtype: str) -> float:
    """Bytes per element of a dtype name (int4 is half a byte)."""
    sizes = {"int4": 0.5, "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2}
    sizes |= {"float16": 2, "bfloat16": 2, "int32": 4, "uint32": 4, "float32": 4}
    return sizes.get(dtype, 8)


def _shape(tensor: Any) -> tuple[int, ...]:
    """Static shape of a tensor (dynamic dims, -1 in shape_signature, read as their shape value)."""
    if tensor.ShapeIsNone():
        return ()
    return tuple(int(d) for d in tensor.ShapeAsNumpy())


def _tensor_info(tensor: Any) -> TensorInfo:
    """TensorInfo of a schema Tensor, with its first quantization scale/zero point if any."""
    quant = None
    q = tensor.Quantization()
    if q is not None and q.ScaleLength() > 0:
        zero = int(q.ZeroPoint(0)) if q.ZeroPointLength() > 0 else 0
        quant = (float(q.Scale(0)), zero)
    name = tensor.Name().decode("utf-8", "replace") if tensor.Name() else ""
    return TensorInfo(name, _shape(tensor), _dtype_name(tensor.Type()), quant)


def _buffer_bytes(model: Any, index: int) -> bytes:
    """Raw bytes of buffer `index`, inline or stored after the flatbuffer (offset/size)."""
    buf = model.Buffers(index)
    if buf is None:
        return b""
    if not buf.DataIsNone() and buf.DataLength() > 0:
        return bytes(buf.DataAsNumpy().tobytes())
    return b""


def _buffer_size(model: Any, index: int) -> int:
    """Size in bytes of buffer `index` without copying it."""
    buf = model.Buffers(index)
    if buf is None:
        return 0
    size = buf.DataLength() if not buf.DataIsNone() else 0
    if size == 0 and hasattr(buf, "Size"):
        size = int(buf.Size())  # buffers > 2 GB live outside the flatbuffer
    return size


def _activation_peak(subgraph: Any, constant: set[int], sizes: dict[int, int]) -> int:
    """Peak bytes of simultaneously live activation tensors, executing ops in order."""
    last_use: dict[int, int] = {}
    first_def: dict[int, int] = {}
    n_ops = subgraph.OperatorsLength()
    for i in range(subgraph.InputsLength()):
        first_def[int(subgraph.Inputs(i))] = -1
    for i in range(subgraph.OutputsLength()):
        last_use[int(subgraph.Outputs(i))] = n_ops
    for j in range(n_ops):
        op = subgraph.Operators(j)
        for k in range(op.InputsLength()):
            t = int(op.Inputs(k))
            if t >= 0:
                last_use[t] = max(last_use.get(t, j), j)
        for k in range(op.OutputsLength()):
            first_def.setdefault(int(op.Outputs(k)), j)
    peak = 0
    for step in range(-1, n_ops + 1):
        live = sum(
            sizes.get(t, 0)
            for t, start in first_def.items()
            if t not in constant and start <= step <= last_use.get(t, start)
        )
        peak = max(peak, live)
    return peak


def inspect_bytes(data: bytes, *, source: str = "<bytes>") -> ModelInfo:
    """Parse a .tflite buffer into ModelInfo, raising InspectError naming `source` if invalid."""
    if len(data) < 8 or data[4:8] != TFLITE_FILE_IDENTIFIER:
        raise InspectError(f"Not a TFLite flatbuffer (no 'TFL3' identifier): {source}")
    try:
        return _inspect(data)
    except InspectError:
        raise
    except Exception as exc:  # flatbuffers raises IndexError/struct.error on truncated input
        raise InspectError(f"Corrupt TFLite flatbuffer {source}: {exc!r}") from exc


def inspect_tflite(path: Path) -> ModelInfo:
    """Parse the .tflite file at `path` into ModelInfo (no TensorFlow, no interpreter)."""
    p = Path(path)
    if not p.is_file():
        raise InspectError(f"TFLite file not found: {p}")
    return inspect_bytes(p.read_bytes(), source=str(p))


def _inspect(data: bytes) -> ModelInfo:
    """Walk the flatbuffer: opcodes, subgraph 0's tensors and ops, buffers, metadata."""
    sch = schema()
    model = sch.Model.GetRootAs(data, 0)
    op_names = _enum_names("BuiltinOperator")
    codes: list[tuple[str, int]] = []
    custom: list[str] = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
        name = op_names.get(code, f"BUILTIN_{code}")
        if name == "CUSTOM":
            name = "CUSTOM:" + (oc.CustomCode() or b"?").decode("utf-8", "replace")
            custom.append(name.split(":", 1)[1])
        codes.append((name, int(oc.Version())))
    if model.SubgraphsLength() < 1:
        raise InspectError("TFLite model has no subgraph")
    sub = model.Subgraphs(0)
    tensors = [sub.Tensors(i) for i in range(sub.TensorsLength())]
    dtypes = [_dtype_name(t.Type()) for t in tensors]
    constant = {i for i, t in enumerate(tensors) if _buffer_size(model, t.Buffer()) > 0}
    sizes = {}
    dtype_counts: dict[str, int] = {}
    for i, t in enumerate(tensors):
        n = 1
        for d in _shape(t):
            n *= max(d, 1)
        sizes[i] = int(n * _itemsize(dtypes[i]))
        dtype_counts[dtypes[i]] = dtype_counts.get(dtypes[i], 0) + 1
    ops = []
    op_versions: dict[str, int] = {}
    for j in range(sub.OperatorsLength()):
        op = sub.Operators(j)
        name, version = codes[op.OpcodeIndex()]
        in_idx = [int(op.Inputs(k)) for k in range(op.InputsLength()) if op.Inputs(k) >= 0]
        ins = tuple(dtypes[t] for t in in_idx)
        consts = tuple(dtypes[t] for t in in_idx if t in constant)
        outs = tuple(dtypes[op.Outputs(k)] for k in range(op.OutputsLength()))
        ops.append(OpUse(j, name, version, ins, outs, consts))
        op_versions[name] = max(op_versions.get(name, 0), version)
    metadata: dict[str, bytes] = {}
    metadata_buffers = set()
    for i in range(model.MetadataLength()):
        md = model.Metadata(i)
        metadata[md.Name().decode("utf-8", "replace")] = _buffer_bytes(model, md.Buffer())
        metadata_buffers.add(int(md.Buffer()))
    min_rt = metadata.get("min_runtime_version", b"").split(b"\0", 1)[0].decode() or None
    weights = sum(
        _buffer_size(model, i) for i in range(model.BuffersLength()) if i not in metadata_buffers
    )
    return ModelInfo(
        size_bytes=len(data),
        op_versions=op_versions,
        ops=tuple(ops),
        inputs=tuple(_tensor_info(tensors[sub.Inputs(i)]) for i in range(sub.InputsLength())),
        outputs=tuple(_tensor_info(tensors[sub.Outputs(i)]) for i in range(sub.OutputsLength())),
        min_runtime_version=min_rt,
        metadata_names=tuple(metadata),
        custom_ops=tuple(custom),
        subgraphs=int(model.SubgraphsLength()),
        weights_bytes=weights,
        activation_peak_bytes=_activation_peak(sub, constant, sizes),
        tensor_dtypes=dtype_counts,
    )

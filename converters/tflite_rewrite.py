"""Rewrite a .tflite flatbuffer: fold fp16/sparse constants to fp32, add a signature, int I/O.

Pretrained .tflite files are often fp16-weight conversions (float16 constants behind
DEQUANTIZE), sometimes with sparse constants behind DENSIFY, and often ship without a
SignatureDef. Quantizers need a plain float graph with a signature to start from, so
`normalize_tflite` produces that; `integer_io` turns a statically quantized graph's float
boundary (QUANTIZE in, DEQUANTIZE out) into int8/int16 inputs and outputs, which integer-only
accelerators (Ethos-U, Edge TPU) need. `fingerprint` says when two files are the same model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converters.errors import ConversionError
from converters.tflite_inspect import schema

# Constant buffers start on a 16-byte boundary, as TF's own flatbuffer writer lays them out
# (SIMD kernels and memory-mapped loading read weights in place).
BUFFER_ALIGNMENT = 16
# Flatbuffers address with signed 32-bit offsets: everything inline must stay under 2 GiB.
FLATBUFFER_LIMIT = 2**31 - 1
# The signature key litert-quantizer and TF's signature runner look up by default.
SIGNATURE_KEY = "serving_default"
# Ops whose output is a constant when their inputs are: folded into fp32 constants here.
FOLDABLE_OPS = frozenset({"DEQUANTIZE", "DENSIFY"})
# Input dtypes of a DEQUANTIZE worth folding: fp16 weights. int8 DEQUANTIZE (weight-only
# quantization) is left alone: folding it would silently undo someone's compression.
FOLD_DEQUANTIZE_FROM = frozenset({"FLOAT16"})


@dataclass
class RewriteNotes:
    """What a rewrite changed, in words for the optimize report."""

    folded: dict[str, int] = field(default_factory=dict)  # op → how many constants folded
    signature_added: bool = False
    io_changed: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One human-readable line per change."""
        out = [f"folded {n} constant {op} op(s) into fp32 weights" for op, n in self.folded.items()]
        if self.signature_added:
            out.append(f"added a '{SIGNATURE_KEY}' SignatureDef (the file had none)")
        out += self.io_changed
        return out


def _names(enum_name: str) -> dict[int, str]:
    """value → NAME of a schema enum."""
    enum = getattr(schema(), enum_name)
    return {v: k for k, v in vars(enum).items() if not k.startswith("_") and isinstance(v, int)}


def read_model(data: bytes) -> Any:
    """Unpack .tflite bytes into the schema's mutable object tree (ModelT).

    Some writers (litert-quantizer, TF for models over 2 GB) keep constants after the
    flatbuffer (Buffer.offset/size), which the object tree does not load: they are read in
    here and written back inline, so a rewrite never drops weights.
    """
    model = schema().ModelT.InitFromPackedBuf(bytearray(data), 0)
    for buf in model.buffers or []:
        offset, size = int(buf.offset or 0), int(buf.size or 0)
        if offset > 1:
            if offset + size > len(data):
                raise ConversionError(f"buffer at offset {offset} runs past the file's end")
            buf.data = np.frombuffer(data, dtype=np.uint8, count=size, offset=offset)
            buf.offset = buf.size = 0
    return model


class _AlignedBuffer:
    """Packs a buffer's bytes on a BUFFER_ALIGNMENT boundary (the generated BufferT does not)."""

    def __init__(self, buf: Any) -> None:
        """Wrap a BufferT (its data, offset and size)."""
        self.data = None if buf.data is None else np.asarray(buf.data, dtype=np.uint8)
        self.offset, self.size = int(buf.offset or 0), int(buf.size or 0)

    def Pack(self, builder: Any) -> int:
        """Write the data vector aligned, then the Buffer table."""
        sch = schema()
        data_off = None
        if self.data is not None and self.data.size:
            raw = self.data.tobytes()
            builder.StartVector(1, len(raw), BUFFER_ALIGNMENT)
            builder.head = builder.head - len(raw)
            builder.Bytes[builder.head : builder.head + len(raw)] = raw
            data_off = builder.EndVector()
        sch.BufferStart(builder)
        if data_off is not None:
            sch.BufferAddData(builder, data_off)
        sch.BufferAddOffset(builder, self.offset)
        sch.BufferAddSize(builder, self.size)
        return int(sch.BufferEnd(builder))


def write_model(model: Any) -> bytes:
    """Pack a ModelT into .tflite bytes with aligned constant buffers."""
    import flatbuffers  # type: ignore[import-untyped]

    model.buffers = [_AlignedBuffer(b) for b in (model.buffers or [])]
    size = sum(b.data.size for b in model.buffers if b.data is not None)
    if size >= FLATBUFFER_LIMIT:
        raise ConversionError(f"{size} bytes of constants do not fit one flatbuffer (2 GiB)")
    builder = flatbuffers.Builder(size + 1024 * 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _op_name(model: Any, op: Any) -> str:
    """Builtin name of an operator ('CONV_2D', …, 'CUSTOM')."""
    code = model.operatorCodes[op.opcodeIndex]
    value = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    return _names("BuiltinOperator").get(value, f"BUILTIN_{value}")


def _buffer_data(model: Any, tensor: Any) -> np.ndarray | None:
    """A tensor's constant bytes (uint8 array), or None for an activation."""
    if not tensor.buffer:
        return None
    data = model.buffers[tensor.buffer].data
    if data is None or len(data) == 0:
        return None
    return np.asarray(data, dtype=np.uint8)


def _set_constant(model: Any, tensor: Any, value: np.ndarray) -> None:
    """Make `tensor` an fp32 constant holding `value` (a new buffer of its own)."""
    sch = schema()
    buf = sch.BufferT()
    buf.data = np.frombuffer(np.ascontiguousarray(value, dtype="<f4").tobytes(), dtype=np.uint8)
    model.buffers.append(buf)
    tensor.buffer = len(model.buffers) - 1
    tensor.type = sch.TensorType.FLOAT32
    tensor.quantization = None
    tensor.sparsity = None
    tensor.shape = np.asarray(value.shape, dtype=np.int32)
    tensor.shapeSignature = None


def _densified_values(data: bytes, tensor_indices: list[int]) -> dict[int, np.ndarray]:
    """Values of DENSIFY outputs, computed by the TF Lite runtime itself (one zero-input run).

    The runtime's own sparse-format decoder is the reference; DENSIFY computes on the first
    invoke, and preserve_all_tensors keeps its output readable afterwards. Without default
    delegates: XNNPACK takes the weights over at init and never runs DENSIFY (garbage reads).
    """
    import warnings

    from converters.interpreter import interpreter_class

    try:
        from ai_edge_litert.interpreter import OpResolverType

        resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        with warnings.catch_warnings():  # "preserve_all_tensors is for debugging": it is here
            warnings.simplefilter("ignore")
            interp = interpreter_class()(
                model_content=data,
                experimental_preserve_all_tensors=True,
                experimental_op_resolver_type=resolver,
            )
        interp.allocate_tensors()
        for detail in interp.get_input_details():
            interp.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        interp.invoke()
        return {t: np.array(interp.get_tensor(t)) for t in tensor_indices}
    except Exception as exc:  # the runtime refused the sparse model: say which step failed
        raise ConversionError(f"cannot densify sparse constants with the runtime: {exc}") from exc


def fold_constants(model: Any, data: bytes, notes: RewriteNotes) -> None:
    """Replace DEQUANTIZE-of-fp16 and DENSIFY ops on constants by fp32 constants, in place."""
    types = _names("TensorType")
    for sg_index, sub in enumerate(model.subgraphs or []):
        changed = True
        while changed:  # DENSIFY → DEQUANTIZE chains fold in two rounds
            changed = False
            densify: list[tuple[int, int]] = []  # (op position, output tensor)
            keep = []
            for pos, op in enumerate(sub.operators or []):
                name = _op_name(model, op)
                ins = [int(i) for i in op.inputs if i >= 0]
                if name not in FOLDABLE_OPS or len(ins) != 1 or len(op.outputs) != 1:
                    keep.append(op)
                    continue
                src, out = sub.tensors[ins[0]], sub.tensors[int(op.outputs[0])]
                raw = _buffer_data(model, src)
                if raw is None:
                    keep.append(op)
                elif name == "DEQUANTIZE" and types.get(src.type) in FOLD_DEQUANTIZE_FROM:
                    shape = tuple(int(d) for d in src.shape)
                    value = raw.view("<f2").astype(np.float32).reshape(shape)
                    _set_constant(model, out, value)
                    notes.folded[name] = notes.folded.get(name, 0) + 1
                    changed = True
                elif name == "DENSIFY":
                    if sg_index != 0:
                        raise ConversionError("sparse constants outside the main subgraph")
                    densify.append((pos, int(op.outputs[0])))
                    keep.append(op)
                else:
                    keep.append(op)
            if densify:
                values = _densified_values(data, [t for _, t in densify])
                drop = {pos for pos, _ in densify}
                keep = [op for op in keep if (sub.operators or []).index(op) not in drop]
                for _, t in densify:
                    out = sub.tensors[t]
                    was = types.get(out.type)
                    _set_constant(model, out, values[t].astype(np.float32))
                    if was == "FLOAT16":  # DENSIFY of fp16: a DEQUANTIZE follows; fold it too
                        out.type = schema().TensorType.FLOAT32
                    notes.folded["DENSIFY"] = notes.folded.get("DENSIFY", 0) + 1
                changed = True
            sub.operators = keep
    # A fp16 tensor folded through DENSIFY now feeds DEQUANTIZE with fp32: drop those no-ops.
    _drop_float_dequantize(model)
    compact(model)


def _drop_float_dequantize(model: Any) -> None:
    """Remove DEQUANTIZE ops whose input is already fp32, rewiring their consumers."""
    f32 = schema().TensorType.FLOAT32
    for sub in model.subgraphs or []:
        rename: dict[int, int] = {}
        keep = []
        for op in sub.operators or []:
            if _op_name(model, op) == "DEQUANTIZE" and sub.tensors[int(op.inputs[0])].type == f32:
                rename[int(op.outputs[0])] = int(op.inputs[0])
            else:
                keep.append(op)
        if not rename:
            continue
        for op in keep:
            op.inputs = np.asarray([rename.get(int(i), int(i)) for i in op.inputs], np.int32)
        sub.outputs = np.asarray([rename.get(int(i), int(i)) for i in sub.outputs], np.int32)
        sub.operators = keep


def _used_tensors(model: Any, sg_index: int) -> set[int]:
    """Tensor indices any op, the subgraph I/O or a signature of subgraph `sg_index` uses."""
    sub = model.subgraphs[sg_index]
    used = {int(i) for i in sub.inputs} | {int(i) for i in sub.outputs}
    for op in sub.operators or []:
        used |= {int(i) for i in op.inputs if i >= 0}
        used |= {int(i) for i in op.outputs if i >= 0}
        if op.intermediates is not None:
            used |= {int(i) for i in op.intermediates}
    return used


def compact(model: Any) -> None:
    """Drop unused tensors, opcodes and buffer contents, remapping every index to them."""
    for sg_index, sub in enumerate(model.subgraphs or []):
        used = sorted(_used_tensors(model, sg_index))
        remap = {old: new for new, old in enumerate(used)}

        def _map(idx: Any, remap: dict[int, int] = remap) -> np.ndarray:
            """Remap an index vector (keeping -1 for optional inputs)."""
            return np.asarray([remap[int(i)] if i >= 0 else -1 for i in idx], dtype=np.int32)

        sub.tensors = [sub.tensors[i] for i in used]
        sub.inputs, sub.outputs = _map(sub.inputs), _map(sub.outputs)
        for op in sub.operators or []:
            op.inputs, op.outputs = _map(op.inputs), _map(op.outputs)
            if op.intermediates is not None:
                op.intermediates = _map(op.intermediates)
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == sg_index:
                for tm in [*(sig.inputs or []), *(sig.outputs or [])]:
                    tm.tensorIndex = remap[int(tm.tensorIndex)]
    referenced = {int(t.buffer) for sub in model.subgraphs or [] for t in sub.tensors}
    referenced |= {int(m.buffer) for m in model.metadata or []}
    for i, buf in enumerate(model.buffers or []):
        if i not in referenced:
            buf.data, buf.offset, buf.size = None, 0, 0
    used_codes = sorted({int(op.opcodeIndex) for s in model.subgraphs for op in s.operators or []})
    code_map = {old: new for new, old in enumerate(used_codes)}
    model.operatorCodes = [model.operatorCodes[i] for i in used_codes]
    for sub in model.subgraphs:
        for op in sub.operators or []:
            op.opcodeIndex = code_map[int(op.opcodeIndex)]


def _tensor_name(tensor: Any, fallback: str, taken: set[str]) -> str:
    """A tensor's name for a signature: its own if usable and unique, else `fallback`."""
    raw = tensor.name.decode("utf-8", "replace") if isinstance(tensor.name, bytes) else tensor.name
    name = raw if raw and raw not in taken else fallback
    taken.add(name)
    return name


def ensure_signature(model: Any, notes: RewriteNotes) -> None:
    """Add a 'serving_default' SignatureDef over subgraph 0's I/O when the file has none."""
    if model.signatureDefs:
        return
    sch = schema()
    sub = model.subgraphs[0]
    sig = sch.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = SIGNATURE_KEY, 0
    taken: set[str] = set()
    sig.inputs, sig.outputs = [], []
    sides = (("input", sub.inputs, sig.inputs), ("output", sub.outputs, sig.outputs))
    for kind, indices, target in sides:
        for n, idx in enumerate(indices):
            tm = sch.TensorMapT()
            tm.name = _tensor_name(sub.tensors[int(idx)], f"{kind}_{n}", taken)
            tm.tensorIndex = int(idx)
            target.append(tm)
    model.signatureDefs = [sig]
    notes.signature_added = True


def signature_input_names(data: bytes) -> list[str]:
    """The main signature's input names in subgraph-input order (for calibration feeds)."""
    model = read_model(data)
    sub = model.subgraphs[0]
    for sig in model.signatureDefs or []:
        if sig.subgraphIndex == 0:
            by_index = {int(tm.tensorIndex): tm.name for tm in sig.inputs or []}
            names = [by_index.get(int(i)) for i in sub.inputs]
            if all(names):
                return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    raise ConversionError("the model has no signature over its main subgraph's inputs")


def normalize_tflite(data: bytes) -> tuple[bytes, RewriteNotes]:
    """A plain float, signature-carrying version of `data` (quantizers start from this)."""
    notes = RewriteNotes()
    model = read_model(data)
    fold_constants(model, data, notes)
    ensure_signature(model, notes)
    return write_model(model), notes


def integer_io(data: bytes) -> tuple[bytes, RewriteNotes]:
    """Move a quantized graph's QUANTIZE (input side) and DEQUANTIZE (output side) out of it.

    Inputs then take and outputs give the int8/int16 tensors with their scale and zero point,
    as the TF converter's inference_input_type/inference_output_type do.
    """
    notes = RewriteNotes()
    model = read_model(data)
    sub = model.subgraphs[0]
    types = _names("TensorType")
    consumers: dict[int, list[Any]] = {}
    producer: dict[int, Any] = {}
    for op in sub.operators:
        for i in op.inputs:
            consumers.setdefault(int(i), []).append(op)
        for o in op.outputs:
            producer[int(o)] = op
    rename: dict[int, int] = {}
    drop: list[Any] = []
    for idx in (int(i) for i in sub.inputs):
        ops = consumers.get(idx, [])
        if len(ops) == 1 and _op_name(model, ops[0]) == "QUANTIZE":
            rename[idx] = int(ops[0].outputs[0])
            drop.append(ops[0])
    for idx in (int(i) for i in sub.outputs):
        op = producer.get(idx)
        if op is not None and _op_name(model, op) == "DEQUANTIZE" and not consumers.get(idx):
            src = int(op.inputs[0])
            if types.get(sub.tensors[src].type) in ("INT8", "INT16", "UINT8"):
                rename[idx] = src
                drop.append(op)
    if not rename:
        return data, notes
    sub.operators = [op for op in sub.operators if all(op is not d for d in drop)]
    sub.inputs = np.asarray([rename.get(int(i), int(i)) for i in sub.inputs], np.int32)
    sub.outputs = np.asarray([rename.get(int(i), int(i)) for i in sub.outputs], np.int32)
    for sig in model.signatureDefs or []:
        for tm in [*(sig.inputs or []), *(sig.outputs or [])]:
            tm.tensorIndex = rename.get(int(tm.tensorIndex), int(tm.tensorIndex))
    compact(model)
    ends = [*sub.inputs, *sub.outputs]
    kinds = sorted({types.get(sub.tensors[int(i)].type, "?").lower() for i in ends})
    notes.io_changed.append(f"inputs and outputs made {'/'.join(kinds)} (QUANTIZE/DEQUANTIZE cut)")
    return write_model(model), notes


def fingerprint(data: bytes) -> str:
    """A hash of what computes: ops, tensor types/shapes/quantization and constant bytes.

    Names, signatures, metadata and layout are left out, so two files with the same graph and
    the same weights have the same fingerprint even when their bytes differ.
    """
    model = read_model(data)
    h = hashlib.sha256()
    for sub in model.subgraphs or []:
        h.update(np.asarray(sub.inputs, np.int64).tobytes() + b"|")
        h.update(np.asarray(sub.outputs, np.int64).tobytes() + b"|")
        for op in sub.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            h.update(f"{_op_name(model, op)}/{code.version}/{code.customCode}".encode())
            h.update(np.asarray(op.inputs, np.int64).tobytes())
            h.update(np.asarray(op.outputs, np.int64).tobytes() + b";")
        for t in sub.tensors:
            shape = list(np.asarray(t.shape if t.shape is not None else []))
            h.update(f"{t.type}:{shape}".encode())
            q = t.quantization
            if q is not None:
                for arr in (q.scale, q.zeroPoint):
                    h.update(np.asarray(arr if arr is not None else [], np.float64).tobytes())
            raw = _buffer_data(model, t)
            h.update(raw.tobytes() if raw is not None else b"-")
    return h.hexdigest()

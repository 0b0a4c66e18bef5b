"""Weight sparsity and compressed size read from a .tflite file: what pruning buys after gzip."""

from __future__ import annotations

import gzip
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.errors import InspectError
from converters.tflite_inspect import TFLITE_FILE_IDENTIFIER, schema

# gzip -9 is what a release pipeline or an HTTP/OTA transport would apply; level 9 costs ~1 s on
# the 14 MB MobileNetV2 fp32 file and gives the smallest, most stable figure.
GZIP_LEVEL = 9
# Kernels (conv 4-D, dense 2-D, …) have rank ≥ 2; rank-0/1 constants are biases, per-axis
# parameters and shape operands, which pruning does not touch and which would dilute the figure.
MIN_WEIGHT_RANK = 2
# Numpy element types of the TensorType names weights are stored as (int4 is unpacked apart).
_NUMPY_DTYPES = {
    "FLOAT32": np.float32,
    "FLOAT16": np.float16,
    "FLOAT64": np.float64,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT16": np.int16,
    "UINT16": np.uint16,
    "INT32": np.int32,
    "UINT32": np.uint32,
    "INT64": np.int64,
}


@dataclass(frozen=True)
class WeightSparsity:
    """Zero-valued share of a model's constant kernels, counted element by element in the file."""

    weight_sparsity: float
    weight_zeros: int
    weight_elements: int
    weight_tensors: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


def compressed_size(data: bytes) -> int:
    """Bytes of `data` after gzip -9 (mtime 0, so the figure depends on the content only)."""
    return len(gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0))


def _type_names() -> dict[int, str]:
    """TensorType code → NAME from the flatbuffer schema."""
    enum = schema().TensorType
    return {v: k for k, v in vars(enum).items() if not k.startswith("_") and isinstance(v, int)}


def _buffer(model: Any, data: bytes, index: int) -> bytes:
    """Buffer `index`'s bytes: inline, or after the flatbuffer (offset/size, models > 2 GB)."""
    buf = model.Buffers(index)
    if buf is None:
        return b""
    if not buf.DataIsNone() and buf.DataLength() > 0:
        return bytes(buf.DataAsNumpy().tobytes())
    offset = int(buf.Offset()) if hasattr(buf, "Offset") else 0
    size = int(buf.Size()) if hasattr(buf, "Size") else 0
    return data[offset : offset + size] if offset > 1 and size > 0 else b""


def _values(raw: bytes, type_name: str, count: int) -> np.ndarray | None:
    """The stored elements of a constant (int4 unpacked, low nibble first), or None if unknown."""
    if type_name == "INT4":
        packed = np.frombuffer(raw, dtype=np.uint8)
        nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[:count]
        return np.where(nibbles > 7, nibbles.astype(np.int16) - 16, nibbles.astype(np.int16))
    dtype = _NUMPY_DTYPES.get(type_name)
    if dtype is None:
        return None
    return np.frombuffer(raw, dtype=dtype)[:count]


def _zero_points(tensor: Any, shape: tuple[int, ...]) -> np.ndarray | int:
    """The stored value that means 0.0: the zero point, per channel along its axis if needed."""
    q = tensor.Quantization()
    if q is None or q.ZeroPointLength() == 0:
        return 0
    zps = q.ZeroPointAsNumpy()
    if q.ZeroPointLength() == 1 or not np.any(zps):
        return int(zps[0])
    axis = int(q.QuantizedDimension())
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(zps.reshape(view), shape).reshape(-1)


def weight_sparsity(data: bytes, *, source: str = "<bytes>") -> WeightSparsity:
    """Share of kernel elements (constants of rank ≥ 2, all subgraphs) whose real value is 0.

    A quantized element is zero when it equals its zero point (0 for TF Lite's symmetric int8
    weights), so small weights that quantization rounds to 0 count too: that is what is stored.
    """
    if len(data) < 8 or data[4:8] != TFLITE_FILE_IDENTIFIER:
        raise InspectError(f"Not a TFLite flatbuffer (no 'TFL3' identifier): {source}")
    try:
        model = schema().Model.GetRootAs(data, 0)
        names = _type_names()
        zeros = elements = tensors = 0
        seen: set[int] = set()
        for s in range(model.SubgraphsLength()):
            sub = model.Subgraphs(s)
            for i in range(sub.TensorsLength()):
                tensor = sub.Tensors(i)
                shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
                if len(shape) < MIN_WEIGHT_RANK or tensor.Buffer() in seen:
                    continue
                raw = _buffer(model, data, tensor.Buffer())
                count = int(np.prod(shape))
                values = _values(raw, names.get(tensor.Type(), "?"), count) if raw else None
                if values is None or values.size != count:
                    continue
                seen.add(tensor.Buffer())
                zeros += int(np.count_nonzero(values == _zero_points(tensor, shape)))
                elements += count
                tensors += 1
    except InspectError:
        raise
    except Exception as exc:  # flatbuffers raises IndexError/struct.error on truncated input
        raise InspectError(f"Corrupt TFLite flatbuffer {source}: {exc!r}") from exc
    share = zeros / elements if elements else 0.0
    return WeightSparsity(share, zeros, elements, tensors)


def weight_sparsity_file(path: Path) -> WeightSparsity:
    """weight_sparsity() of the .tflite file at `path`."""
    p = Path(path)
    return weight_sparsity(p.read_bytes(), source=str(p))

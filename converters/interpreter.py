"""Run .tflite models on the host with the real LiteRT interpreter, quantizing I/O as needed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.errors import ModelInputError


def interpreter_class() -> Any:
    """The Interpreter class: ai_edge_litert, else tflite_runtime, else tf.lite (as Frigate)."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    from converters._tf import tensorflow

    return tensorflow().lite.Interpreter


@dataclass
class HostModel:
    """A loaded and allocated .tflite model with float-in/float-out helpers."""

    interpreter: Any
    source: str

    @property
    def input_detail(self) -> dict[str, Any]:
        """The first input's tensor details (name, shape, dtype, quantization)."""
        return self.interpreter.get_input_details()[0]

    @property
    def output_detail(self) -> dict[str, Any]:
        """The first output's tensor details."""
        return self.interpreter.get_output_details()[0]

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Convert float inputs to the model's input dtype with its scale and zero point."""
        detail = self.input_detail
        return quantize(x, detail["dtype"], detail["quantization"])

    def invoke_raw(self, x: np.ndarray) -> np.ndarray:
        """Run one batch already in the input dtype; return the raw output tensor (a copy)."""
        interp = self.interpreter
        inp = self.input_detail
        if tuple(inp["shape"]) != tuple(x.shape):
            interp.resize_tensor_input(inp["index"], list(x.shape))
            interp.allocate_tensors()
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return np.array(interp.get_tensor(self.output_detail["index"]))

    @property
    def static_batch(self) -> int | None:
        """The input's fixed batch size, or None when the batch dimension is dynamic (-1)."""
        detail = self.input_detail
        signature = detail.get("shape_signature")
        if signature is None or len(signature) == 0 or int(signature[0]) == -1:
            return None
        return int(detail["shape"][0])

    def predict(self, x: np.ndarray, *, batch: int = 1) -> np.ndarray:
        """Float outputs for float inputs `x` (N, ...); `batch` per invoke when it is dynamic."""
        batch = self.static_batch or batch
        outs = []
        for start in range(0, x.shape[0], batch):
            raw = self.invoke_raw(self.quantize_input(x[start : start + batch]))
            outs.append(dequantize(raw, self.output_detail["quantization"]))
        return np.concatenate(outs, axis=0)


def quantize(x: np.ndarray, dtype: Any, quantization: tuple[float, int]) -> np.ndarray:
    """Affine-quantize float `x` into integer `dtype` (float dtypes are only cast)."""
    np_dtype = np.dtype(dtype)
    if np_dtype.kind == "f":
        return np.asarray(x, dtype=np_dtype)
    scale, zero_point = quantization
    if not scale:
        return np.asarray(x, dtype=np_dtype)
    info = np.iinfo(np_dtype)
    q = np.round(np.asarray(x, dtype=np.float32) / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(np_dtype)


def dequantize(q: np.ndarray, quantization: tuple[float, int]) -> np.ndarray:
    """Map integer outputs back to float32 with (scale, zero_point); floats pass through."""
    if q.dtype.kind == "f":
        return q.astype(np.float32)
    scale, zero_point = quantization
    if not scale:
        return q.astype(np.float32)
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)


def load_host_model(model: Path | bytes, *, num_threads: int = 1) -> HostModel:
    """Load and allocate a .tflite file or buffer, raising ModelInputError when it is invalid."""
    interp_cls = interpreter_class()
    source = "<bytes>" if isinstance(model, bytes | bytearray) else str(model)
    try:
        if isinstance(model, bytes | bytearray):
            interp = interp_cls(model_content=bytes(model), num_threads=num_threads)
        else:
            if not Path(model).is_file():
                raise ModelInputError(f"TFLite model not found: {model}")
            interp = interp_cls(model_path=str(model), num_threads=num_threads)
        interp.allocate_tensors()
    except ModelInputError:
        raise
    except Exception as exc:  # the interpreter raises ValueError/RuntimeError on bad models
        raise ModelInputError(f"Cannot load TFLite model {source}: {exc}") from exc
    return HostModel(interp, source)

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
    """A loaded and allocated .tflite model with float-in/float-out helpers over every I/O."""

    interpreter: Any
    source: str

    @property
    def input_details(self) -> list[dict[str, Any]]:
        """Every input's tensor details (name, shape, dtype, quantization), in model order."""
        return list(self.interpreter.get_input_details())

    @property
    def output_details(self) -> list[dict[str, Any]]:
        """Every output's tensor details, in model order."""
        return list(self.interpreter.get_output_details())

    @property
    def output_names(self) -> list[str]:
        """Each output's name: its SignatureDef key ('boxes') when the model has one signature,
        else the tensor name ('StatefulPartitionedCall:1')."""
        names = {int(d["index"]): str(d["name"]) for d in self.output_details}
        try:
            signatures = self.interpreter.get_signature_list()
            if len(signatures) == 1:
                runner = self.interpreter.get_signature_runner(next(iter(signatures)))
                for key, detail in runner.get_output_details().items():
                    if int(detail["index"]) in names:
                        names[int(detail["index"])] = str(key)
        except (AttributeError, ValueError, RuntimeError, KeyError):
            pass  # older runtimes or no signature: tensor names
        return [names[int(d["index"])] for d in self.output_details]

    def quantize_inputs(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Convert float inputs (one array per model input) to each input's dtype and scale."""
        details = self.input_details
        if len(xs) != len(details):
            raise ValueError(f"model has {len(details)} inputs, got {len(xs)} arrays")
        return [
            quantize(x, d["dtype"], d["quantization"]) for x, d in zip(xs, details, strict=True)
        ]

    def invoke_raw(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Run one batch already in the input dtypes; return every raw output tensor (copies)."""
        interp = self.interpreter
        details = self.input_details
        if len(xs) != len(details):
            raise ValueError(f"model has {len(details)} inputs, got {len(xs)} arrays")
        if any(tuple(d["shape"]) != tuple(x.shape) for d, x in zip(details, xs, strict=True)):
            for d, x in zip(details, xs, strict=True):
                interp.resize_tensor_input(d["index"], list(x.shape))
            interp.allocate_tensors()
            details = self.input_details
        for d, x in zip(details, xs, strict=True):
            interp.set_tensor(d["index"], x)
        interp.invoke()
        return [np.array(interp.get_tensor(d["index"])) for d in self.output_details]

    @property
    def static_batch(self) -> int | None:
        """The first input's fixed batch size, or None when its batch dimension is dynamic."""
        detail = self.input_details[0]
        signature = detail.get("shape_signature")
        if signature is None or len(signature) == 0 or int(signature[0]) == -1:
            return None
        return int(detail["shape"][0])

    def predict_all(self, xs: np.ndarray | list[np.ndarray], *, batch: int = 1) -> list[np.ndarray]:
        """Float outputs (one (N, ...) array per model output) for float inputs (N, ...)."""
        inputs = [xs] if isinstance(xs, np.ndarray) else list(xs)
        batch = self.static_batch or batch
        count = inputs[0].shape[0]
        per_output: list[list[np.ndarray]] = [[] for _ in self.output_details]
        for start in range(0, count, batch):
            chunk = [x[start : start + batch] for x in inputs]
            raws = self.invoke_raw(self.quantize_inputs(chunk))
            for k, (raw, d) in enumerate(zip(raws, self.output_details, strict=True)):
                per_output[k].append(dequantize(raw, d["quantization"]))
        return [np.concatenate(parts, axis=0) for parts in per_output]

    def predict(self, x: np.ndarray, *, batch: int = 1) -> np.ndarray:
        """Float outputs of a single-output model (use predict_all for several outputs)."""
        outputs = self.predict_all(x, batch=batch)
        if len(outputs) != 1:
            raise ValueError(f"model has {len(outputs)} outputs: use predict_all()")
        return outputs[0]


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

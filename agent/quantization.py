"""Float <-> quantized tensors with a model's (scale, zero_point): InferenceClient's "numpy in,
numpy out" for int8/uint8 models. numpy only (applications import it through agent.client)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TensorCodec:
    """One model tensor's dtype and affine quantization (scale 0 = not quantized)."""

    dtype: np.dtype[Any]
    scale: float
    zero_point: int

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TensorCodec:
        """From a tensor of the service's model description ({"dtype", "quantization"})."""
        q = spec.get("quantization") or {}
        return cls(np.dtype(spec["dtype"]), float(q.get("scale", 0.0)), int(q.get("zero_point", 0)))

    @property
    def quantized(self) -> bool:
        """An integer tensor with a real scale: floats map onto it affinely."""
        return self.dtype.kind in "iu" and self.scale > 0.0

    def quantize(self, array: np.ndarray) -> np.ndarray:
        """A float array as this tensor's integers (rounded half away from zero like TFLite's
        Quantize kernel, clipped to the dtype); anything else as is.

        Only floating input on a quantized tensor is converted: integers are taken to be
        already quantized, and anything else goes to the service, which names a mismatch.
        """
        if not self.quantized or array.dtype.kind != "f":
            return array
        info = np.iinfo(self.dtype)
        scaled = array.astype(np.float32) / np.float32(self.scale)
        values = np.trunc(scaled + np.copysign(np.float32(0.5), scaled)) + self.zero_point
        return np.clip(values, info.min, info.max).astype(self.dtype)

    def dequantize(self, array: np.ndarray) -> np.ndarray:
        """This tensor's integers as float32 real values; non-quantized outputs as they are."""
        if not self.quantized or array.dtype.kind not in "iu":
            return array
        return (array.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)


@dataclass(frozen=True)
class ModelCodec:
    """The quantization of one model's inputs and outputs (from the service's `model` op)."""

    model_sha256: str
    inputs: tuple[TensorCodec, ...]
    outputs: tuple[TensorCodec, ...]

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> ModelCodec:
        """From InferenceClient.model_info()."""
        return cls(
            str(info["model_sha256"]),
            tuple(TensorCodec.from_spec(s) for s in info["inputs"]),
            tuple(TensorCodec.from_spec(s) for s in info["outputs"]),
        )

    def encode(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Inputs as the model takes them; a wrong count goes through (the service says so)."""
        if len(arrays) != len(self.inputs):
            return list(arrays)
        return [codec.quantize(a) for codec, a in zip(self.inputs, arrays, strict=True)]

    def decode(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs as real values (float32) where the model's outputs are quantized."""
        if len(arrays) != len(self.outputs):
            return list(arrays)
        return [codec.dequantize(a) for codec, a in zip(self.outputs, arrays, strict=True)]

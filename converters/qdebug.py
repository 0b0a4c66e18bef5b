"""Explain a refused int8 variant: the layers TF Lite's quantization debugger finds worst.

`tf.lite.experimental.QuantizationDebugger` runs the float and the quantized model side by side
on calibration data and records, per quantized tensor, the error of the quantized value. The
error relative to the tensor's quantization step (RMSE / scale) says where int8 loses the signal:
about 0.29 is plain rounding (uniform error over one step), far above it is a layer whose range
is ill-suited to 8 bits. Keras sources only (the debugger needs the TF converter).
"""

from __future__ import annotations

import csv
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from converters.errors import ConverterError
from converters.recipes import configure, load_keras_model, with_fixed_batch

# The worst layers a reason names: enough to point at a block, short enough for one line.
WORST_LAYERS = 3
# The debugger runs every sample through both models per layer; a few suffice for the ranking.
DEBUG_SAMPLES = 16


def worst_layers(keras_path: Path, calib: np.ndarray, top: int = WORST_LAYERS) -> list[str]:
    """`name rmse/scale X` for the `top` tensors with the largest quantization error."""
    from converters._tf import tensorflow

    tf = tensorflow()
    model = with_fixed_batch(load_keras_model(Path(keras_path)), 1)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    configure(converter, "int8", calib, str(keras_path))
    samples = np.asarray(calib[:DEBUG_SAMPLES], dtype=np.float32)

    def dataset() -> Iterator[list[np.ndarray]]:
        """One sample per step, as the debugger expects."""
        for i in range(samples.shape[0]):
            yield [samples[i : i + 1]]

    converter.representative_dataset = dataset
    try:
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=dataset
        )
        debugger.run()
        with tempfile.TemporaryDirectory() as tmp:
            dump = Path(tmp) / "layers.csv"
            with dump.open("w") as fh:
                debugger.layer_statistics_dump(fh)
            rows = list(csv.DictReader(dump.open()))
    except Exception as exc:  # the debugger raises whatever TF raises; never fail the run
        raise ConverterError(f"quantization debugger failed: {exc}") from exc
    ranked = []
    for row in rows:
        try:
            scale, mse = float(row["scale"]), float(row["mean_squared_error"])
        except (KeyError, ValueError):
            continue
        if scale > 0 and math.isfinite(mse):
            ranked.append((math.sqrt(mse) / scale, row.get("tensor_name") or row["op_name"]))
    ranked.sort(reverse=True)
    return [f"{name} rmse/scale {ratio:.2f}" for ratio, name in ranked[:top]]

"""Build "pretrained-style" .tflite files with TensorFlow, shaped like the public ones users bring.

The public face/palm detectors and landmark models are fp16-weight conversions (constants stored
as float16 behind DEQUANTIZE), some with sparse weights (DENSIFY), and often without a
SignatureDef. These builders make such files here, with seeded random weights, for the tests
and for bench/bench_pretrained.py. TensorFlow is needed (never on a device).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep the converter's C++ chatter out

import numpy as np

# Any fixed value; fixed so reruns give the same weights.
SEED = 18
# Small image input: big enough for a few strided convolutions, small enough to convert in seconds.
DETECTOR_INPUT = (32, 32, 3)
# Anchors and box coordinates of the detector heads (BlazeFace-like: boxes + scores per anchor).
DETECTOR_ANCHORS = 64
DETECTOR_COORDS = 4
# Calibration samples written next to the fixtures; the converters use at most 200.
CALIB_SAMPLES = 64
# Training the detector for a few seconds on 2 cores makes its score peak clear (see below).
DETECTOR_EPOCHS = 8
DETECTOR_TRAIN_SAMPLES = 1024


def _tf() -> Any:
    """Import TensorFlow lazily (test collection must not pay for it)."""
    import tensorflow as tf

    return tf


def detector_keras() -> Any:
    """A two-head detector: a small conv backbone, then box regressors and anchor scores."""
    tf = _tf()
    tf.keras.utils.set_random_seed(SEED)
    layers = tf.keras.layers
    inputs = tf.keras.Input(shape=DETECTOR_INPUT, batch_size=1, name="image")
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    x = layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = layers.Conv2D(24, 1, activation="relu")(x)
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)  # 8×8 = 64 anchors
    boxes = layers.Conv2D(DETECTOR_COORDS, 1)(x)
    boxes = layers.Reshape((DETECTOR_ANCHORS, DETECTOR_COORDS), name="boxes")(boxes)
    scores = layers.Conv2D(1, 1)(x)
    scores = layers.Reshape((DETECTOR_ANCHORS, 1), name="scores")(scores)
    return tf.keras.Model(inputs, [boxes, scores], name="detector")


def detector_scenes(n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images with one bright square on dim noise, its anchor one-hot map and its box.

    The square covers 8×8 pixels at a 4-pixel grid position, so its centre falls in exactly one
    of the 8×8 anchors (4×4 pixels each); boxes are (cx, cy, w, h) in [0, 1].
    """
    rng = np.random.default_rng(seed)
    side = DETECTOR_INPUT[0]
    grid = side // 4
    images = (0.2 * rng.random((n, *DETECTOR_INPUT))).astype(np.float32)
    scores = np.zeros((n, DETECTOR_ANCHORS, 1), np.float32)
    boxes = np.zeros((n, DETECTOR_ANCHORS, DETECTOR_COORDS), np.float32)
    for i in range(n):
        y0, x0 = 4 * rng.integers(0, grid - 1, size=2)
        images[i, y0 : y0 + 8, x0 : x0 + 8, :] = 1.0
        anchor = ((y0 + 4) // 4) * grid + (x0 + 4) // 4
        scores[i, anchor, 0] = 1.0
        boxes[i, :] = ((x0 + 4) / side, (y0 + 4) / side, 8 / side, 8 / side)
    return images, scores, boxes


def trained_detector(epochs: int = DETECTOR_EPOCHS) -> Any:
    """detector_keras() trained briefly on detector_scenes, so its scores have a real peak.

    Random weights give near-flat scores whose arg-max flips on any rounding; a detector that
    finds the square is what a pretrained one is, and its quantized variants can be judged.
    """
    tf = _tf()
    model = detector_keras()
    images, scores, boxes = detector_scenes(DETECTOR_TRAIN_SAMPLES)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-2),
        loss=[tf.keras.losses.MeanSquaredError(), tf.keras.losses.BinaryCrossentropy(True)],
    )
    model.fit(images, [boxes, scores], epochs=epochs, batch_size=32, verbose=0)
    return model


def strip_signatures(data: bytes) -> bytes:
    """The same flatbuffer without SignatureDefs (as many public .tflite files ship)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    model.signatureDefs = []
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def fp16_tflite(model: Any) -> bytes:
    """Convert a Keras model with fp16 weights (target_spec.supported_types=[tf.float16])."""
    tf = _tf()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
    return bytes(converter.convert())


def fp32_tflite(model: Any) -> bytes:
    """Convert a Keras model to a plain fp32 .tflite."""
    tf = _tf()
    return bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())


def sparse_keras() -> Any:
    """A Dense classifier whose kernels are 80 % zeros, so the converter stores them sparse."""
    tf = _tf()
    tf.keras.utils.set_random_seed(SEED)
    inputs = tf.keras.Input(shape=(64,), batch_size=1, name="features")
    x = tf.keras.layers.Dense(128, activation="relu")(inputs)
    outputs = tf.keras.layers.Dense(10)(x)
    model = tf.keras.Model(inputs, outputs, name="sparse")
    rng = np.random.default_rng(SEED)
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Dense):
            kernel, bias = layer.get_weights()
            kernel = kernel * (rng.random(kernel.shape) >= 0.8)  # keep 20 %: sparse storage pays
            layer.set_weights([kernel.astype(np.float32), bias])
    return model


def sparse_tflite(model: Any) -> bytes:
    """Convert with EXPERIMENTAL_SPARSITY: sparse constants behind DENSIFY."""
    tf = _tf()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    return bytes(converter.convert())


def calib_features(n: int = CALIB_SAMPLES) -> np.ndarray:
    """Seeded uniform [0, 1) feature vectors for the sparse model."""
    return np.random.default_rng(SEED).random((n, 64), dtype=np.float32)


def write_pretrained_fixtures(out_dir: Path) -> dict[str, Path]:
    """Write every fixture into `out_dir`: the fp16 signature-less detector, a sparse model, the
    detector's fp32 file without signature, and calib.npz; return name → path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    detector = trained_detector()
    files = {
        "detector_fp16": strip_signatures(fp16_tflite(detector)),
        "detector_fp32_nosig": strip_signatures(fp32_tflite(detector)),
        "sparse": sparse_tflite(sparse_keras()),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = out / f"{name}.tflite"
        paths[name].write_bytes(data)
    paths["calib"] = out / "calib.npz"
    np.savez(paths["calib"], x=detector_scenes(CALIB_SAMPLES, seed=SEED + 1)[0])
    paths["sparse_calib"] = out / "sparse_calib.npz"
    np.savez(paths["sparse_calib"], x=calib_features())
    return paths

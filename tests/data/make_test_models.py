"""Regenerate the small .tflite fixtures in tests/data with the real TF Lite converter.

Run with the full venv (TensorFlow is needed here, never on a device):

    cd /work/main && .venv/bin/python tests/data/make_test_models.py

It rewrites every fixture, prints each file's size, sha256 and operator versions, and rewrites
tests/data/README.md from the same facts so the table never drifts from the files.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep the converter's C++ chatter out of output

import numpy as np
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema

DATA_DIR = Path(__file__).resolve().parent
SEED = 20240607  # any fixed value; fixed so reruns give the same weights and calibration data
INPUT_SHAPE = (8, 8, 1)  # smallest image-like input that still exercises CONV_2D
CALIBRATION_SAMPLES = 16  # enough for the converter to settle ranges on random data; more is slower
# Keras 3 needs the layer input shape; batch 1 matches how the agent invokes models.
BATCH_SHAPE = (1, *INPUT_SHAPE)

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def build_keras_model() -> tf.keras.Model:
    """Tiny conv → dense classifier with seeded random weights (8×8×1 → 10 logits)."""
    tf.keras.utils.set_random_seed(SEED)
    inputs = tf.keras.Input(shape=INPUT_SHAPE, batch_size=1, name="image")
    x = tf.keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = tf.keras.layers.Flatten(name="flatten")(x)
    # 144×16 = 2304 weights: above the converter's 1024-element floor for dynamic-range
    # quantization, so the dynamic model really carries the int8 FULLY_CONNECTED v12 we test.
    x = tf.keras.layers.Dense(16, activation="relu", name="hidden")(x)
    outputs = tf.keras.layers.Dense(10, name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="tiny")


def representative_data() -> Iterator[list[np.ndarray]]:
    """Seeded random calibration batches for full-integer quantization."""
    rng = np.random.default_rng(SEED)
    for _ in range(CALIBRATION_SAMPLES):
        yield [rng.uniform(0.0, 1.0, size=BATCH_SHAPE).astype(np.float32)]


def converter_for(model: tf.keras.Model) -> tf.lite.TFLiteConverter:
    """A converter for the Keras model (its fixed batch-1 input gives a static signature)."""
    return tf.lite.TFLiteConverter.from_keras_model(model)


def convert_fp32(model: tf.keras.Model) -> bytes:
    """Plain float32 conversion."""
    return bytes(converter_for(model).convert())


def convert_int8(model: tf.keras.Model, io_type: tf.DType = tf.int8) -> bytes:
    """Full-integer int8 with int8 (or uint8) input and output tensors."""
    conv = converter_for(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative_data
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = io_type
    conv.inference_output_type = io_type
    return bytes(conv.convert())


def convert_uint8_io(model: tf.keras.Model) -> bytes:
    """Full-integer int8 inside, uint8 input/output (the old EdgeTPU-style interface)."""
    return convert_int8(model, tf.uint8)


def convert_int16x8(model: tf.keras.Model) -> bytes:
    """16-bit activations / 8-bit weights with int16 input and output tensors."""
    conv = converter_for(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative_data
    conv.target_spec.supported_ops = [
        tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
    ]
    conv.inference_input_type = tf.int16
    conv.inference_output_type = tf.int16
    return bytes(conv.convert())


def convert_dynamic(model: tf.keras.Model) -> bytes:
    """Dynamic-range int8 (weights only); TF 2.21 emits FULLY_CONNECTED v12 for it."""
    conv = converter_for(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    return bytes(conv.convert())


def operator_versions(content: bytes) -> list[str]:
    """Sorted 'OP vN' strings read from the flatbuffer's operator_codes table."""
    fb = schema.Model.GetRootAs(content, 0)
    ops = []
    for i in range(fb.OperatorCodesLength()):
        code = fb.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        ops.append(f"{_OP_NAMES.get(builtin, str(builtin))} v{code.Version()}")
    return sorted(ops)


def sha256(content: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(content).hexdigest()


def main() -> int:
    """Write every fixture and the README table; print what was written."""
    model = build_keras_model()
    converted: dict[str, tuple[Callable[[tf.keras.Model], bytes], str]] = {
        "tiny_fp32.tflite": (convert_fp32, "float32 conv→dense→dense, float32 in/out"),
        "tiny_int8.tflite": (convert_int8, "full-integer int8, int8 in/out, random calibration"),
        "tiny_uint8.tflite": (convert_uint8_io, "full-integer int8 inside, uint8 in/out"),
        "tiny_int16x8.tflite": (convert_int16x8, "int16 activations × int8 weights, int16 in/out"),
        "tiny_dynamic_tf221.tflite": (
            convert_dynamic,
            "dynamic-range int8 from TF "
            f"{tf.__version__}; FULLY_CONNECTED v12 does NOT load on tflite-runtime 2.14",
        ),
    }
    rows: list[tuple[str, bytes, str]] = []
    for name, (convert, how) in converted.items():
        content = convert(model)
        ops = ", ".join(operator_versions(content))
        rows.append((name, content, f"{how}. Ops: {ops}"))

    fp32 = rows[0][1]
    rng = np.random.default_rng(SEED)
    # 4 KiB of noise: big enough that no flatbuffer header accidentally parses.
    garbage = rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    rows += [
        ("garbage.tflite", garbage, f"4096 random bytes (numpy default_rng({SEED}))"),
        ("empty.tflite", b"", "0 bytes"),
        ("truncated.tflite", fp32[: len(fp32) // 2], "first half of tiny_fp32.tflite"),
    ]

    for name, content, _ in rows:
        (DATA_DIR / name).write_bytes(content)
        print(f"{name:28s} {len(content):7d} B  {sha256(content)}")
    write_readme(rows)
    total = sum(len(c) for _, c, _ in rows)
    print(f"total {total} B")
    return 0


def write_readme(rows: list[tuple[str, bytes, str]]) -> None:
    """Rewrite tests/data/README.md with one row per fixture."""
    lines = [
        "# tests/data — TFLite fixtures",
        "",
        "Generated by `make_test_models.py` (run it with `.venv/bin/python`, which has TensorFlow "
        f"{tf.__version__}). Seeded (`SEED = {SEED}`), random weights, converted with the real "
        "TF Lite converter; regenerate and commit when the converter changes. The model is "
        "8×8×1 → Conv2D(4, 3×3, relu) → Flatten → Dense(16, relu) → Dense(10).",
        "",
        "Converter output can differ slightly between TensorFlow builds, so tests never pin "
        "these hashes; they are recorded so a reviewer can tell which files were committed.",
        "",
        "| file | bytes | how it was made | sha256 |",
        "|---|---:|---|---|",
    ]
    for name, content, how in rows:
        lines.append(f"| `{name}` | {len(content)} | {how} | `{sha256(content)}` |")
    lines.append("")
    (DATA_DIR / "README.md").write_text("\n".join(lines), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())

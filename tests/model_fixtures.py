"""Model shapes people deploy, built here with TensorFlow and cached: multi-output, PRELU, flat.

Every builder caches its file under the test cache keyed by this module's sha256, so a change to
an architecture never serves a stale model. Weights are seeded random (no downloads): the
detector and landmark shapes still give input-dependent outputs; `flat_softmax_keras` is the
random-weight classifier whose softmax is ~1/1000 everywhere (EfficientNetB0 with weights=None).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from converters._files import atomic_write_bytes
from converters.op_probe import conv2d_transpose_bias_model

# Input sizes are small to keep conversions a few seconds on a 2-core machine.
IMAGE_SHAPE = (16, 16, 3)
ANCHORS = 64  # an 8x8 feature map, one anchor per cell
LANDMARKS = 21 * 3  # MediaPipe hand landmarks: 21 points x (x, y, z)
CLASSES = 1000  # ImageNet-sized softmax, where random weights give a flat distribution
# A segmentation shape whose golden cannot hold 4 samples: 128x128x3 in, a 2-class mask out.
SEGMENTATION_SHAPE = (128, 128, 3)


def _key() -> str:
    """Short sha256 of this module: names cache entries by the code that built them."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def _cached(cache_dir: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Build `name` into the cache once (per module version)."""
    path = Path(cache_dir) / f"{Path(name).stem}_{_key()}{Path(name).suffix}"
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp{Path(name).suffix}")
        build(tmp)
        tmp.replace(path)
    return path


def calibration_images(count: int = 64, seed: int = 1) -> np.ndarray:
    """Uniform images in [0, 1) of IMAGE_SHAPE: calibration and validation inputs."""
    return np.random.default_rng(seed).random((count, *IMAGE_SHAPE), dtype=np.float32)


def _keras() -> Any:
    """Keras with TF's logging quiet and a fixed seed."""
    from converters._tf import tensorflow

    tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    return keras


def _two_head(path: Path) -> None:
    """A detector shape: backbone, then boxes (N, 64, 4) and sigmoid scores (N, 64, 1)."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    boxes = layers.Reshape((ANCHORS, 4), name="boxes")(layers.Conv2D(4, 1)(x))
    scores = layers.Conv2D(1, 1, activation="sigmoid")(x)
    scores = layers.Reshape((ANCHORS, 1), name="scores")(scores)
    keras.Model(inputs, [boxes, scores]).save(path)


def _landmarks(path: Path) -> None:
    """A hand-landmark shape: landmarks (N, 63), presence (N, 1), handedness, world landmarks."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = layers.Flatten()(layers.Conv2D(8, 3, strides=2, activation="relu")(x))
    outputs = [
        layers.Dense(LANDMARKS, name="landmarks")(x),
        layers.Dense(1, activation="sigmoid", name="presence")(x),
        layers.Dense(1, activation="sigmoid", name="handedness")(x),
        layers.Dense(LANDMARKS, name="world_landmarks")(x),
    ]
    keras.Model(inputs, outputs).save(path)


def _flat_softmax(path: Path) -> None:
    """A random-weight classifier: 1000-way softmax of tiny logits, ≈ 0.001 for every class."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = layers.GlobalAveragePooling2D()(layers.Conv2D(8, 3, activation="relu")(inputs))
    tiny = keras.initializers.RandomNormal(stddev=1e-4, seed=0)
    out = layers.Dense(CLASSES, activation="softmax", kernel_initializer=tiny)(x)
    keras.Model(inputs, out).save(path)


def _prelu(path: Path) -> None:
    """A small model with a PRELU op, saved as Keras."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input(IMAGE_SHAPE, name="image")
    x = layers.PReLU(shared_axes=[1, 2])(layers.Conv2D(4, 3)(inputs))
    out = layers.Dense(4)(layers.Flatten()(x))
    keras.Model(inputs, out).save(path)


def _segmentation(path: Path) -> None:
    """A tiny fully convolutional segmenter: per-pixel 2-class softmax at input resolution."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input(SEGMENTATION_SHAPE, name="image")
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    out = layers.Conv2D(2, 1, activation="softmax", name="mask")(x)
    keras.Model(inputs, out).save(path)


def segmentation_keras(cache_dir: Path) -> Path:
    """The segmentation shape (.keras): a few hundred bytes of weights, 128 KiB of output."""
    return _cached(cache_dir, "segmentation.keras", _segmentation)


def two_head_keras(cache_dir: Path) -> Path:
    """The two-output detector shape (.keras)."""
    return _cached(cache_dir, "two_head.keras", _two_head)


def landmarks_keras(cache_dir: Path) -> Path:
    """The four-output landmark shape (.keras)."""
    return _cached(cache_dir, "landmarks.keras", _landmarks)


def flat_softmax_keras(cache_dir: Path) -> Path:
    """The flat-output random-weight classifier (.keras)."""
    return _cached(cache_dir, "flat_softmax.keras", _flat_softmax)


def tflite_of(cache_dir: Path, keras_path: Path, recipe: str = "fp32") -> Path:
    """A cached conversion of one of these Keras models with `recipe` (calibrated on images)."""
    from converters.inputs import convert_model
    from converters.recipes import needs_calibration

    def build(out: Path) -> None:
        """Convert with the real converter."""
        calib = calibration_images() if needs_calibration(recipe) else None
        atomic_write_bytes(out, convert_model(keras_path, recipe, calib=calib))

    return _cached(cache_dir, f"{keras_path.stem}_{recipe}.tflite", build)


def strip_metadata(data: bytes, name: str) -> bytes:
    """The model without one metadata entry (e.g. min_runtime_version), re-serialized."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT.InitFromObj(s.Model.GetRootAsModel(data, 0))
    model.metadata = [m for m in model.metadata or [] if m.name.decode() != name] or None
    builder = flatbuffers.Builder(len(data) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def prelu_no_metadata_tflite(cache_dir: Path) -> Path:
    """A PRELU v1 .tflite with its min_runtime_version metadata removed."""
    keras_path = _cached(cache_dir, "prelu.keras", _prelu)
    source = tflite_of(cache_dir, keras_path, "fp32")

    def build(out: Path) -> None:
        """Strip the converter's min_runtime_version entry."""
        atomic_write_bytes(out, strip_metadata(source.read_bytes(), "min_runtime_version"))

    return _cached(cache_dir, "prelu_no_metadata.tflite", build)


def custom_op_tflite(directory: Path) -> Path:
    """MediaPipe's Convolution2DTransposeBias custom op in a one-op model (no TF needed)."""
    return atomic_write_bytes(
        Path(directory) / "conv2d_transpose_bias.tflite", conv2d_transpose_bias_model()
    )

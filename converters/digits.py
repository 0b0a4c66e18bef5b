"""A small CNN trained on sklearn's bundled 8×8 digits: the demo and test model (no downloads)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters import recipes as recipes_module
from converters._files import atomic_write_bytes, sha256_file
from converters._tf import quiet_stdout, tensorflow
from converters.recipes import RECIPES, convert_keras, needs_calibration

# Bump when the architecture or training loop changes so cached models are retrained.
DIGITS_MODEL_VERSION = 1
# 3e-3 reaches ≥0.96 validation accuracy in 15 epochs on 2 cores (1e-3 needed ~25 epochs).
LEARNING_RATE = 3e-3
BATCH_SIZE = 32
# 70 % train, 15 % validation, 15 % test: 1257 / 270 / 270 of the 1797 images.
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15


@dataclass(frozen=True)
class DigitsData:
    """The digits dataset as float32 NHWC images in [0, 1] with int64 labels, split three ways."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image (8, 8, 1)."""
        return tuple(self.x_train.shape[1:])


def load_digits_dataset(seed: int = 0) -> DigitsData:
    """Load sklearn's digits as (N, 8, 8, 1) float32 in [0, 1], stratified train/val/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., np.newaxis]
    y = bunch.target.astype(np.int64)
    held_out = VAL_FRACTION + TEST_FRACTION
    x_tr, x_rest, y_tr, y_rest = train_test_split(
        x, y, test_size=held_out, stratify=y, random_state=seed
    )
    x_va, x_te, y_va, y_te = train_test_split(
        x_rest, y_rest, test_size=TEST_FRACTION / held_out, stratify=y_rest, random_state=seed
    )
    return DigitsData(x_tr, y_tr, x_va, y_va, x_te, y_te)


def build_digits_cnn(input_shape: tuple[int, ...] = (8, 8, 1)) -> Any:
    """Build the (untrained) digits CNN: conv, depthwise conv, pointwise conv, pool, two dense."""
    tensorflow()
    import keras

    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.DepthwiseConv2D(3, padding="same", activation="relu"),
            layers.Conv2D(32, 1, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(10),
            layers.Softmax(),
        ],
        name="digits_cnn",
    )


def train_digits_cnn(out_path: Path, *, epochs: int = 15, seed: int = 0) -> Path:
    """Train the digits CNN (seeded, a few seconds on 2 cores) and save it as .keras at out_path."""
    out = Path(out_path)
    if out.suffix != ".keras":
        raise ValueError(f"Digits model path must end in .keras: {out}")
    if epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {epochs}")
    tensorflow()
    import keras

    data = load_digits_dataset(seed)
    keras.utils.set_random_seed(seed)
    model = build_digits_cnn(data.input_shape)
    model.compile(
        optimizer=keras.optimizers.Adam(LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    with quiet_stdout():
        model.fit(
            data.x_train,
            data.y_train,
            validation_data=(data.x_val, data.y_val),
            epochs=epochs,
            batch_size=BATCH_SIZE,
            verbose=0,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=".tmp-", suffix=".keras")
    os.close(fd)
    try:
        model.save(tmp_name)
        os.replace(tmp_name, out)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return out


def _cache_key(*parts: object) -> str:
    """Short sha256 of the JSON of `parts`: names a cache entry by what produced it."""
    blob = json.dumps([str(p) for p in parts], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def digits_keras(cache_dir: Path, *, epochs: int = 15, seed: int = 0) -> Path:
    """Return the cached trained digits .keras model, training it first if needed."""
    tf = tensorflow()
    import keras

    code = sha256_file(Path(__file__))  # retrain when this module (architecture, loop) changes
    key = _cache_key(DIGITS_MODEL_VERSION, code, epochs, seed, tf.__version__, keras.__version__)
    path = Path(cache_dir) / f"digits_cnn_{key}.keras"
    if not path.is_file():
        train_digits_cnn(path, epochs=epochs, seed=seed)
    return path


def digits_tflite(cache_dir: Path, recipe: str = "int8") -> Path:
    """Train (cached) and convert the digits CNN with `recipe`; cached by model bytes and recipe."""
    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    tf = tensorflow()
    keras_path = digits_keras(cache_dir)
    model_sha = sha256_file(keras_path)
    # The recipe code is part of the key so a change to it never serves a stale cached artifact.
    recipe_code = sha256_file(Path(recipes_module.__file__))
    key = _cache_key(model_sha, recipe, recipe_code, tf.__version__, "calib=train[:200]")
    out = Path(cache_dir) / f"digits_{recipe}_{key}.tflite"
    if out.is_file():
        return out
    calib = load_digits_dataset().x_train if needs_calibration(recipe) else None
    data = convert_keras(keras_path, recipe, calib=calib)
    return atomic_write_bytes(out, data)

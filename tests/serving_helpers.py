"""Serving helpers shared by the unit and integration tiers: the tiny models, a seeded dense
model with a dynamic batch dimension, a counting observer, a one-off resized run, loading."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.runtime import Interpreter, load_interpreter, run_once
from agent.serving import ServingModel
from tests.paths import TEST_DATA

FP32 = TEST_DATA / "tiny_fp32.tflite"
INT8 = TEST_DATA / "tiny_int8.tflite"


# Builds a float32 Dense(hidden, relu) → Dense(outputs) model with input (None, features): its
# axis 0 is free, so the service can batch it. Run in a subprocess so TF never loads here.
_BUILD_SCRIPT = textwrap.dedent(
    """
    import sys
    import tensorflow as tf
    out, seed, features, hidden, outputs = sys.argv[1], *map(int, sys.argv[2:6])
    tf.keras.utils.set_random_seed(seed)
    inp = tf.keras.Input(shape=(features,), name="features")
    x = tf.keras.layers.Dense(hidden, activation="relu")(inp)
    x = tf.keras.layers.Dense(outputs)(x)
    model = tf.keras.Model(inp, x)
    open(out, "wb").write(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    """
)


def batch_model(cache: Path, seed: int, features: int = 16, hidden: int = 32) -> Path:
    """A dynamic-batch fp32 model, built once with TF into `cache`; skips when neither exists.

    A model cached by a run in the full venv is reused by the slim venv (tflite-runtime 2.14
    loads it: only FULLY_CONNECTED v1 and friends), so batching is tested on both runtimes.
    """
    path = cache / f"serving_dense_s{seed}_f{features}_h{hidden}.tflite"
    if path.exists():
        return path
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is absent and no cached dynamic-batch model exists")
    tmp = path.with_suffix(".part")
    args = [str(tmp), str(seed), str(features), str(hidden), "4"]
    subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, *args], check=True, capture_output=True)
    tmp.replace(path)
    return path


class CountingObserver:
    """InferenceObserver that counts what it is told (thread-safe)."""

    def __init__(self) -> None:
        """Start with nothing observed."""
        self.lock = threading.Lock()
        self.requests = 0
        self.cache_hits = 0
        self.errors = 0
        self.batch_sizes: list[int] = []
        self.latencies: list[float] = []

    def observe_request(self, latency_ms: float, *, cache_hit: bool = False) -> None:
        """Count a served request."""
        with self.lock:
            self.requests += 1
            self.cache_hits += cache_hit
            self.latencies.append(latency_ms)

    def observe_invocation(self, batch_size: int) -> None:
        """Record an invoke's batch size."""
        with self.lock:
            self.batch_sizes.append(batch_size)

    def observe_error(self) -> None:
        """Count an error."""
        with self.lock:
            self.errors += 1


def run_once_resized(interpreter: Interpreter, array: np.ndarray) -> np.ndarray:
    """Run one array on a dynamic-batch reference interpreter, resized to its rows."""
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, list(array.shape))  # type: ignore[attr-defined]
    interpreter.allocate_tensors()
    return run_once(interpreter, [array])[0]


def sha256_of(path: Path) -> str:
    """The file's sha256, as the agent names models."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def loaded(path: Path) -> ServingModel:
    """A ServingModel serving `path` under its real sha256."""
    serving = ServingModel()
    serving.swap(load_interpreter(path, 1), sha256_of(path), 1.0)
    return serving

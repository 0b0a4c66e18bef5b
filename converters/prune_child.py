"""The pruning child: rebuilds the model in tf_keras, prunes it with TF-MOT, hands weights back."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from converters.errors import PruningError
from converters.prune import (
    BASE_LAYER_KWARGS,
    BATCH_SIZE,
    DEFAULT_EPOCHS,
    DEFAULT_SPARSITY,
    FINETUNE_LEARNING_RATE,
    MASK_UPDATES_PER_EPOCH,
    RAMP_FRACTION,
    ROUND_TRIP_ATOL,
    KeyFilter,
    check_sparsity,
    load_weights,
    save_weights,
    translate_config,
)


def _accepted_keys(tf_keras: Any) -> KeyFilter:
    """A KeyFilter from tf_keras's own constructors (layers, initializers, regularizers, …)."""
    namespaces = {
        "keras.layers": tf_keras.layers,
        "keras.initializers": tf_keras.initializers,
        "keras.regularizers": tf_keras.regularizers,
        "keras.constraints": tf_keras.constraints,
    }

    def accepted(module: str, class_name: str) -> frozenset[str] | None:
        """Parameters of tf_keras's class of that name (+ base Layer kwargs), None if unknown."""
        space = next((ns for prefix, ns in namespaces.items() if module.startswith(prefix)), None)
        cls = getattr(space, class_name, None) if space is not None else None
        if cls is None or class_name in ("Sequential", "Functional", "Model"):
            return None
        params = frozenset(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        return params | BASE_LAYER_KWARGS if space is tf_keras.layers else params

    return accepted


def _rebuild(tf_keras: Any, work: Path) -> Any:
    """The parent's model rebuilt in tf_keras from its translated config and weights."""
    config = json.loads((work / "architecture.json").read_text())
    translated = translate_config(config, _accepted_keys(tf_keras))
    kind = translated.get("class_name")
    if kind == "Sequential":
        model = tf_keras.Sequential.from_config(translated["config"])
    elif kind in ("Functional", "Model"):
        model = tf_keras.Model.from_config(translated["config"])
    else:
        raise PruningError(
            f"pruning supports Sequential and functional models, not {kind}: subclassed models "
            "cannot be rebuilt in tf_keras"
        )
    model.set_weights(load_weights(work / "weights.npz"))
    return model


def _is_probabilities(outputs: np.ndarray) -> bool:
    """Whether classifier outputs are probabilities (rows ≥ 0 summing to 1) rather than logits."""
    return bool(np.all(outputs >= 0) and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3))


def _kernel_sparsity(stripped: Any, pruned_layers: list[str]) -> tuple[float, dict[str, float]]:
    """Zero share of the pruned layers' kernels, overall and per layer."""
    per_layer: dict[str, float] = {}
    zeros = total = 0
    for layer in stripped.layers:
        if layer.name not in pruned_layers:
            continue
        kernels = [w.numpy() for w in layer.weights if "kernel" in w.name]
        z = sum(int(np.count_nonzero(k == 0)) for k in kernels)
        n = sum(int(k.size) for k in kernels)
        if n:
            per_layer[layer.name] = z / n
            zeros, total = zeros + z, total + n
    return (zeros / total if total else 0.0), per_layer


def _child(work: Path, sparsity: float, epochs: int) -> None:
    """Rebuild, prune with a PolynomialDecay schedule, fine-tune, strip, write weights back."""
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise PruningError("converters.prune_child must run with TF_USE_LEGACY_KERAS=1 (a child)")
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    model = _rebuild(tf_keras, work)
    with np.load(work / "probe.npz") as probe:
        probe_x, probe_y = probe["x"], probe["y"]
    rebuilt = np.asarray(model.predict(probe_x, verbose=0))
    rebuild_error = float(np.max(np.abs(rebuilt - probe_y)))
    if rebuild_error > ROUND_TRIP_ATOL:
        raise PruningError(
            f"the model rebuilt in tf_keras computes differently (max abs error "
            f"{rebuild_error:.3g} > {ROUND_TRIP_ATOL}): a layer option tf_keras lacks?"
        )
    if rebuilt.ndim != 2:
        raise PruningError(
            f"pruning fine-tunes classifiers with (N, classes) outputs; this one gives "
            f"{rebuilt.shape[1:]} per sample"
        )
    with np.load(work / "train.npz") as train:
        x, y = train["x"], train["y"]
    if int(y.max()) >= rebuilt.shape[1]:
        raise PruningError(f"--train label {int(y.max())} ≥ the model's {rebuilt.shape[1]} classes")
    from_logits = not _is_probabilities(rebuilt)
    steps_per_epoch = math.ceil(x.shape[0] / BATCH_SIZE)
    frequency = max(1, steps_per_epoch // MASK_UPDATES_PER_EPOCH)
    ramp = max(1, int(epochs * steps_per_epoch * RAMP_FRACTION) // frequency) * frequency
    sparsity_api = tfmot.sparsity.keras
    schedule = sparsity_api.PolynomialDecay(
        initial_sparsity=0.0,
        final_sparsity=sparsity,
        begin_step=0,
        end_step=ramp,
        frequency=frequency,
    )
    tf_keras.utils.set_random_seed(0)
    try:
        pruned = sparsity_api.prune_low_magnitude(model, pruning_schedule=schedule)
    except ValueError as exc:  # a layer TF-MOT does not know how to prune
        raise PruningError(f"TF-MOT cannot prune this model: {exc}") from exc
    # Layers TF-MOT wraps but does not prune (DepthwiseConv2D: no prunable weights) are left out.
    wrapped = [layer.layer.name for layer in pruned.layers if getattr(layer, "pruning_vars", None)]
    pruned.compile(
        optimizer=tf_keras.optimizers.Adam(FINETUNE_LEARNING_RATE),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=["accuracy"],
    )
    history = pruned.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        callbacks=[sparsity_api.UpdatePruningStep()],
        verbose=0,
    )
    stripped = sparsity_api.strip_pruning(pruned)
    kernel_sparsity, layer_sparsity = _kernel_sparsity(stripped, wrapped)
    save_weights(work / "pruned.npz", stripped.get_weights())
    np.savez(work / "pruned_probe.npz", y=np.asarray(stripped.predict(probe_x, verbose=0)))
    from importlib.metadata import version

    result = {
        "kernel_sparsity": kernel_sparsity,
        "layer_sparsity": layer_sparsity,
        "train_loss": float(history.history["loss"][-1]),
        "train_accuracy": float(history.history["accuracy"][-1]),
        "from_logits": from_logits,
        "rebuild_max_abs_error": rebuild_error,
        "tools": {
            "tensorflow": tf.__version__,
            "tf-keras": tf_keras.__version__,
            "tensorflow-model-optimization": version("tensorflow-model-optimization"),
        },
    }
    (work / "result.json").write_text(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Child entry point: `python -m converters.prune_child --work DIR --sparsity S --epochs N`."""
    parser = argparse.ArgumentParser(description="Prune a model handed over by prune_keras_model")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--sparsity", type=float, default=DEFAULT_SPARSITY)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    args = parser.parse_args(argv)
    if args.work is None:
        parser.error("--work is required")
    try:
        _child(args.work, check_sparsity(args.sparsity), args.epochs)
    except (PruningError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # anything tf_keras/TF-MOT raise: one line the parent can show
        print(f"error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

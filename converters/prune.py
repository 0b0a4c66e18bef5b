"""TF-MOT magnitude pruning of a Keras model, run in a child process with TF_USE_LEGACY_KERAS=1.

TF-MOT only works on tf_keras (Keras 2), selected for a whole process by TF_USE_LEGACY_KERAS=1 —
and importing tensorflow_model_optimization sets that variable itself. So this process never
imports either: it hands the model's architecture (Keras 3 JSON), weights, a probe batch and the
training data to `python -m converters.prune` and takes pruned weights back, which it loads
into its own Keras 3 model. See docs/converters.md ("Pruning").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.datasets import Samples, load_samples
from converters.errors import ModelInputError, PruningError

PRUNE_MODULES = ("tf_keras", "tensorflow_model_optimization")
TFMOT_REQUIREMENT = "tensorflow-model-optimization==0.8.1"
DEFAULT_SPARSITY = 0.5
# 4 epochs of fine-tuning bring the digits CNN at 50 % sparsity back to its fp32 accuracy
# (measured: bench/RESULTS.md); the sparsity ramp takes the first RAMP_FRACTION of them.
DEFAULT_EPOCHS = 4
RAMP_FRACTION = 0.75
# Lower than the digits CNN's training rate (3e-3): fine-tuning should move weights, not retrain.
FINETUNE_LEARNING_RATE = 1e-3
BATCH_SIZE = 32
# Masks are recomputed 4 times per epoch while the sparsity ramps up (TF-MOT's default is 100
# steps, more than a whole digits epoch of 40 steps).
MASK_UPDATES_PER_EPOCH = 4
# Outputs of the model rebuilt in the child (and of the pruned model back in the parent) must
# match the other side on this many samples within ROUND_TRIP_ATOL: proves nothing was lost in
# the Keras 3 ↔ tf_keras translation.
PROBE_SAMPLES = 32
ROUND_TRIP_ATOL = 1e-4
# Fine-tuning a MobileNet-sized model for a few epochs on 2 cores fits in an hour; a stuck child
# must not hang optimize() forever.
PRUNE_TIMEOUT_S = 3600
# Keyword arguments every tf_keras layer accepts besides its own (tf_keras base_layer.py).
BASE_LAYER_KWARGS = frozenset(
    {"name", "dtype", "trainable", "dynamic", "input_dim", "input_shape", "batch_input_shape"}
    | {"batch_size", "weights", "activity_regularizer", "autocast", "implementation"}
)
CHILD_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


@dataclass(frozen=True)
class PruneResult:
    """A pruned Keras 3 model file and what the child measured while pruning it."""

    model_path: Path
    target_sparsity: float
    kernel_sparsity: float
    layer_sparsity: dict[str, float]
    epochs: int
    train_loss: float
    train_accuracy: float
    from_logits: bool
    rebuild_max_abs_error: float
    return_max_abs_error: float
    seconds: float
    tools: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (the `pruning` section of the optimize report)."""
        return {**asdict(self), "model_path": str(self.model_path)}


def pruned_suffix(sparsity: float) -> str:
    """Variant-name suffix of a pruned model, e.g. '+pruned50' for 0.5."""
    return f"+pruned{round(sparsity * 100)}"


def _tensorflow_version() -> str | None:
    """The installed TensorFlow distribution's version, read from metadata (no import)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def prune_requirements() -> list[str]:
    """pip requirements for the prune extra, tf-keras matched to the installed TensorFlow.

    Installed with --no-deps: their other dependencies (numpy, scipy, six) come with the main
    install; TF-MOT's dm-tree and mock are only used by parts other than pruning.
    """
    tf_version = _tensorflow_version()
    minor = ".".join(tf_version.split(".")[:2]) if tf_version else None
    tf_keras = f"tf-keras=={minor}.*" if minor else "tf-keras"
    return [tf_keras, TFMOT_REQUIREMENT]


def prune_install_hint() -> str:
    """The command that installs pruning without replacing tensorflow-cpu or downgrading absl."""
    reqs = " ".join(f"'{r}'" for r in prune_requirements())
    return (
        f"pip install --no-deps {reqs} (or `make env`); --no-deps because tf-keras depends on "
        "`tensorflow` and TF-MOT pins absl-py~=1.2, which would replace tensorflow-cpu and "
        "downgrade absl (docs/converters.md)"
    )


def module_installed(name: str) -> bool:
    """Whether a top-level module can be imported, found without importing it."""
    return importlib.util.find_spec(name) is not None


def pruning_available() -> bool:
    """Whether tf_keras and TF-MOT are installed (importing TF-MOT would set the Keras switch)."""
    return all(module_installed(m) for m in PRUNE_MODULES)


def require_pruning() -> None:
    """Raise PruningError naming what to install when the prune extra is missing."""
    missing = [m for m in PRUNE_MODULES if not module_installed(m)]
    if missing:
        raise PruningError(
            f"--train (magnitude pruning) needs {' and '.join(missing)}, which are not "
            f"installed: {prune_install_hint()}"
        )


def check_sparsity(sparsity: float) -> float:
    """Validate a target sparsity: a fraction strictly between 0 and 1."""
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"prune sparsity must be between 0 and 1 (exclusive), got {sparsity}")
    return float(sparsity)


def load_training_data(data: Samples | Path | str) -> Samples:
    """--train samples: inputs with integer class labels (y), from a Samples or a file/dir."""
    try:
        samples = data if isinstance(data, Samples) else load_samples(Path(data))
    except ModelInputError as exc:
        raise ModelInputError(f"--train: {exc}") from exc
    where = f" in {data}" if not isinstance(data, Samples) else ""
    if samples.y is None:
        raise ModelInputError(
            f"--train data{where} has no labels: pruning fine-tunes the model, so it needs an "
            ".npz with inputs (x) and integer class labels (y), or a directory of them"
        )
    if not np.all(np.isfinite(samples.x)):
        raise ModelInputError(f"--train data{where} contains NaN or infinite inputs")
    if samples.y.min() < 0:
        raise ModelInputError(f"--train labels{where} must be class indices ≥ 0")
    return samples


# --------------------------------------------------------------------------- config translation


def _is_tensor_ref(obj: Any) -> bool:
    """Whether `obj` is a Keras 3 serialized symbolic tensor (a functional graph edge)."""
    return isinstance(obj, dict) and obj.get("class_name") == "__keras_tensor__"


def _node_refs(obj: Any) -> list[list[Any]]:
    """Keras 2 inbound-node entries [layer, node, tensor, {}] for every tensor in call args."""
    if _is_tensor_ref(obj):
        layer, node, index = obj["config"]["keras_history"]
        return [[layer, node, index, {}]]
    if isinstance(obj, list | tuple):
        return [ref for item in obj for ref in _node_refs(item)]
    return []


def _inbound_nodes(nodes: list[Any]) -> list[list[list[Any]]]:
    """Keras 3 inbound nodes ({args, kwargs}) → Keras 2's list of [layer, node, tensor, kwargs]."""
    out = []
    for node in nodes:
        if not isinstance(node, dict):  # already Keras 2 style
            out.append(node)
            continue
        refs = _node_refs(node.get("args", []))
        kwargs = node.get("kwargs", {}) or {}
        if _node_refs(list(kwargs.values())):
            raise PruningError("a layer called with tensors as keyword arguments is not supported")
        if refs and kwargs:
            refs[0][3] = dict(kwargs)
        out.append(refs)
    return out


def _layer_refs(refs: Any) -> list[Any]:
    """Model input/output layer references as a list of [layer, node, tensor] triples."""
    if isinstance(refs, list) and len(refs) == 3 and isinstance(refs[0], str):
        return [refs]
    return list(refs)


KeyFilter = Callable[[str, str], "frozenset[str] | None"]
"""(module, class_name) → the config keys tf_keras accepts for that class (None: keep all)."""


def translate_config(obj: Any, accepted: KeyFilter | None = None) -> Any:
    """Turn a Keras 3 serialized model/layer config into one tf_keras can deserialize.

    Dtype policies become their name, InputLayer's batch_shape becomes batch_input_shape,
    functional inbound nodes take Keras 2's form, and keys tf_keras does not accept are dropped
    (the round-trip check on a probe batch then proves the rebuilt model computes the same).
    """
    if isinstance(obj, list):
        return [translate_config(item, accepted) for item in obj]
    if not isinstance(obj, dict):
        return obj
    if "class_name" in obj and "config" in obj:
        class_name = str(obj["class_name"])
        config = obj["config"]
        if class_name.endswith("DTypePolicy") and isinstance(config, dict):
            return config.get("name", "float32")
        out: dict[str, Any] = {"class_name": class_name}
        if isinstance(config, dict):
            cfg = {k: translate_config(v, accepted) for k, v in config.items()}
            if class_name == "InputLayer" and "batch_shape" in cfg:
                cfg["batch_input_shape"] = cfg.pop("batch_shape")
            for key in ("input_layers", "output_layers"):
                if key in cfg:
                    cfg[key] = _layer_refs(cfg[key])
            keep = accepted(str(obj.get("module") or ""), class_name) if accepted else None
            if keep is not None:
                cfg = {k: v for k, v in cfg.items() if k in keep}
            out["config"] = cfg
        else:
            out["config"] = config
        if "name" in obj:
            out["name"] = obj["name"]
        if "inbound_nodes" in obj:
            out["inbound_nodes"] = _inbound_nodes(obj["inbound_nodes"])
        return out
    return {k: translate_config(v, accepted) for k, v in obj.items()}


# --------------------------------------------------------------------------------- parent side


def save_weights(path: Path, weights: list[np.ndarray]) -> None:
    """Save a weight list as .npz, keys numbered so the order survives."""
    arrays = {f"w{i:05d}": np.asarray(w) for i, w in enumerate(weights)}
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle


def load_weights(path: Path) -> list[np.ndarray]:
    """Load a weight list written by _save_weights, in order."""
    with np.load(path, allow_pickle=False) as npz:
        return [npz[k] for k in sorted(npz.keys())]


def _run_child(work: Path, sparsity: float, epochs: int) -> None:
    """Run `python -m converters.prune_child` on `work`, TF_USE_LEGACY_KERAS=1 in its env only."""
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, **CHILD_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "converters.prune_child", "--work", str(work)]
    cmd += ["--sparsity", repr(sparsity), "--epochs", str(epochs)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=PRUNE_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise PruningError(f"pruning did not finish within {PRUNE_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errors = [ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")]
        detail = errors[-1] if errors else " | ".join(lines[-5:]) or f"exit {proc.returncode}"
        raise PruningError(f"pruning failed: {detail}")


def _hand_over(
    model: Any, samples: Samples, work: Path, sparsity: float, epochs: int
) -> tuple[dict[str, Any], float]:
    """Write the model and data to `work`, run the child, load the pruned weights into `model`.

    Returns the child's result.json and the max abs error between the child's pruned outputs
    and this process's on the probe batch.
    """
    assert samples.y is not None  # prune() refused unlabelled samples before handing over
    probe = samples.x[:PROBE_SAMPLES]
    (work / "architecture.json").write_text(model.to_json())
    save_weights(work / "weights.npz", model.get_weights())
    np.savez(work / "probe.npz", x=probe, y=np.asarray(model.predict(probe, verbose=0)))
    np.savez(work / "train.npz", x=samples.x, y=samples.y)
    _run_child(work, sparsity, epochs)
    report = json.loads((work / "result.json").read_text())
    model.set_weights(load_weights(work / "pruned.npz"))
    with np.load(work / "pruned_probe.npz") as child:
        child_out = child["y"]
    back = float(np.max(np.abs(np.asarray(model.predict(probe, verbose=0)) - child_out)))
    if back > ROUND_TRIP_ATOL:
        raise PruningError(
            f"pruned weights computed differently after loading them back into Keras 3 "
            f"(max abs error {back:.3g} > {ROUND_TRIP_ATOL})"
        )
    return report, back


def prune_keras_model(
    model_path: Path,
    train: Samples | Path | str,
    out_path: Path,
    *,
    sparsity: float = DEFAULT_SPARSITY,
    epochs: int = DEFAULT_EPOCHS,
) -> PruneResult:
    """Prune a .keras/.h5 classifier to `sparsity` with TF-MOT in a child process; save .keras.

    The child fine-tunes on `train` (inputs and integer labels) for `epochs`, strips the
    pruning wrappers and returns the weights; they are loaded into this process's Keras 3 model
    and saved at `out_path` (which must end in .keras), ready for the usual recipes.
    """
    from converters._files import atomic_write_bytes
    from converters.recipes import load_keras_model

    check_sparsity(sparsity)
    if epochs < 1:
        raise ValueError(f"prune epochs must be ≥ 1, got {epochs}")
    out = Path(out_path)
    if out.suffix != ".keras":
        raise ValueError(f"pruned model path must end in .keras: {out}")
    require_pruning()
    samples = load_training_data(train)
    model = load_keras_model(Path(model_path))
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1:
        raise PruningError(f"pruning supports single-input models; {model_path} has {len(inputs)}")
    expected = tuple(inputs[0].shape[1:])
    if tuple(samples.x.shape[1:]) != expected:
        raise ModelInputError(
            f"--train inputs have shape {tuple(samples.x.shape[1:])} per sample; "
            f"{model_path} expects {expected}"
        )
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}-work-") as tmp:
        work = Path(tmp)
        report, back = _hand_over(model, samples, work, sparsity, epochs)
        model.save(work / out.name)
        atomic_write_bytes(out, (work / out.name).read_bytes())
    return PruneResult(
        model_path=out,
        target_sparsity=sparsity,
        kernel_sparsity=float(report["kernel_sparsity"]),
        layer_sparsity={k: float(v) for k, v in report["layer_sparsity"].items()},
        epochs=epochs,
        train_loss=float(report["train_loss"]),
        train_accuracy=float(report["train_accuracy"]),
        from_logits=bool(report["from_logits"]),
        rebuild_max_abs_error=float(report["rebuild_max_abs_error"]),
        return_max_abs_error=back,
        seconds=time.perf_counter() - started,
        tools=dict(report["tools"]),
    )


# ---------------------------------------------------------------------------------- child side


def main(argv: list[str] | None = None) -> int:
    """`python -m converters.prune --requirements`: the prune extra's pip lines (`make env`)."""
    parser = argparse.ArgumentParser(description="The prune extra's requirements")
    parser.add_argument(
        "--requirements",
        action="store_true",
        help="print the prune extra's pip requirements (one a line, to install with --no-deps)",
    )
    args = parser.parse_args(argv)
    if not args.requirements:
        parser.error("nothing to do: pass --requirements")
    print("\n".join(prune_requirements()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Golden files: known inputs and the outputs a model must give, for the on-device self-test.

Format v2 (written by converters/golden.py) holds every input and every output:
`inputs`/`outputs`/`atol`/`input_quantization`/`output_quantization` are input 0 and output 0
(so a v1 reader still checks a single-IO model), `inputs_K`, `input_quantization_K`,
`outputs_K`, `output_quantization_K`, `atol_K` the others; `golden_format` = 2, `n_inputs`,
`n_outputs`, `output_stride` (per output: every stride-th element of each sample is stored,
flattened, when the output is too large to keep whole) and `input_names`/`output_names`.
v1 files (no `golden_format`) hold one input and one output. Arrays are one row per sample,
in the model's own dtypes (already quantized).
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GOLDEN_FORMAT = 2
# Relative tolerance when comparing the golden's recorded quantization with the model's:
# both are float32 in the flatbuffer, so anything beyond rounding means another model.
_QUANT_RTOL = 1e-6


class GoldenError(Exception):
    """The golden file cannot be used with this model; the message says why."""


@dataclass(frozen=True)
class Golden:
    """Every input and expected output of a golden file, with per-output tolerance and stride."""

    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
    atol: list[float]
    stride: list[int]
    output_names: list[str]
    version: int

    @property
    def samples(self) -> int:
        """Number of golden samples."""
        return int(self.inputs[0].shape[0])

    def expected(self, sample: int, output: int) -> np.ndarray:
        """The stored expectation of one output on one sample (flattened when strided)."""
        return self.outputs[output][sample]

    def comparable(self, got: np.ndarray, output: int) -> np.ndarray:
        """The part of one sample's actual output that the golden stores (same layout)."""
        stride = self.stride[output]
        return got if stride == 1 else got.reshape(-1)[::stride]

    def label(self, output: int) -> str:
        """`output 1 'scores'` for messages."""
        name = self.output_names[output] if output < len(self.output_names) else ""
        return f"output {output} '{name}'" if name else f"output {output}"


def key(kind: str, index: int) -> str:
    """Archive key of input/output `index`: index 0 keeps the v1 name ('inputs', 'atol')."""
    return kind if index == 0 else f"{kind}_{index}"


def describe(array_or_detail: Any) -> str:
    """`dtype shape` of an array or of an interpreter tensor detail, for messages."""
    if isinstance(array_or_detail, dict):
        shape = tuple(int(d) for d in array_or_detail["shape"])
        return f"{np.dtype(array_or_detail['dtype']).name} {shape}"
    return f"{array_or_detail.dtype.name} {tuple(array_or_detail.shape)}"


def _read(path: Path) -> dict[str, np.ndarray]:
    """Every array of the .npz; never unpickles (a device must not run pickled code)."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not hasattr(loaded, "files"):
            raise GoldenError("golden file holds a single array, not an .npz archive")
        with loaded as npz:
            missing = [k for k in ("inputs", "outputs", "atol") if k not in npz.files]
            if missing:
                raise GoldenError(f"golden file lacks {', '.join(missing)}")
            return {k: npz[k] for k in npz.files}
    except GoldenError:
        raise
    except ValueError as exc:  # object arrays need pickle, which a device never unpickles
        raise GoldenError(f"golden file refused: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise GoldenError(f"golden file is not a readable .npz: {exc}") from None


def _count(data: dict[str, np.ndarray], name: str) -> int:
    """A small positive integer field of a v2 file."""
    try:
        value = int(data[name])
    except (KeyError, TypeError, ValueError):
        raise GoldenError(f"golden v2 field {name} missing or not an integer") from None
    if not 1 <= value <= 1024:
        raise GoldenError(f"golden {name} must be 1..1024, got {value}")
    return value


def _atol(value: np.ndarray, where: str) -> float:
    """A finite, non-negative tolerance."""
    try:
        atol = float(value)
    except (TypeError, ValueError):
        raise GoldenError(f"golden {where} is not a number: {value!r}") from None
    if not math.isfinite(atol) or atol < 0:
        raise GoldenError(f"golden {where} must be finite and >= 0, got {atol}")
    return atol


def parse_golden(path: Path) -> Golden:
    """Read a v1 or v2 golden file into a Golden, checking its internal consistency."""
    return _from_data(_read(path))


def _from_data(data: dict[str, np.ndarray]) -> Golden:
    """A Golden from the archive's arrays (v1 or v2)."""
    version = int(data["golden_format"]) if "golden_format" in data else 1
    if version not in (1, GOLDEN_FORMAT):
        raise GoldenError(f"golden format {version} is newer than this agent reads (<= 2)")
    n_in = _count(data, "n_inputs") if version > 1 else 1
    n_out = _count(data, "n_outputs") if version > 1 else 1
    try:
        inputs = [data[key("inputs", i)] for i in range(n_in)]
        outputs = [data[key("outputs", k)] for k in range(n_out)]
        atols = [_atol(data[key("atol", k)], key("atol", k)) for k in range(n_out)]
    except KeyError as exc:
        raise GoldenError(f"golden file lacks {exc.args[0]}") from None
    stride = [1] * n_out
    if "output_stride" in data:
        stride = [int(s) for s in np.asarray(data["output_stride"]).reshape(-1)]
        if len(stride) != n_out or any(s < 1 for s in stride):
            raise GoldenError(f"golden output_stride {stride} does not fit {n_out} outputs")
    names = [str(n) for n in data["output_names"]] if "output_names" in data else []
    rows = {a.shape[0] if a.ndim else -1 for a in [*inputs, *outputs]}
    if len(rows) != 1 or rows.pop() <= 0:
        shapes = ", ".join(describe(a) for a in [*inputs, *outputs])
        raise GoldenError(
            f"golden arrays are {shapes}: expected one row per sample in all, at least one"
        )
    return Golden(inputs, outputs, atols, stride, names, version)


def load_golden(path: Path, interpreter: Any) -> Golden:
    """A golden file, checked against the model's inputs and outputs: count, dtype, shape, scale."""
    data = _read(path)
    golden = _from_data(data)
    data_quant = _quantizations(data)
    in_details = interpreter.get_input_details()
    out_details = interpreter.get_output_details()
    if len(golden.inputs) != len(in_details) or len(golden.outputs) != len(out_details):
        raise GoldenError(
            f"golden file (format v{golden.version}) carries {len(golden.inputs)} inputs and "
            f"{len(golden.outputs)} outputs; the model has {len(in_details)} inputs and "
            f"{len(out_details)} outputs"
        )
    pairs = [
        ("input", i, a, d) for i, (a, d) in enumerate(zip(golden.inputs, in_details, strict=True))
    ]
    pairs += [
        ("output", k, a, d)
        for k, (a, d) in enumerate(zip(golden.outputs, out_details, strict=True))
    ]
    for kind, index, array, detail in pairs:
        shape = tuple(int(d) for d in detail["shape"])
        stride = golden.stride[index] if kind == "output" else 1
        want = shape[1:] if stride == 1 else (len(range(0, int(np.prod(shape[1:])), stride)),)
        if array.dtype != np.dtype(detail["dtype"]) or tuple(array.shape[1:]) != want:
            several = len(in_details if kind == "input" else out_details) > 1
            ours = f"golden {kind} {index} is" if several else f"golden {kind}s are"
            theirs = f"{kind} {index}" if several else kind
            raise GoldenError(
                f"{ours} {describe(array)} (one row per sample) but the model's {theirs} is "
                f"{describe(detail)}: the golden was made for another model"
            )
        recorded = data_quant.get((kind, index))
        actual = np.asarray(detail.get("quantization", (0.0, 0)), dtype=np.float64)
        if (
            recorded is not None
            and recorded.shape == actual.shape
            and not np.allclose(recorded.astype(np.float64), actual, rtol=_QUANT_RTOL, atol=0.0)
        ):
            raise GoldenError(
                f"golden {kind} {index} values were quantized with (scale, zero point) "
                f"{tuple(recorded.tolist())} but the model uses {tuple(actual.tolist())}"
            )
    return golden


def _quantizations(data: dict[str, np.ndarray]) -> dict[tuple[str, int], np.ndarray]:
    """Recorded (scale, zero point) per (kind, index), where the file has them."""
    found: dict[tuple[str, int], np.ndarray] = {}
    for name, array in data.items():
        for kind in ("input", "output"):
            prefix = f"{kind}_quantization"
            if name == prefix:
                found[(kind, 0)] = array
            elif name.startswith(prefix + "_") and name[len(prefix) + 1 :].isdigit():
                found[(kind, int(name[len(prefix) + 1 :]))] = array
    return found

"""Write and verify golden files (format v2, agent/golden.py): every input and every output.

Size rule (docs/converters.md): a golden file may take at most max(256 KiB, 25 % of the
artifact). It is written compressed with up to GOLDEN_SAMPLES samples; when that is too big the
sample count is halved down to one; when one sample is still too big, outputs larger than
STRIDE_MIN_ELEMENTS keep every 2nd, 4th, ... element (the agent compares the same elements);
when even the inputs of one sample do not fit, no golden is written and the caller says so.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters._files import atomic_write_bytes
from converters.errors import GoldenMismatchError
from converters.interpreter import HostModel, load_host_model

# The format agent/golden.py reads (converters may not import the agent: a device carries no
# converters, and the converters stay a pure pipeline); tests/unit/agent/test_golden_v2.py reads
# what this module writes with the agent's reader.
GOLDEN_FORMAT = 2
# A handful of golden samples keeps the file small while covering several classes.
GOLDEN_SAMPLES = 4
# Float outputs may differ across runtimes (XNNPACK vs reference kernels, fused ops): allow a
# relative error of 1e-3 of the output range; integer outputs may differ by one quantization step.
FLOAT_RELATIVE_TOLERANCE = 1e-3
INTEGER_TOLERANCE_STEPS = 1
# The cap: 256 KiB is 4 transfer chunks of 64 KiB, negligible next to any model; 25 % keeps a
# big model's golden proportionate (a 4.2 MB golden for a 0.25 MB model was 17x the model).
GOLDEN_MIN_CAP_BYTES = 256 * 1024
GOLDEN_MODEL_SHARE = 0.25
# Outputs up to this many elements per sample (scores, flags, class vectors) are always kept
# whole; only bigger ones (masks, heatmaps, dense boxes) are subsampled when one sample is too big.
STRIDE_MIN_ELEMENTS = 1024
# Striding stops here: beyond it the check would hold too few elements to mean much.
MAX_STRIDE = 4096


@dataclass(frozen=True)
class GoldenWrite:
    """What write_golden produced: the file (or None) and a note when it had to shrink it."""

    path: Path | None
    samples: int
    stride: tuple[int, ...]
    size_bytes: int
    note: str = ""


def key(kind: str, index: int) -> str:
    """Archive key of input/output `index`: index 0 keeps the v1 name ('inputs', 'atol')."""
    return kind if index == 0 else f"{kind}_{index}"


@dataclass(frozen=True)
class _Stored:
    """What verify_golden needs from a golden file (v1 or v2)."""

    inputs: list[np.ndarray]
    outputs: list[np.ndarray]
    atol: list[float]
    stride: list[int]


def _read(path: Path) -> _Stored:
    """Inputs, outputs, tolerances and strides of a v1 or v2 golden file (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
        v2 = "golden_format" in data
        n_in = int(data["n_inputs"]) if v2 else 1
        n_out = int(data["n_outputs"]) if v2 else 1
        stride = [int(s) for s in np.asarray(data.get("output_stride", [1] * n_out)).reshape(-1)]
        return _Stored(
            [data[key("inputs", i)] for i in range(n_in)],
            [data[key("outputs", k)] for k in range(n_out)],
            [float(data[key("atol", k)]) for k in range(n_out)],
            stride,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GoldenMismatchError(f"{path}: not a usable golden file: {exc}") from None


def golden_cap(model_bytes: int) -> int:
    """The largest golden file allowed for an artifact of `model_bytes`."""
    return max(GOLDEN_MIN_CAP_BYTES, int(GOLDEN_MODEL_SHARE * model_bytes))


def _tolerance(raw: np.ndarray) -> float:
    """Per-output atol: 1e-3 of the float range (at least 1e-3), or one integer step."""
    if raw.dtype.kind == "f":
        span = float(np.max(np.abs(raw))) if raw.size else 0.0
        return FLOAT_RELATIVE_TOLERANCE * max(span, 1.0)
    return float(INTEGER_TOLERANCE_STEPS)


def _encode(
    host: HostModel, ins: list[np.ndarray], outs: list[np.ndarray], n: int, stride: list[int]
) -> bytes:
    """The compressed .npz bytes of the first `n` samples with the given output strides."""
    arrays: dict[str, np.ndarray] = {
        "golden_format": np.array(GOLDEN_FORMAT),
        "n_inputs": np.array(len(ins)),
        "n_outputs": np.array(len(outs)),
        "output_stride": np.array(stride, dtype=np.int64),
        "input_names": np.array([str(d["name"]) for d in host.input_details]),
        "output_names": np.array(host.output_names),
    }
    for i, (array, detail) in enumerate(zip(ins, host.input_details, strict=True)):
        arrays[key("inputs", i)] = array[:n]
        arrays[key("input_quantization", i)] = np.array(detail["quantization"], np.float64)
    for k, (array, detail) in enumerate(zip(outs, host.output_details, strict=True)):
        kept = array[:n] if stride[k] == 1 else array[:n].reshape(n, -1)[:, :: stride[k]]
        arrays[key("outputs", k)] = kept
        arrays[key("output_quantization", k)] = np.array(detail["quantization"], np.float64)
        arrays[key("atol", k)] = np.array(_tolerance(array))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _samples(host: HostModel, xs: list[np.ndarray], count: int) -> tuple[list, list]:
    """Raw (model-dtype) inputs and outputs of the first `count` samples, one invoke each."""
    per_sample = [host.quantize_inputs([x[i : i + 1] for x in xs]) for i in range(count)]
    ins = [np.concatenate([s[j] for s in per_sample]) for j in range(len(xs))]
    results = [host.invoke_raw(s) for s in per_sample]
    outs = [np.concatenate([r[k] for r in results]) for k in range(len(results[0]))]
    return ins, outs


def write_golden(
    model: Path | bytes,
    x: np.ndarray | list[np.ndarray],
    out_path: Path,
    *,
    max_bytes: int | None = None,
) -> Path | None:
    """build_golden's file, or None when not even one sample fits the cap."""
    return build_golden(model, x, out_path, max_bytes=max_bytes).path


def build_golden(
    model: Path | bytes,
    x: np.ndarray | list[np.ndarray],
    out_path: Path,
    *,
    max_bytes: int | None = None,
) -> GoldenWrite:
    """Save a few inputs, as the device feeds them, and every output this model gives.

    For Vela-compiled artifacts pass the int8 model before compilation: the host cannot run the
    ethos-u op, and the NPU is designed to match TF Lite's int8 reference kernels. `max_bytes`
    defaults to the cap for `model` itself (golden_cap); pass the shipped artifact's cap.
    """
    data = bytes(model) if isinstance(model, bytes | bytearray) else Path(model).read_bytes()
    host = load_host_model(data, num_threads=1)
    xs = [x] if isinstance(x, np.ndarray) else list(x)
    cap = max_bytes if max_bytes is not None else golden_cap(len(data))
    count = min(GOLDEN_SAMPLES, int(xs[0].shape[0]))
    ins, outs = _samples(host, xs, count)
    stride = [1] * len(outs)
    n = count
    blob = _encode(host, ins, outs, n, stride)
    while len(blob) > cap and n > 1:
        n = max(1, n // 2)
        blob = _encode(host, ins, outs, n, stride)
    step = 2
    while len(blob) > cap and step <= MAX_STRIDE:
        stride = [step if a[0].size > STRIDE_MIN_ELEMENTS else 1 for a in outs]
        if stride == [1] * len(outs):
            break
        blob = _encode(host, ins, outs, n, stride)
        step *= 2
    out = Path(out_path)
    if len(blob) > cap:
        out.unlink(missing_ok=True)
        return GoldenWrite(
            None, 0, tuple(stride), 0,
            f"no golden: one sample needs {len(blob) / 1024:.0f} KiB, over the "
            f"{cap / 1024:.0f} KiB cap; the device self-test runs random inputs only",
        )  # fmt: skip
    note = ""
    if n < count or any(s > 1 for s in stride):
        kept = ", ".join(f"output {k} every {s}th element" for k, s in enumerate(stride) if s > 1)
        note = f"golden shrunk to fit {cap / 1024:.0f} KiB: {n} of {count} samples" + (
            f", {kept}" if kept else ""
        )
    atomic_write_bytes(out, blob)
    return GoldenWrite(out, n, tuple(stride), len(blob), note)


def verify_golden(model: Path | bytes, golden_path: Path) -> float:
    """Run a golden file's inputs through `model`; the worst max abs error over all outputs.

    Raises GoldenMismatchError naming the sample and output when one is beyond its atol.
    """
    host = load_host_model(model, num_threads=1)
    golden = _read(Path(golden_path))
    names = host.output_names
    worst = 0.0
    for i in range(golden.inputs[0].shape[0]):
        got = host.invoke_raw([array[i : i + 1] for array in golden.inputs])
        if len(got) != len(golden.outputs):
            raise GoldenMismatchError(
                f"{golden_path}: {len(golden.outputs)} outputs for a model with {len(got)}"
            )
        for k, out in enumerate(got):
            flat = out[0] if golden.stride[k] == 1 else out[0].reshape(-1)[:: golden.stride[k]]
            error = float(np.max(np.abs(flat.astype(np.float64) - golden.outputs[k][i])))
            if error > golden.atol[k]:
                raise GoldenMismatchError(
                    f"Golden check failed for {golden_path}: sample {i}, output {k} "
                    f"'{names[k]}': {error} > atol {golden.atol[k]}"
                )
            worst = max(worst, error)
    return worst

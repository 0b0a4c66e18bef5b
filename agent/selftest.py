"""Child-process self-test of a staged model: a crashing model cannot take the agent down.

Run as `python -m agent.selftest MODEL [--threads N] [--golden GOLDEN.npz]`; prints one JSON
object on stdout. With a golden file (written by converters/evaluate.py write_golden: keys
`inputs`, `outputs`, `atol`, optionally `input_quantization`/`output_quantization`) every golden
input is run and its outputs must be finite and within `atol` of the expected ones. Without
one, seeded random inputs are run and only finiteness is checked.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Invocations timed in the self-test: enough for a stable median, cheap on a slow device.
SELFTEST_RUNS = 5
# Relative tolerance when comparing the golden's recorded quantization with the model's:
# both are float32 in the flatbuffer, so anything beyond rounding means another model.
_QUANT_RTOL = 1e-6


@dataclass(frozen=True)
class SelfTestResult:
    """Outcome of a self-test: ok, or the reason it failed, with what was measured."""

    ok: bool
    reason: str
    latency_ms: float = 0.0
    peak_rss_mb: float = 0.0
    # What was checked (golden samples and error, or random inputs only): for logs and events.
    detail: str = ""


class GoldenError(Exception):
    """The golden file cannot be used with this model; the message says why."""


def _describe(array_or_detail: Any) -> str:
    """`dtype shape` of an array or of an interpreter tensor detail, for messages."""
    if isinstance(array_or_detail, dict):
        shape = tuple(int(d) for d in array_or_detail["shape"])
        return f"{np.dtype(array_or_detail['dtype']).name} {shape}"
    return f"{array_or_detail.dtype.name} {tuple(array_or_detail.shape)}"


def load_golden(path: Path, interpreter: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """(inputs, expected outputs, atol) from a golden .npz, checked against the model's tensors."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if not hasattr(loaded, "files"):
            raise GoldenError("golden file holds a single array, not an .npz archive")
        with loaded as npz:
            missing = [k for k in ("inputs", "outputs", "atol") if k not in npz.files]
            if missing:
                raise GoldenError(f"golden file lacks {', '.join(missing)}")
            data = {k: npz[k] for k in npz.files}
    except GoldenError:
        raise
    except ValueError as exc:  # object arrays need pickle, which a device never unpickles
        raise GoldenError(f"golden file refused: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise GoldenError(f"golden file is not a readable .npz: {exc}") from None
    inputs, expected = data["inputs"], data["outputs"]
    try:
        atol = float(data["atol"])
    except (TypeError, ValueError):
        raise GoldenError(f"golden atol is not a number: {data['atol']!r}") from None
    if not math.isfinite(atol) or atol < 0:
        raise GoldenError(f"golden atol must be finite and >= 0, got {atol}")
    in_details = interpreter.get_input_details()
    out_details = interpreter.get_output_details()
    if len(in_details) != 1 or len(out_details) != 1:
        raise GoldenError(
            "golden files carry one input and one output; the model has "
            f"{len(in_details)} inputs and {len(out_details)} outputs"
        )
    if inputs.ndim == 0 or inputs.shape[0] == 0 or inputs.shape[0] != expected.shape[0]:
        raise GoldenError(
            f"golden has {_describe(inputs)} inputs for {_describe(expected)} outputs: "
            "expected one row per sample in both"
        )
    for kind, array, detail in (
        ("inputs", inputs, in_details[0]),
        ("outputs", expected, out_details[0]),
    ):
        shape = tuple(int(d) for d in detail["shape"])
        if array.dtype != np.dtype(detail["dtype"]) or tuple(array.shape[1:]) != shape[1:]:
            raise GoldenError(
                f"golden {kind} are {_describe(array)} (one row per sample) but the model's "
                f"{kind[:-1]} is {_describe(detail)}: the golden was made for another model"
            )
        recorded = data.get(f"{kind[:-1]}_quantization")
        actual = np.asarray(detail.get("quantization", (0.0, 0)), dtype=np.float64)
        if (
            recorded is not None
            and recorded.shape == actual.shape
            and not np.allclose(recorded.astype(np.float64), actual, rtol=_QUANT_RTOL, atol=0.0)
        ):
            raise GoldenError(
                f"golden {kind} were quantized with (scale, zero point) "
                f"{tuple(recorded.tolist())} but the model uses {tuple(actual.tolist())}"
            )
    return inputs, expected, atol


def _check_golden(interpreter: Any, golden: Path) -> tuple[str | None, list[np.ndarray], str]:
    """Run every golden sample; (failure or None, inputs to time with, what was checked)."""
    from agent.runtime import run_once

    try:
        inputs, expected, atol = load_golden(golden, interpreter)
    except GoldenError as exc:
        return str(exc), [], ""
    worst = 0.0
    for i in range(inputs.shape[0]):
        got = run_once(interpreter, [inputs[i : i + 1]])[0]
        want = expected[i : i + 1]
        if got.shape != want.shape:
            return f"golden sample {i}: output {_describe(got)}, expected {_describe(want)}", [], ""
        if got.dtype.kind == "f" and not bool(np.all(np.isfinite(got))):
            return f"output 0 is not finite (NaN or Inf) on golden sample {i}", [], ""
        error = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
        if not error <= atol:
            return f"golden sample {i}: max abs error {error:.6g} > atol {atol:.6g}", [], ""
        worst = max(worst, error)
    detail = f"golden: {inputs.shape[0]} samples, max abs error {worst:.3g} <= atol {atol:.3g}"
    return None, [inputs[0:1]], detail


def _child(model: Path, threads: int | None, golden: Path | None = None) -> dict[str, object]:
    """Load, allocate and run the model on golden (or seeded random) inputs; report the cost."""
    from agent.memory import peak_rss_mb
    from agent.runtime import ModelLoadError, load_interpreter, random_inputs, run_once

    try:
        interpreter = load_interpreter(model, num_threads=threads)
    except ModelLoadError as exc:
        return {"ok": False, "reason": f"load failed: {exc}"}
    if golden is not None:
        failure, inputs, detail = _check_golden(interpreter, golden)
        if failure is not None:
            return {"ok": False, "reason": failure}
    else:
        inputs = random_inputs(interpreter, seed=0)
        detail = (
            "no golden inputs shipped: seeded random inputs, outputs checked for finiteness only"
        )
    outputs = run_once(interpreter, inputs)
    times = []
    for _ in range(SELFTEST_RUNS):
        start = time.perf_counter()
        outputs = run_once(interpreter, inputs)
        times.append((time.perf_counter() - start) * 1000.0)
    for i, out in enumerate(outputs):
        if out.dtype.kind == "f" and not bool(np.all(np.isfinite(out))):
            return {"ok": False, "reason": f"output {i} is not finite (NaN or Inf)"}
    return {
        "ok": True,
        "reason": "",
        "latency_ms": sorted(times)[len(times) // 2],
        "peak_rss_mb": peak_rss_mb(),
        "detail": detail,
    }


def tighter_budget(*budgets: float) -> float:
    """The smallest non-zero budget (0 = no budget), e.g. of the agent config and the desired."""
    given = [b for b in budgets if b > 0]
    return min(given) if given else 0.0


def run_selftest(
    model: Path,
    *,
    threads: int | None,
    timeout_s: float,
    golden: Path | None = None,
    latency_budget_ms: float = 0.0,
    memory_budget_mb: float = 0.0,
) -> SelfTestResult:
    """Run the self-test in a child process and judge it against the budgets."""
    cmd = [sys.executable, "-m", "agent.selftest", str(model)]
    if threads:
        cmd += ["--threads", str(threads)]
    if golden is not None:
        cmd += ["--golden", str(golden)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return SelfTestResult(False, f"self-test timed out after {timeout_s:.0f} s")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return SelfTestResult(False, f"model crashed the self-test ({how}): {' | '.join(tail)}")
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return SelfTestResult(False, f"self-test printed no result: {proc.stdout[-300:]!r}")
    if not data.get("ok"):
        return SelfTestResult(False, str(data.get("reason", "unknown failure")))
    latency, peak = float(data["latency_ms"]), float(data["peak_rss_mb"])
    detail = str(data.get("detail", ""))
    if latency_budget_ms and latency > latency_budget_ms:
        return SelfTestResult(
            False,
            f"latency {latency:.3f} ms over budget {latency_budget_ms:.3f} ms",
            latency,
            peak,
            detail,
        )
    if memory_budget_mb and peak > memory_budget_mb:
        return SelfTestResult(
            False,
            f"peak RSS {peak:.1f} MB over budget {memory_budget_mb:.1f} MB",
            latency,
            peak,
            detail,
        )
    if not math.isfinite(latency):
        return SelfTestResult(False, "latency not finite", latency, peak, detail)
    return SelfTestResult(True, "", latency, peak, detail)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process."""
    parser = argparse.ArgumentParser(prog="python -m agent.selftest")
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--golden", type=Path, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(_child(args.model, args.threads, args.golden)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

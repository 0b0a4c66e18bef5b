"""Child-process self-test of a staged model: a crashing model cannot take the agent down.

Run as `python -m agent.selftest MODEL [--threads N] [--golden GOLDEN.npz]`; prints one JSON
object on stdout. With a golden file (agent/golden.py describes the format; v1 files hold one
input and one output, v2 files every input and every output) every golden sample is run and
every output must be finite and within its own `atol` of the expected one. Without one, seeded
random inputs are run and only finiteness is checked.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.golden import GoldenError, describe, load_golden

# Invocations timed in the self-test: enough for a stable median, cheap on a slow device.
SELFTEST_RUNS = 5


@dataclass(frozen=True)
class SelfTestResult:
    """Outcome of a self-test: ok, or the reason it failed, with what was measured."""

    ok: bool
    reason: str
    latency_ms: float = 0.0
    peak_rss_mb: float = 0.0
    # What was checked (golden samples and error, or random inputs only): for logs and events.
    detail: str = ""


def _check_golden(interpreter: Any, golden: Path) -> tuple[str | None, list[np.ndarray], str]:
    """Run every golden sample; every output must be finite and within its own tolerance.

    Returns (failure or None, inputs to time with, what was checked).
    """
    from agent.runtime import run_once

    try:
        data = load_golden(golden, interpreter)
    except GoldenError as exc:
        return str(exc), [], ""
    worst = [0.0] * len(data.outputs)
    for i in range(data.samples):
        got = run_once(interpreter, [array[i : i + 1] for array in data.inputs])
        for k, out in enumerate(got):
            if out.dtype.kind == "f" and not bool(np.all(np.isfinite(out))):
                return f"{data.label(k)} is not finite (NaN or Inf) on golden sample {i}", [], ""
            have = data.comparable(out[0], k)
            want = data.expected(i, k)
            if have.shape != want.shape:
                return (
                    f"golden sample {i}, {data.label(k)}: {describe(have)}, expected "
                    f"{describe(want)}",
                    [],
                    "",
                )
            error = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64))))
            if not error <= data.atol[k]:
                where = f"golden sample {i}" + (f", {data.label(k)}" if len(got) > 1 else "")
                return f"{where}: max abs error {error:.6g} > atol {data.atol[k]:.6g}", [], ""
            worst[k] = max(worst[k], error)
    if len(worst) == 1:
        detail = (
            f"golden: {data.samples} samples, max abs error {worst[0]:.3g} <= atol "
            f"{data.atol[0]:.3g}"
        )
    else:
        detail = f"golden: {data.samples} samples, {len(worst)} outputs: " + "; ".join(
            f"{data.label(k)} max abs error {worst[k]:.3g} <= atol {data.atol[k]:.3g}"
            for k in range(len(worst))
        )
    return None, [array[0:1] for array in data.inputs], detail


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

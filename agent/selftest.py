"""Child-process self-test of a staged model: a crashing model cannot take the agent down.

Run as `python -m agent.selftest MODEL [--threads N]`; prints one JSON object on stdout.
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

# Invocations timed in the self-test: enough for a stable median, cheap on a slow device.
SELFTEST_RUNS = 5


@dataclass(frozen=True)
class SelfTestResult:
    """Outcome of a self-test: ok, or the reason it failed, with what was measured."""

    ok: bool
    reason: str
    latency_ms: float = 0.0
    peak_rss_mb: float = 0.0


def _child(model: Path, threads: int | None) -> dict[str, object]:
    """Load, allocate and run the model on deterministic inputs; report finiteness and cost."""
    import numpy as np

    from agent.memory import peak_rss_mb
    from agent.runtime import ModelLoadError, load_interpreter, random_inputs, run_once

    try:
        interpreter = load_interpreter(model, num_threads=threads)
    except ModelLoadError as exc:
        return {"ok": False, "reason": f"load failed: {exc}"}
    inputs = random_inputs(interpreter, seed=0)
    outputs = run_once(interpreter, inputs)
    times = []
    for _ in range(SELFTEST_RUNS):
        start = time.perf_counter()
        outputs = run_once(interpreter, inputs)
        times.append((time.perf_counter() - start) * 1000.0)
    for i, out in enumerate(outputs):
        if out.dtype.kind == "f" and not bool(np.all(np.isfinite(out))):
            return {"ok": False, "reason": f"output {i} is not finite (NaN or Inf)"}
    peak_mb = peak_rss_mb()
    return {
        "ok": True,
        "reason": "",
        "latency_ms": sorted(times)[len(times) // 2],
        "peak_rss_mb": peak_mb,
    }


def run_selftest(
    model: Path,
    *,
    threads: int | None,
    timeout_s: float,
    latency_budget_ms: float = 0.0,
    memory_budget_mb: float = 0.0,
) -> SelfTestResult:
    """Run the self-test in a child process and judge it against the budgets."""
    cmd = [sys.executable, "-m", "agent.selftest", str(model)]
    if threads:
        cmd += ["--threads", str(threads)]
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
    if latency_budget_ms and latency > latency_budget_ms:
        return SelfTestResult(
            False, f"latency {latency:.2f} ms over budget {latency_budget_ms:.2f} ms", latency, peak
        )
    if memory_budget_mb and peak > memory_budget_mb:
        return SelfTestResult(
            False, f"peak RSS {peak:.1f} MB over budget {memory_budget_mb:.1f} MB", latency, peak
        )
    if not math.isfinite(latency):
        return SelfTestResult(False, "latency not finite", latency, peak)
    return SelfTestResult(True, "", latency, peak)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process."""
    parser = argparse.ArgumentParser(prog="python -m agent.selftest")
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(_child(args.model, args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`rollout start --wait` / `rollout status --watch`: exit codes that tell a script the outcome."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import typer

# Exit codes (docs/cli.md has the table); 2 is click's own code for usage errors.
EXIT_COMPLETED = 0  # completed, no device failed (or, without --watch: still running)
EXIT_ABORTED = 1  # aborted or rolled back
EXIT_USAGE = 2  # bad arguments, unknown rollout id, bad input
EXIT_PARTIAL = 3  # completed, but some devices failed (kept on their previous model)
EXIT_PENDING = 4  # paused, or --timeout passed before the rollout ended

# Device states that count as a failed device in a completed rollout (outliers were kept).
FAILED_DEVICE_STATES = frozenset({"failed", "gate_failed", "rollback_failed"})
# Rollout states with no way forward without an operator.
FINAL_STATES = frozenset({"completed", "aborted", "rolled_back"})
# Seconds between two reads of the rollout while waiting: the controller's reconcile tick is
# 1 s, so polling faster only re-reads the same rows.
POLL_INTERVAL_S = 2.0


def failed_devices(rollout: dict[str, Any]) -> int:
    """How many of the rollout's devices ended failed."""
    counts: dict[str, int] = rollout.get("counts") or {}
    return sum(n for state, n in counts.items() if state in FAILED_DEVICE_STATES)


def exit_code(rollout: dict[str, Any]) -> int:
    """The exit code that describes a rollout's current state (table in docs/cli.md)."""
    state = rollout["state"]
    if state in ("aborted", "rolled_back"):
        return EXIT_ABORTED
    if state == "completed":
        return EXIT_PARTIAL if failed_devices(rollout) else EXIT_COMPLETED
    if state == "paused":
        return EXIT_PENDING
    return EXIT_COMPLETED  # running: nothing has gone wrong yet


def progress_line(rollout: dict[str, Any], elapsed_s: float) -> str:
    """`[  12s] r-1 running  wave 2/3  done 5/8 (1 failed)` for the progress on stderr."""
    devices = rollout.get("devices") or []
    waves = rollout.get("waves") or []
    done = sum(1 for d in devices if d["state"] not in _UNFINISHED)
    wave = int(rollout.get("wave") or 0) + 1  # 0-based in the database
    failed = failed_devices(rollout)
    return (
        f"[{elapsed_s:5.0f}s] {rollout['id']} {rollout['state']}  wave {wave}/{len(waves)}  "
        f"done {done}/{len(devices)}" + (f" ({failed} failed)" if failed else "")
    )


# Device states whose part in the rollout is not over yet.
_UNFINISHED = frozenset(
    {"waiting", "baselining", "trialing", "pending", "in_progress", "activated", "retrying",
     "rolling_back"}
)  # fmt: skip


def outcome_line(rollout: dict[str, Any]) -> str:
    """The one line a script's log keeps: the final state, the failures and the reason."""
    failed = failed_devices(rollout)
    parts = [f"rollout {rollout['id']}: {rollout['state']}"]
    if failed:
        parts.append(f"{failed} of {len(rollout.get('devices') or [])} device(s) failed")
    if rollout.get("reason"):
        parts.append(str(rollout["reason"]))
    return "; ".join(parts)


def wait_for(
    read: Callable[[], dict[str, Any]],
    timeout_s: float | None,
    interval_s: float = POLL_INTERVAL_S,
    quiet: bool = False,
) -> tuple[dict[str, Any], int]:
    """Poll a rollout until it ends, pauses or `timeout_s` passes; its state and exit code."""
    start = time.monotonic()
    last = ""
    while True:
        rollout = read()
        elapsed = time.monotonic() - start
        line = progress_line(rollout, elapsed)
        if not quiet and line.split("] ", 1)[1] != last:  # a new line only when something moved
            last = line.split("] ", 1)[1]
            typer.echo(line, err=True)
        if rollout["state"] in FINAL_STATES or rollout["state"] == "paused":
            return rollout, exit_code(rollout)
        if timeout_s is not None and elapsed >= timeout_s:
            typer.echo(
                f"rollout {rollout['id']}: still {rollout['state']} after {timeout_s:g} s "
                "(--timeout); it goes on",
                err=True,
            )
            return rollout, EXIT_PENDING
        left = interval_s if timeout_s is None else max(0.05, timeout_s - elapsed)
        time.sleep(min(interval_s, left))

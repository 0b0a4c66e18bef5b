"""`rollout start --wait` / `rollout status --watch`: exit codes that tell a script the outcome."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from controller.cli.progress import ProgressDisplay
from controller.fleet.rollout.outcome import rollout_outcome

# Exit codes (docs/cli.md has the table); 2 is click's own code for usage errors.
EXIT_COMPLETED = 0  # completed, no device failed (or, without --watch: still running)
EXIT_ABORTED = 1  # aborted or rolled back
EXIT_USAGE = 2  # bad arguments, unknown rollout id, bad input
EXIT_PARTIAL = 3  # completed, but some devices failed (kept on their previous model)
EXIT_PENDING = 4  # paused, or --timeout passed before the rollout ended

# Rollout states with no way forward without an operator.
FINAL_STATES = frozenset({"completed", "aborted", "rolled_back"})
# Seconds between two reads of the rollout while waiting: the controller's reconcile tick is
# 1 s, so polling faster only re-reads the same rows.
POLL_INTERVAL_S = 2.0
# Exit code per outcome result (controller/fleet/rollout/outcome.py; table in docs/cli.md).
EXIT_BY_RESULT = {
    "succeeded": EXIT_COMPLETED,
    "in_progress": EXIT_COMPLETED,  # nothing has gone wrong yet
    "partial": EXIT_PARTIAL,
    "failed": EXIT_PARTIAL,
    "aborted": EXIT_ABORTED,
    "rolled_back": EXIT_ABORTED,
    "paused": EXIT_PENDING,
}


def outcome(rollout: dict[str, Any]) -> dict[str, Any]:
    """The rollout's server-computed outcome (computed here for a rollout dict without one)."""
    found: dict[str, Any] | None = rollout.get("outcome")
    return found if found is not None else rollout_outcome(rollout["state"], rollout["counts"])


def failed_devices(rollout: dict[str, Any]) -> int:
    """How many of the rollout's devices ended failed."""
    return int(outcome(rollout)["failed"])


def exit_code(rollout: dict[str, Any]) -> int:
    """The exit code that describes a rollout's current state (table in docs/cli.md)."""
    return EXIT_BY_RESULT.get(outcome(rollout)["result"], EXIT_COMPLETED)


def _wave(rollout: dict[str, Any]) -> str:
    """`wave 2/3` (the database counts from 0)."""
    return f"wave {int(rollout.get('wave') or 0) + 1}/{len(rollout.get('waves') or [])}"


def progress_line(rollout: dict[str, Any], elapsed_s: float) -> str:
    """`[  12s] r-1 running  wave 2/3  done 5/8 (1 failed)` for the progress on stderr."""
    out = outcome(rollout)
    failed = out["failed"]
    return (
        f"[{elapsed_s:5.0f}s] {rollout['id']} {rollout['state']}  {_wave(rollout)}  "
        f"done {out['done']}/{out['devices']}" + (f" ({failed} failed)" if failed else "")
    )


def outcome_line(rollout: dict[str, Any]) -> str:
    """The one line a script's log keeps: the final state, the failures and the reason."""
    out = outcome(rollout)
    parts = [f"rollout {rollout['id']}: {rollout['state']}"]
    if out["failed"]:
        parts.append(f"{out['failed']} of {out['devices']} device(s) failed")
    if out["result"] in ("partial", "failed"):
        parts.append(f"outcome {out['result']}")
    if rollout.get("reason"):
        parts.append(str(rollout["reason"]))
    return "; ".join(parts)


def wait_for(
    read: Callable[[], dict[str, Any]],
    timeout_s: float | None,
    interval_s: float = POLL_INTERVAL_S,
    quiet: bool = False,
    display: ProgressDisplay | None = None,
) -> tuple[dict[str, Any], int]:
    """Poll a rollout until it ends, pauses or `timeout_s` passes; its state and exit code.

    Progress goes to stderr: a bar of devices done/total on a terminal, else a line whenever
    something moved.
    """
    shown = display or ProgressDisplay(terminal=False if quiet else None)
    with shown:
        return _poll(read, timeout_s, interval_s, quiet, shown)


def _poll(
    read: Callable[[], dict[str, Any]],
    timeout_s: float | None,
    interval_s: float,
    quiet: bool,
    display: ProgressDisplay,
) -> tuple[dict[str, Any], int]:
    """The loop of wait_for."""
    start = time.monotonic()
    last = ""
    while True:
        rollout = read()
        elapsed = time.monotonic() - start
        line = progress_line(rollout, elapsed)
        moved = line.split("] ", 1)[1] != last  # a new line only when something moved
        last = line.split("] ", 1)[1]
        out = outcome(rollout)
        if not quiet:
            display.update(
                "rollout",
                description=f"{rollout['id']} {out['label']}  {_wave(rollout)}",
                completed=out["done"],
                total=out["devices"],
                unit="devices",
                line=line if moved else None,
            )
        if rollout["state"] in FINAL_STATES or rollout["state"] == "paused":
            return rollout, exit_code(rollout)
        if timeout_s is not None and elapsed >= timeout_s:
            display.note(
                f"rollout {rollout['id']}: still {rollout['state']} after {timeout_s:g} s "
                "(--timeout); it goes on"
            )
            return rollout, EXIT_PENDING
        left = interval_s if timeout_s is None else max(0.05, timeout_s - elapsed)
        time.sleep(min(interval_s, left))

"""A rollout's outcome from its state and device counts: the one verdict the API, CLI and
dashboard show (docs/http-api.md, "Rollout outcome"), so none of them re-derives it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from controller.fleet.rollout.states import DeviceState

D = DeviceState

# Devices that did not end on the rollout's model because of an error: the agent failed, a
# gate was broken, or going back after abort/rollback failed. Outliers are not failures.
FAILED_STATES: frozenset[str] = frozenset({D.FAILED, D.GATE_FAILED, D.ROLLBACK_FAILED})
# Devices that run the rollout's model: measured within the gates, or kept as explained outliers.
UPDATED_STATES: frozenset[str] = frozenset({D.SUCCEEDED, D.OUTLIER})
# Devices the rollout left alone: no artifact for the profile, ended before the wave, or taken
# by a newer rollout.
SKIPPED_STATES: frozenset[str] = frozenset({D.SKIPPED, D.CANCELLED, D.SUPERSEDED})
# Devices whose part in the rollout is not over yet (a device going back is still moving).
UNFINISHED_STATES: frozenset[str] = frozenset(
    {D.WAITING, D.BASELINING, D.TRIALING, D.PENDING, D.IN_PROGRESS, D.ACTIVATED, D.RETRYING,
     D.ROLLING_BACK}
)  # fmt: skip

# Every result, in the order of the table in docs/http-api.md.
RESULTS = ("in_progress", "paused", "succeeded", "partial", "failed", "aborted", "rolled_back")


def _count(counts: Mapping[str, int], states: frozenset[str]) -> int:
    """Devices in any of `states`."""
    return sum(int(n) for s, n in counts.items() if s in states)


def rollout_outcome(state: str, counts: Mapping[str, int]) -> dict[str, Any]:
    """`{result, label, devices, done, updated, failed, skipped, rolled_back}` of one rollout.

    result: in_progress (running), paused, aborted, rolled_back, or for a completed rollout
    succeeded (no device failed), partial (some failed, some updated) or failed (devices
    failed and none runs the model). label is the short text every view shows.
    """
    total = sum(int(n) for n in counts.values())
    failed = _count(counts, FAILED_STATES)
    updated = _count(counts, UPDATED_STATES)
    if state == "completed":
        if not failed:
            result, label = "succeeded", "completed"
        elif updated:
            result, label = "partial", f"completed with {failed} failed"
        else:
            result, label = "failed", f"completed: all {failed} failed"
    elif state == "running":
        result, label = "in_progress", "running"
    elif state in ("paused", "aborted", "rolled_back"):
        result, label = state, state
    else:  # a state newer than this table: say it as it is
        result, label = state, state
    return {
        "result": result,
        "label": label,
        "devices": total,
        "done": total - _count(counts, UNFINISHED_STATES),
        "updated": updated,
        "failed": failed,
        "skipped": _count(counts, SKIPPED_STATES),
        "rolled_back": int(counts.get(D.ROLLED_BACK.value, 0)),
    }

"""Rollout conditions as small evaluators, one per condition, registered by an enum.

As hawkBit's rollout group conditions: the engine asks `EVALUATORS[condition]` for a verdict on
plain counts (devices per state) and acts on it; the conditions themselves hold no SQL, so each
is tested on synthetic counts. Gates are judged per benchmark by `GATE_EVALUATORS[kind]`.

- abort the rollout  when MIN_EXECUTED and MAX_FAILURES are both met (the error condition);
- advance the wave   when WAVE_DONE is met for every wave so far (the success condition).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from controller.fleet.rollout.policy import Gate, Policy
from controller.fleet.rollout.states import DONE, EXECUTED, FAILED


@dataclass(frozen=True)
class Counts:
    """Devices per state (of a rollout, or of its waves so far), as read from the database."""

    by_state: Mapping[str, int]

    @property
    def executed(self) -> int:
        """Devices with a verdict (succeeded, failed, gate_failed)."""
        return sum(self.by_state.get(s, 0) for s in EXECUTED)

    @property
    def failures(self) -> int:
        """Executed devices that failed."""
        return sum(self.by_state.get(s, 0) for s in FAILED)

    @property
    def open(self) -> int:
        """Devices that still hold their wave back."""
        return sum(n for s, n in self.by_state.items() if s not in DONE)


@dataclass(frozen=True)
class Verdict:
    """Whether a condition is met, and why (for the rollout's reason and the log)."""

    met: bool
    why: str = ""


class Condition(str, Enum):
    """Conditions on a rollout's counts."""

    MIN_EXECUTED = "min_executed"  # enough devices have a verdict to judge the failure rate
    MAX_FAILURES = "max_failures"  # the failures pass the policy's threshold
    WAVE_DONE = "wave_done"  # no device of the waves so far is still open


def _min_executed(counts: Counts, policy: Policy) -> Verdict:
    """Met once `--min-executed` devices have a verdict."""
    return Verdict(
        counts.executed >= policy.min_executed, f"minimum executed {policy.min_executed}"
    )


def _max_failures(counts: Counts, policy: Policy) -> Verdict:
    """Met when the failures among executed devices pass `--max-failures`."""
    failures, executed = counts.failures, counts.executed
    return Verdict(
        policy.max_failures.exceeded(failures, executed),
        f"{failures} of {executed} executed devices failed "
        f"(threshold {policy.max_failures.label()})",
    )


def _wave_done(counts: Counts, policy: Policy) -> Verdict:
    """Met when every device counted is done (whatever its outcome)."""
    return Verdict(counts.open == 0, f"{counts.open} device(s) still open")


EVALUATORS: dict[Condition, Callable[[Counts, Policy], Verdict]] = {
    Condition.MIN_EXECUTED: _min_executed,
    Condition.MAX_FAILURES: _max_failures,
    Condition.WAVE_DONE: _wave_done,
}
# The error condition (all must be met: abort) and the success condition (advance the wave).
ABORT_WHEN: tuple[Condition, ...] = (Condition.MIN_EXECUTED, Condition.MAX_FAILURES)
ADVANCE_WHEN: tuple[Condition, ...] = (Condition.WAVE_DONE,)


def should_abort(counts: Counts, policy: Policy) -> Verdict:
    """The error condition on the rollout's counts; `why` is the rollout's abort reason."""
    if not all(EVALUATORS[c](counts, policy).met for c in ABORT_WHEN):
        return Verdict(False)
    return Verdict(
        True,
        f"{counts.failures} of {counts.executed} executed devices failed "
        f"(threshold {policy.max_failures.label()}, minimum executed {policy.min_executed})",
    )


def may_advance(counts: Counts, policy: Policy) -> bool:
    """The success condition on the counts of the waves so far."""
    return all(EVALUATORS[c](counts, policy).met for c in ADVANCE_WHEN)


# ----------------------------------------------------------------------------- gates
class GateKind(str, Enum):
    """How a gate judges a benchmark."""

    LIMIT = "limit"  # an absolute budget: metric <= X
    REGRESSION = "regression"  # relative to the previous model's baseline on the same device


def _limit(gate: Gate, report: dict[str, Any], baseline: dict[str, Any] | None) -> str | None:
    """An absolute gate's violation (the baseline plays no part)."""
    return gate.violation(report, None)


def _regression(gate: Gate, report: dict[str, Any], baseline: dict[str, Any] | None) -> str | None:
    """A regression gate's violation; None without a baseline (recorded as not judged)."""
    return gate.violation(report, baseline) if baseline is not None else None


GATE_EVALUATORS: dict[
    GateKind, Callable[[Gate, dict[str, Any], dict[str, Any] | None], str | None]
] = {
    GateKind.LIMIT: _limit,
    GateKind.REGRESSION: _regression,
}


def kind(gate: Gate) -> GateKind:
    """Which evaluator judges `gate`."""
    return GateKind.REGRESSION if gate.relative else GateKind.LIMIT


@dataclass(frozen=True)
class GateVerdict:
    """Every gate a benchmark breaks (policy order), and a note when some were not judged."""

    violations: tuple[str, ...]
    note: str = ""


# Row detail when regression gates could not be judged for want of a baseline.
NOT_JUDGED = "no baseline for the previous model: regression gates not judged"


def judge(
    gates: tuple[Gate, ...], report: dict[str, Any], baseline: dict[str, Any] | None
) -> GateVerdict:
    """Judge a benchmark against `gates` (each by its kind's evaluator)."""
    violations = tuple(v for g in gates if (v := GATE_EVALUATORS[kind(g)](g, report, baseline)))
    unjudged = baseline is None and any(kind(g) is GateKind.REGRESSION for g in gates)
    return GateVerdict(violations, NOT_JUDGED if unjudged else "")


def broken(
    gates: tuple[Gate, ...], report: dict[str, Any], baseline: dict[str, Any] | None
) -> list[Gate]:
    """The gates a benchmark breaks."""
    return [g for g in gates if GATE_EVALUATORS[kind(g)](g, report, baseline)]

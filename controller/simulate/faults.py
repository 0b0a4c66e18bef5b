"""Fault specs for `edgefleet simulate`: parsing --fault and assigning faults to devices."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

FAULT_KINDS = ("slow", "crash", "nan", "offline", "drop", "telemetry-loss")
_FAULT_VALUE = {
    "slow": "a factor > 0",
    "offline": "seconds > 0",
    "drop": "a fraction in (0, 1)",
    "telemetry-loss": "a fraction in (0, 1)",
}
# Faults whose value may be left out, and the value then used. A quarter of the telemetry
# publishes lost gives every device a gap within a few intervals, so resends run at scale.
_FAULT_DEFAULT = {"telemetry-loss": 0.25}
# Faults whose value is a probability (must stay below 1).
_FRACTIONS = ("drop", "telemetry-loss")
# Faults attribute on Faults for each kind, where the name differs.
FAULT_ATTRS = {"offline": "offline_s", "telemetry-loss": "telemetry_loss"}


class SimulationError(ValueError):
    """A bad simulation parameter (fault spec, profile, prefix); the text names it."""


@dataclass(frozen=True)
class FaultSpec:
    """One --fault: the fault, its parameter, and how many devices get it (count or percent)."""

    kind: str
    value: float | None
    count: int | None = None
    percent: float | None = None
    text: str = ""

    def devices(self, total: int) -> int:
        """How many of `total` devices get this fault (a percentage > 0 means at least one)."""
        if self.count is not None:
            return min(self.count, total)
        share = total * (self.percent or 0.0) / 100.0
        return min(total, max(1, round(share))) if share > 0 else 0


def parse_fault(spec: str) -> FaultSpec:
    """Parse KIND[=VALUE]:COUNT or KIND[=VALUE]:PERCENT% strictly, naming the bad spec."""
    head, sep, amount = spec.strip().rpartition(":")
    if not sep or not head:
        raise SimulationError(
            f"bad --fault {spec!r}: expected KIND[=VALUE]:COUNT or KIND[=VALUE]:PERCENT%, "
            "e.g. nan:5%, slow=3:10%, offline=30:2%, crash:1"
        )
    kind, has_value, raw = head.partition("=")
    if kind not in FAULT_KINDS:
        raise SimulationError(
            f"bad --fault {spec!r}: unknown fault {kind!r} ({', '.join(FAULT_KINDS)})"
        )
    value: float | None = None
    if not has_value and kind in _FAULT_DEFAULT:
        value = _FAULT_DEFAULT[kind]
    elif kind in _FAULT_VALUE:
        if not has_value:
            raise SimulationError(f"bad --fault {spec!r}: {kind} needs ={_FAULT_VALUE[kind]}")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and value > 0 and (kind not in _FRACTIONS or value < 1)
        if not ok:
            raise SimulationError(
                f"bad --fault {spec!r}: {kind} value must be {_FAULT_VALUE[kind]}"
            )
    elif has_value:
        raise SimulationError(f"bad --fault {spec!r}: {kind} takes no value")
    if amount.endswith("%"):
        try:
            percent = float(amount[:-1])
        except ValueError:
            percent = math.nan
        if not 0 < percent <= 100:
            raise SimulationError(f"bad --fault {spec!r}: percentage must be in (0, 100]")
        return FaultSpec(kind, value, percent=percent, text=spec)
    if not amount.isdigit() or int(amount) < 1:
        raise SimulationError(f"bad --fault {spec!r}: count must be an integer >= 1 or N%")
    return FaultSpec(kind, value, count=int(amount), text=spec)


@dataclass(frozen=True)
class Faults:
    """The faults one simulated agent carries (shared, immutable; most agents have none)."""

    slow: float = 1.0
    crash: bool = False
    nan: bool = False
    offline_s: float = 0.0
    drop: float = 0.0
    telemetry_loss: float = 0.0  # share of telemetry publishes lost before they leave

    def names(self) -> list[str]:
        """Fault names as in --fault, for snapshots."""
        out = [f"slow={self.slow:g}"] if self.slow != 1.0 else []
        out += ["crash"] if self.crash else []
        out += ["nan"] if self.nan else []
        out += [f"offline={self.offline_s:g}"] if self.offline_s else []
        out += [f"drop={self.drop:g}"] if self.drop else []
        out += [f"telemetry-loss={self.telemetry_loss:g}"] if self.telemetry_loss else []
        return out


NO_FAULTS = Faults()


def assign_faults(specs: Sequence[FaultSpec], total: int, seed: int) -> dict[int, Faults]:
    """Device index -> faults: a seeded subset per spec, preferring devices without a fault."""
    assigned: dict[int, Faults] = {}
    for position, spec in enumerate(specs):
        wanted = spec.devices(total)
        rng = random.Random(f"{seed}:{position}:{spec.text}")
        free = [i for i in range(total) if i not in assigned]
        pool = free if len(free) >= wanted else list(range(total))
        changes: dict[str, dict[str, Any]] = {
            "slow": {"slow": spec.value},
            "crash": {"crash": True},
            "nan": {"nan": True},
            "offline": {"offline_s": spec.value},
            "drop": {"drop": spec.value},
            "telemetry-loss": {"telemetry_loss": spec.value},
        }
        change = changes[spec.kind]
        for index in sorted(rng.sample(pool, wanted)):
            assigned[index] = replace(assigned.get(index, NO_FAULTS), **change)
    return assigned

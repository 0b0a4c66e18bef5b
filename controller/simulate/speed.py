"""Per-profile speed of recipes and thread counts in the simulation (`--speed PROFILE:KEY=F`).

The host ranks converter variants on x86; a real board may disagree (int8 without a fast
kernel, fp16 on a core with native half floats). A SpeedModel lets a simulated fleet disagree
on purpose, so the closed loop (docs/closed-loop.md) can be tried against devices on which the
host's choice is not the best one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import firmware_profiles
from agent.protocol import ProtocolError, validate_name
from agent.protocol.messages import MAX_THREADS
from controller.simulate.faults import SimulationError

# Thread scaling when a profile gives no tN factor: p50 × 1 / threads ** 0.7 (a parallel share
# of about 80 %, Amdahl-like), with threads capped at the profile's cores. Two threads then take
# 62 % of one thread's time and four 38 %: the usual shape of XNNPACK on small convolutional
# models, where the interpreter's serial parts keep the speed-up below linear.
THREAD_EXPONENT = 0.7
# Threads a model runs with when the desired state does not say (the demo agents use 1).
DEFAULT_THREADS = 1
# Separators in a recipe name as the converters write it: "int8+pruned50" is int8 applied to a
# pruned model, "dynamic-pt" the dynamic recipe with per-tensor Dense weights.
PRUNED_SEPARATOR = "+"
PER_TENSOR_SUFFIX = "-pt"
_THREAD_KEY = re.compile(r"t(\d+)")
_USAGE = "expected PROFILE:KEY=FACTOR[,KEY=FACTOR...], e.g. rpi4:int8=3.0,t4=0.5"


def recipe_keys(recipe: str) -> tuple[str, ...]:
    """Keys a manifest recipe matches, most specific first: int8+pruned50 → (it, int8)."""
    keys = [recipe]
    unpruned = recipe.partition(PRUNED_SEPARATOR)[0]
    for key in (unpruned, unpruned.removesuffix(PER_TENSOR_SUFFIX)):
        if key and key not in keys:
            keys.append(key)
    return tuple(keys)


@dataclass(frozen=True)
class SpeedSpec:
    """One --speed: a profile and its factors by recipe name or thread key (tN)."""

    profile: str
    factors: Mapping[str, float] = field(default_factory=dict)
    text: str = ""


def parse_speed(spec: str) -> SpeedSpec:
    """Parse PROFILE:KEY=FACTOR[,KEY=FACTOR...] strictly; errors name the spec and its bad part."""
    profile, sep, body = spec.strip().partition(":")
    if not sep or not profile or not body:
        raise SimulationError(f"bad --speed {spec!r}: {_USAGE}")
    try:
        validate_name("profile id", profile)
    except ProtocolError as exc:
        raise SimulationError(f"bad --speed {spec!r}: {exc}") from None
    factors: dict[str, float] = {}
    for part in body.split(","):
        key, eq, raw = part.strip().partition("=")
        if not eq or not key:
            raise SimulationError(f"bad --speed {spec!r}: {part.strip()!r} is not KEY=FACTOR")
        _check_key(spec, key)
        try:
            factor = float(raw)
        except ValueError:
            factor = math.nan
        if not math.isfinite(factor) or factor <= 0:
            raise SimulationError(
                f"bad --speed {spec!r}: factor of {key!r} must be a number > 0, got {raw!r}"
            )
        if key in factors:
            raise SimulationError(f"bad --speed {spec!r}: {key!r} given twice")
        factors[key] = factor
    return SpeedSpec(profile, factors, spec)


def _check_key(spec: str, key: str) -> None:
    """A key is tN (1..MAX_THREADS) or a recipe name as a manifest spells it."""
    match = _THREAD_KEY.fullmatch(key)
    if match:
        if not 1 <= int(match.group(1)) <= MAX_THREADS:
            raise SimulationError(
                f"bad --speed {spec!r}: thread key {key!r} must be t1..t{MAX_THREADS}"
            )
        return
    try:
        validate_name("recipe name", key)
    except ProtocolError as exc:
        raise SimulationError(f"bad --speed {spec!r}: {exc}") from None


class SpeedModel:
    """Latency factors per profile: by recipe (base recipe too) and by thread count."""

    def __init__(self, specs: Iterable[SpeedSpec] = ()) -> None:
        """Merge specs by profile; a later spec's factor for the same key wins."""
        self.factors: dict[str, dict[str, float]] = {}
        self._texts: dict[str, str] = {}  # profile -> its first spec, for error messages
        for spec in specs:
            self.factors.setdefault(spec.profile, {}).update(spec.factors)
            self._texts.setdefault(spec.profile, spec.text or spec.profile)

    @classmethod
    def parse(cls, specs: Sequence[str]) -> SpeedModel:
        """A model from --speed strings."""
        return cls(parse_speed(spec) for spec in specs)

    def check_profiles(self, known: Iterable[str]) -> None:
        """Raise naming a profile the specs mention that does not exist."""
        known_ids = sorted(set(known))
        for profile, text in self._texts.items():
            if profile not in known_ids:
                raise SimulationError(
                    f"bad --speed {text!r}: unknown profile {profile!r}; "
                    f"known profiles: {', '.join(known_ids)}"
                )

    def recipe_factor(self, profile: str, recipe: str | None) -> float:
        """The factor of the most specific key `recipe` matches on `profile` (1.0: none)."""
        table = self.factors.get(profile)
        if not table or not recipe:
            return 1.0
        for key in recipe_keys(recipe):
            if key in table:
                return table[key]
        return 1.0

    def thread_factor(self, profile: firmware_profiles.Profile, threads: int | None) -> float:
        """tN's factor when given, else 1 / min(threads, cores) ** THREAD_EXPONENT."""
        count = threads or DEFAULT_THREADS
        table = self.factors.get(profile.id)
        if table is not None and f"t{count}" in table:
            return table[f"t{count}"]
        return 1.0 / min(count, profile.cpu.cores) ** THREAD_EXPONENT

    def factor(
        self, profile: firmware_profiles.Profile, recipe: str | None, threads: int | None
    ) -> float:
        """p50 multiplier of a model of `recipe` run with `threads` on a `profile` device."""
        return self.recipe_factor(profile.id, recipe) * self.thread_factor(profile, threads)


NO_SPEED = SpeedModel()

__all__ = [
    "DEFAULT_THREADS",
    "NO_SPEED",
    "THREAD_EXPONENT",
    "SpeedModel",
    "SpeedSpec",
    "parse_speed",
    "recipe_keys",
]

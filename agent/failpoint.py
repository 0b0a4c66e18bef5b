"""Failpoint for fault tests: pause or exit right after an update state is persisted.

`EDGEFLEET_FAILPOINT=pause-after:<state>[:seconds]` sleeps (default 60 s) right after the agent
wrote `<state>` to update.json, so a test can SIGKILL it by PID at a known point;
`exit-after:<state>` ends the process there with os._exit (no cleanup, like a power cut).
It fires once per process. Unset, it is one `is None` check per transition.

`EDGEFLEET_INJECT_LATENCY_MS=<sha256 prefix>:<ms>[,...]` slows the serving path only (served
requests, not the self-test or the benchmark) of matching models by <ms> per invoke, so a test can
make a model breach its fallback budget (docs/closed-loop.md).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

ENV_VAR = "EDGEFLEET_FAILPOINT"
# Long enough for any test to notice the pause and kill the agent; short enough that a
# forgotten failpoint only delays an update instead of hanging it forever.
DEFAULT_PAUSE_S = 60.0
# Exit code of exit-after (EX_SOFTWARE): tells a test the failpoint, not a crash, ended the agent.
EXIT_CODE = 70
ACTIONS = ("pause-after", "exit-after")


class FailpointError(ValueError):
    """EDGEFLEET_FAILPOINT holds a value this module does not understand."""


@dataclass(frozen=True)
class Failpoint:
    """Where to stop (the update state just persisted) and how (pause for seconds, or exit)."""

    action: str
    state: str
    seconds: float = DEFAULT_PAUSE_S


def parse_failpoint(text: str, states: frozenset[str] | set[str]) -> Failpoint | None:
    """Parse `action:state[:seconds]`; None for an empty value, FailpointError for a bad one."""
    text = text.strip()
    if not text:
        return None
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ACTIONS or parts[1] not in states:
        raise FailpointError(
            f"{ENV_VAR}={text!r}: expected pause-after:<state>[:seconds] or exit-after:<state> "
            f"with a state among {sorted(states)}"
        )
    seconds = DEFAULT_PAUSE_S
    if len(parts) == 3:
        try:
            seconds = float(parts[2])
        except ValueError:
            raise FailpointError(f"{ENV_VAR}={text!r}: seconds must be a number") from None
        if not seconds >= 0:
            raise FailpointError(f"{ENV_VAR}={text!r}: seconds must be >= 0")
    return Failpoint(parts[0], parts[1], seconds)


class FailpointHook:
    """The armed failpoint of this process (from the environment), fired at most once."""

    def __init__(self, states: frozenset[str]) -> None:
        """Read and validate EDGEFLEET_FAILPOINT; a bad value raises rather than being ignored."""
        self.point = parse_failpoint(os.environ.get(ENV_VAR, ""), states)

    def after_persist(self, state: str) -> None:
        """Pause or exit if the failpoint names `state` and has not fired yet."""
        point = self.point
        if point is None or point.state != state:
            return
        self.point = None
        if point.action == "exit-after":
            log.warning("failpoint: exiting after persisting %r", state)
            logging.shutdown()
            os._exit(EXIT_CODE)
        log.warning("failpoint: paused after persisting %r for %.1f s", state, point.seconds)
        time.sleep(point.seconds)
        log.warning("failpoint: resuming after %r", state)


# --------------------------------------------------------------------------- injected latency

LATENCY_ENV_VAR = "EDGEFLEET_INJECT_LATENCY_MS"
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class InjectedLatency:
    """Extra milliseconds per served invoke of the models whose sha256 starts with a prefix."""

    rules: tuple[tuple[str, float], ...]

    def delay_s(self, sha256: str) -> float:
        """Seconds to sleep per invoke of this model (the first matching prefix), else 0."""
        for prefix, ms in self.rules:
            if sha256.startswith(prefix):
                return ms / 1000.0
        return 0.0


def parse_injected_latency(text: str, env_var: str = LATENCY_ENV_VAR) -> InjectedLatency | None:
    """Parse `<sha-prefix>:<ms>[,...]`; None for an empty value, FailpointError for a bad one."""
    text = text.strip()
    if not text:
        return None
    rules: list[tuple[str, float]] = []
    for item in text.split(","):
        prefix, sep, ms_text = item.strip().partition(":")
        prefix = prefix.lower()
        if not sep or not 1 <= len(prefix) <= 64 or not set(prefix) <= _HEX:
            raise FailpointError(
                f"{env_var}={text!r}: expected <sha256 hex prefix>:<ms>[,...], "
                f"got {item.strip()!r}"
            )
        try:
            ms = float(ms_text)
        except ValueError:
            raise FailpointError(
                f"{env_var}={text!r}: {ms_text!r} is not a number of milliseconds"
            ) from None
        if not 0 <= ms <= 60_000:
            raise FailpointError(f"{env_var}={text!r}: ms must be 0..60000, got {ms}")
        rules.append((prefix, ms))
    return InjectedLatency(tuple(rules))


def injected_latency_from_env() -> InjectedLatency | None:
    """The slowdown EDGEFLEET_INJECT_LATENCY_MS asks for (read once at start), or None."""
    injected = parse_injected_latency(os.environ.get(LATENCY_ENV_VAR, ""))
    if injected is not None:
        log.warning("failpoint: injecting serving latency %s", injected.rules)
    return injected


# Same syntax, applied to the benchmark's invokes only (tests: a benchmark that takes long, to
# show SIGTERM is answered during one, without slowing what the device serves).
BENCHMARK_LATENCY_ENV_VAR = "EDGEFLEET_INJECT_BENCHMARK_LATENCY_MS"


class SlowedInterpreter:
    """An interpreter whose invoke() sleeps first; everything else is the wrapped one's."""

    def __init__(self, interpreter: Any, delay_s: float) -> None:
        """Wrap `interpreter`, adding `delay_s` before every invoke."""
        self._interpreter = interpreter
        self._delay_s = delay_s

    def invoke(self) -> None:
        """Sleep, then invoke."""
        time.sleep(self._delay_s)
        self._interpreter.invoke()

    def __getattr__(self, name: str) -> Any:
        """Every other attribute of the wrapped interpreter."""
        return getattr(self._interpreter, name)


def benchmark_slowdown_from_env() -> InjectedLatency | None:
    """The benchmark slowdown EDGEFLEET_INJECT_BENCHMARK_LATENCY_MS asks for, or None."""
    injected = parse_injected_latency(
        os.environ.get(BENCHMARK_LATENCY_ENV_VAR, ""), BENCHMARK_LATENCY_ENV_VAR
    )
    if injected is not None:
        log.warning("failpoint: injecting benchmark latency %s", injected.rules)
    return injected

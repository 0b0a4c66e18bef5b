"""Failpoint for fault tests: pause or exit right after an update state is persisted.

`EDGEFLEET_FAILPOINT=pause-after:<state>[:seconds]` sleeps (default 60 s) right after the agent
wrote `<state>` to update.json, so a test can SIGKILL it by PID at a known point;
`exit-after:<state>` ends the process there with os._exit (no cleanup, like a power cut).
It fires once per process. Unset, it is one `is None` check per transition.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

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

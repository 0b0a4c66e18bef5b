"""Pacing of downloads: how many devices may be fetching an artifact at once, and how many may
start per minute (AWS IoT Jobs' `maximumPerMinute`), whatever the rollouts ask for.

The controller publishes a device's desired state only when the pacer admits it; until then
the new generation waits in the database, unpublished. A device holds its slot from that
publication until its first update event past `fetching` (verifying, self-testing, active,
idle, ...) or an error, or until SLOT_TIMEOUT_S: the broker's memory for chunks in flight and
its fan-out work then scale with the window, not with the fleet (docs/rollouts.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent.protocol import Event

# Devices fetching at once by default. The devices in the window share the broker's (and, in a
# simulation, the simulator's) throughput B, so each gets a chunk every W × chunk / B seconds;
# that must stay well under the agents' 2 s repair interval, or silent devices re-subscribe
# chunks still queued for them and duplicate the traffic. Measured on this 2-vCPU machine
# (shared, load ~10; bench/RESULTS.md): B ≈ 35 MB/s; W = 1,000 gave 2.2 s per chunk, 4.8×
# duplicate deliveries and a 4.3 GiB broker, W = 200 gave 0.4 s, no repair at all, a 24 MiB
# broker and the same total time (the window is not what limits it). The broker's transient
# chunk copies scale with W: ~75 KiB per device for a 1 MiB artifact, ~2 MiB for an 8 MiB one
# (not bounded by MAX_INFLIGHT_BYTES; bench/RESULTS.md, "Broker memory in the fan-out").
DEFAULT_MAX_FETCHING = 200
# Devices started per minute by default: 0 = no rate limit, the window alone paces (AWS IoT
# Jobs caps at 1,000/min; this controller served 10,000 in a minute on 2 vCPUs, so a default
# rate would only slow rollouts down). Operators set one with `edgefleet up --fetch-rate`.
DEFAULT_PER_MINUTE = 0.0
# A device that neither reports progress nor fails within this long (offline, crashed, lost
# its events) gives its slot back: its rollout's own device timeout judges it, and a stuck
# device must not hold the fleet back. 120 s is 10× a 1 MiB download under load here.
SLOT_TIMEOUT_S = 120.0
# Update states that hold a slot: the download is still going.
_FETCHING_STATES = frozenset({"fetching"})


@dataclass
class PacerCounters:
    """What the pacer did (stats line, benchmarks)."""

    admitted: int = 0
    deferred: int = 0  # desired states held back by the window or the rate, per reconcile
    released: int = 0
    expired: int = 0
    peak_fetching: int = 0


class FetchPacer:
    """A concurrency window and a token bucket over devices starting a download."""

    def __init__(
        self,
        max_fetching: int = DEFAULT_MAX_FETCHING,
        per_minute: float = DEFAULT_PER_MINUTE,
        slot_timeout_s: float = SLOT_TIMEOUT_S,
    ) -> None:
        """`max_fetching` <= 0 means no window; `per_minute` <= 0 means no rate limit."""
        self.max_fetching = max_fetching
        self.per_minute = per_minute
        self.slot_timeout_s = slot_timeout_s
        self.counters = PacerCounters()
        # device id -> (generation, monotonic time its desired state was published)
        self._fetching: dict[str, tuple[int, float]] = {}
        # The bucket holds at most one minute's worth (a burst as large as the rate), as AWS.
        self._tokens = per_minute
        self._filled_at: float | None = None  # set by the first refill

    @property
    def fetching(self) -> int:
        """Devices holding a slot now."""
        return len(self._fetching)

    def _refill(self, now: float) -> None:
        """Add tokens for the time since the last refill, up to one minute's worth."""
        elapsed = 0.0 if self._filled_at is None else max(0.0, now - self._filled_at)
        if self.per_minute > 0:
            self._tokens = min(self.per_minute, self._tokens + elapsed * self.per_minute / 60.0)
        self._filled_at = now

    def begin(self, now: float | None = None) -> None:
        """Before a round of admit() calls (one reconcile): refill the bucket, expire slots."""
        now = time.monotonic() if now is None else now
        self._refill(now)
        self._expire(now)

    def budget(self) -> int | None:
        """How many more devices could be admitted now (None: no limit at all)."""
        limits = []
        if self.max_fetching > 0:
            limits.append(max(0, self.max_fetching - len(self._fetching)))
        if self.per_minute > 0:
            limits.append(int(self._tokens))
        return min(limits) if limits else None

    def admit(self, device_id: str, generation: int, now: float | None = None) -> bool:
        """Whether this device may be sent a desired state that makes it download, now; if so
        it holds a slot from here on. A device already holding one (a newer generation) keeps
        it without a new token."""
        now = time.monotonic() if now is None else now
        if device_id in self._fetching:
            self._fetching[device_id] = (generation, now)
            return True
        window_full = 0 < self.max_fetching <= len(self._fetching)
        if window_full or (self.per_minute > 0 and self._tokens < 1.0):
            self.counters.deferred += 1
            return False
        if self.per_minute > 0:
            self._tokens -= 1.0
        self._fetching[device_id] = (generation, now)
        self.counters.admitted += 1
        self.counters.peak_fetching = max(self.counters.peak_fetching, len(self._fetching))
        return True

    def on_event(self, event: Event) -> None:
        """A device's event: past `fetching` (or failed) for its generation frees its slot."""
        slot = self._fetching.get(event.device_id)
        if slot is None:
            return
        if event.generation is not None and event.generation < slot[0]:
            return  # about an older generation: the new download is still going
        if event.kind == "error" or (
            event.state is not None and event.state not in _FETCHING_STATES
        ):
            del self._fetching[event.device_id]
            self.counters.released += 1

    def _expire(self, now: float) -> None:
        """Free the slots of devices silent for slot_timeout_s."""
        if not self._fetching:
            return
        oldest = min(t for _, t in self._fetching.values())
        if now - oldest < self.slot_timeout_s:
            return
        for device_id, (_, t) in list(self._fetching.items()):
            if now - t >= self.slot_timeout_s:
                del self._fetching[device_id]
                self.counters.expired += 1

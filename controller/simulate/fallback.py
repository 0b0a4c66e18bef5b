"""The fallback of a simulated agent: installed next to the active model, switched to once.

As docs/closed-loop.md ("Fallback variant") describes for the real agent: after the primary
activates, the fallback named by the desired state is fetched through the normal chunk path and
self-tested without serving it. Every fifth of `window_s` the agent looks at the served p95 of
its active model (the figure its telemetry reports); once each of five fifths in a row had at
least MIN_REQUESTS requests with a p95 above the budget, it switches to the fallback and reports
a `fallback` event `g<generation>-fallback`. It never switches back by itself.
"""

from __future__ import annotations

import logging
import math
import random
import time
from statistics import NormalDist
from typing import TYPE_CHECKING

import firmware_profiles
from agent.protocol import AgentState, BenchmarkReport, Desired, Fallback
from controller.simulate.download import ArtifactFetch, StoredModel, Update
from controller.simulate.telemetry import MAX_BUSY_SHARE, SERVED_RATE_PER_S, SERVED_SIGMA

log = logging.getLogger("controller.simulate")

# The window is judged in fifths: a breach must hold through all of them, not be one burst.
WINDOW_PARTS = 5
# A fifth with fewer served requests than this says nothing about p95 (the agent's rule).
MIN_REQUESTS = 5
# Served p95 over served p50: the telemetry's log-normal spread (telemetry.SERVED_SIGMA).
_P95_OVER_P50 = math.exp(NormalDist().inv_cdf(0.95) * SERVED_SIGMA)


def served_p95(p50: float) -> float:
    """p95 of served requests whose median is `p50` (the telemetry's distribution)."""
    return p50 * _P95_OVER_P50


def requests_in(seconds: float, rate_per_s: float, mean_ms: float) -> int:
    """Requests served in `seconds`: the device's rate, capped by one core's capacity."""
    capacity = MAX_BUSY_SHARE * seconds * 1000.0 / mean_ms if mean_ms > 0 else math.inf
    return int(min(rate_per_s * seconds, capacity))


class FallbackWatch:
    """A self-tested fallback waiting next to the active model, and the breach streak so far."""

    __slots__ = ("desired", "entry", "fallback", "primary", "sha", "streak")

    def __init__(self, desired: Desired, fallback: Fallback, entry: StoredModel, primary: str):
        """Watch `primary` (the active sha) with `fallback` ready; no breach seen yet."""
        self.desired = desired
        self.fallback = fallback
        self.sha = fallback.artifact.sha256
        self.entry = entry
        self.primary = primary
        self.streak = 0


class FallbackSwitch(ArtifactFetch):
    """The fallback half of a simulated agent: install, watch the served p95, switch once."""

    # The watch of the active model lives here; SimAgent declares every other slot.
    __slots__ = ("fallback",)
    fallback: FallbackWatch | None

    if TYPE_CHECKING:
        profile: firmware_profiles.Profile
        current: str | None

        def emit(
            self,
            kind: str,
            message: str,
            *,
            event_id: str | None = None,
            desired: Desired | None = None,
            stage: AgentState | None = None,
            benchmark: BenchmarkReport | None = None,
        ) -> None: ...
        def _figures(self, sha: str, entry: StoredModel) -> tuple[float, float]: ...
        def _judge(self, desired: Desired, latency: float, peak: float) -> str: ...
        def _make_current(self, sha: str, entry: StoredModel, detail: str) -> None: ...
        def _deadline(self, upd: Update) -> None: ...

    def _install_fallback(self, desired: Desired) -> None:
        """After activation: fetch the desired state's fallback (no status or update events)."""
        self.fallback = None
        artifact = desired.artifact
        if desired.fallback is None or artifact is None or self.current != artifact.sha256:
            return
        upd = self.update = Update(desired, desired.fallback)
        upd.deadline = time.monotonic() + self.sim.fetch_timeout_s
        self._wait_manifest(upd, upd.sha)
        self.sim.call_at(upd.deadline, lambda: self._deadline(upd))

    def _fallback_downloaded(self, upd: Update) -> None:
        """The fallback is verified: self-test it with its threads, then start watching."""
        fallback, manifest, primary = upd.fallback, upd.model_manifest, upd.desired.artifact
        assert fallback is not None and manifest is not None and primary is not None
        self.update = None
        if self.current != primary.sha256:
            self._fallback_failed(upd, "the primary model no longer serves (rolled back)")
            return
        golden = manifest.golden.sha256 if manifest.golden else None
        entry = StoredModel(manifest.size, golden, manifest.recipe, fallback.threads)
        latency, peak = self._figures(upd.sha, entry)
        reason = self._judge(upd.desired, latency, peak)
        if reason:
            self._fallback_failed(upd, f"self-test failed: {reason}")
            return
        watch = self.fallback = FallbackWatch(upd.desired, fallback, entry, primary.sha256)
        self.sim.counters.fallbacks_ready += 1
        self._arm_check(watch)

    def _fallback_failed(self, upd: Update, reason: str) -> None:
        """The fallback could not be installed: the primary keeps serving, no switch later."""
        if self.update is upd:
            self.update = None
        self.fallback = None
        self.sim.counters.fallbacks_failed += 1
        log.info("%s: fallback %s not installed: %s", self.device_id, upd.sha[:12], reason)

    def _arm_check(self, watch: FallbackWatch) -> None:
        """Look at the served p95 again one fifth of the window from now."""
        when = time.monotonic() + watch.fallback.window_s / WINDOW_PARTS
        self.sim.call_at(when, lambda: self._check_fallback(watch))

    def _check_fallback(self, watch: FallbackWatch) -> None:
        """One fifth of the window: extend or reset the breach streak; switch after five."""
        if self.fallback is not watch or self.sim.stopping:
            return
        if self.current != watch.primary or self.current not in self.models:
            self.fallback = None  # rolled back or replaced: nothing to watch any more
            return
        p50, _ = self._figures(self.current, self.models[self.current])
        p95 = served_p95(p50)
        fifth_s = watch.fallback.window_s / WINDOW_PARTS
        rate = random.Random(f"{self.sim.seed}:{self.device_id}").uniform(*SERVED_RATE_PER_S)
        count = requests_in(fifth_s, rate, p50 * math.exp(SERVED_SIGMA * SERVED_SIGMA / 2))
        if count >= MIN_REQUESTS and p95 > watch.fallback.latency_ms:
            watch.streak += 1
        else:
            watch.streak = 0
        if watch.streak >= WINDOW_PARTS:
            self._switch(watch, p95)
            return
        self._arm_check(watch)

    def _switch(self, watch: FallbackWatch, p95: float) -> None:
        """Serve the fallback with its threads from now on, keep it as current, report it."""
        old = self.current
        assert old is not None
        self.fallback = None
        budget, window = watch.fallback.latency_ms, watch.fallback.window_s
        detail = (
            f"fell back from {old[:12]} to {watch.sha[:12]}: served p95 {p95:.3f} ms "
            f"over budget {budget:.3f} ms for {window:g} s"
        )
        self._make_current(watch.sha, watch.entry, detail)
        message = (
            f"fallback: switched from {old} to {watch.sha} (threads {watch.entry.threads}): "
            f"served p95 {p95:.3f} ms over budget {budget:.3f} ms for {window:g} s"
        )
        gen = watch.desired.generation
        self.emit("fallback", message, event_id=f"g{gen}-fallback", desired=watch.desired)
        self.sim.counters.fallbacks += 1

"""On-device fallback: watch served latency, switch once to a lighter, self-tested variant.

The desired state may name a fallback (docs/closed-loop.md, "Fallback variant"). After the primary
is active, `FallbackSwitch.arm()` fetches and self-tests it without serving it, and installs a
`LatencyWatch` on the inference service's observer. When each fifth of `window_s` had at least
5 requests and a p95 above the budget, the watch queues an `EngageFallback` work item; the
daemon's work thread (never the serving thread) then loads and serves the fallback, makes it the
current model on disk and reports a `fallback` event.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from agent.protocol import Desired
from agent.runtime import ModelLoadError
from agent.selftest import run_selftest, tighter_budget
from agent.update.errors import Superseded, UpdateFailed
from agent.update.record import ArmedFallback

if TYPE_CHECKING:
    from agent.metrics import ServingMetrics
    from agent.protocol.config import AgentConfig
    from agent.staging import ArtifactStager
    from agent.store import ModelStore
    from agent.update.record import UpdateStateFile

log = logging.getLogger(__name__)

# The window is judged in this many consecutive slices; every one of them must breach, so a
# short burst (one slow slice) never switches models.
SLICES = 5
# Fewer requests than this in a slice say nothing about its p95: the slice does not breach.
MIN_REQUESTS = 5
# Raw latencies kept per slice for its p95: 10,000 doubles (80 KB) cover 2,000 requests/s in a
# 5 s slice; past that the slice's first 10,000 requests stand for it (count checks stay exact).
MAX_SLICE_SAMPLES = 10_000


@dataclass(frozen=True)
class Breach:
    """A sustained breach: the p95 (ms) of each of the consecutive slices, oldest first."""

    p95_ms: tuple[float, ...]
    budget_ms: float
    window_s: float


class LatencyWatch:
    """Decides, from served request latencies, when the budget was breached for a whole window.

    `observe()` is on the serving hot path: a clock read, a lock and an append; a slice's p95 is
    computed only when enough of its requests were over budget for it to breach. The watch
    fires `on_breach` once (from the observing thread, outside its lock) and then goes quiet.
    """

    def __init__(
        self,
        budget_ms: float,
        window_s: float,
        on_breach: Callable[[Breach], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        slices: int = SLICES,
        min_requests: int = MIN_REQUESTS,
        max_samples: int = MAX_SLICE_SAMPLES,
    ) -> None:
        """Start the first slice now (by `clock`)."""
        if not budget_ms > 0 or not window_s > 0 or slices < 1 or min_requests < 1:
            raise ValueError("need budget_ms > 0, window_s > 0, slices >= 1, min_requests >= 1")
        self.budget_ms = float(budget_ms)
        self.window_s = float(window_s)
        self._on_breach = on_breach
        self._clock = clock
        self._slices = slices
        self._min_requests = min_requests
        self._max_samples = max_samples
        self._slice_s = self.window_s / slices
        self._lock = threading.Lock()
        self._start = clock()
        self._index = 0
        self._end = self._start + self._slice_s
        self._streak: list[float] = []
        self._fired = False
        self._new_slice()

    @property
    def fired(self) -> bool:
        """Whether the breach was reported (the watch ignores everything after that)."""
        return self._fired

    def _new_slice(self) -> None:
        """Empty counters and samples for the next slice (lock held or not yet shared)."""
        self._samples: array[float] = array("d")
        self._count = 0
        self._over = 0

    def observe(self, latency_ms: float) -> None:
        """Count one served request's latency; may fire the breach callback once."""
        now = self._clock()
        breach = None
        with self._lock:
            if self._fired:
                return
            if now >= self._end:
                breach = self._close(now)
            if breach is None:
                self._count += 1
                if latency_ms > self.budget_ms:
                    self._over += 1
                if len(self._samples) < self._max_samples:
                    self._samples.append(latency_ms)
        if breach is not None:
            self._on_breach(breach)

    def _slice_p95(self) -> float | None:
        """The closing slice's p95 when it breaches the budget, else None."""
        n = self._count
        if n < self._min_requests:
            return None
        # numpy's linear p95 lies at or below the sorted value at index ceil(0.95 (n-1)); that
        # value exceeds the budget only if at least n - that index requests did.
        if self._over < n - math.ceil(0.95 * (n - 1)):
            return None
        p95 = float(np.percentile(np.frombuffer(self._samples, dtype=np.float64), 95))
        return p95 if p95 > self.budget_ms else None

    def _close(self, now: float) -> Breach | None:
        """Judge the ended slice and start the one `now` falls in; Breach after SLICES in a row."""
        p95 = self._slice_p95()
        if p95 is None:
            self._streak.clear()
        else:
            self._streak.append(p95)
        index = int((now - self._start) // self._slice_s)
        if index > self._index + 1:
            self._streak.clear()  # slices without a single request lie in between
        self._index = index
        self._end = self._start + (index + 1) * self._slice_s
        self._new_slice()
        if len(self._streak) < self._slices:
            return None
        self._fired = True
        return Breach(tuple(self._streak[-self._slices :]), self.budget_ms, self.window_s)


class WatchingObserver:
    """The inference service's observer: ServingMetrics, plus the armed LatencyWatch if any.

    Cache hits are not watched: they never reach the model, so switching models cannot help them.
    """

    def __init__(self, metrics: ServingMetrics) -> None:
        """Forward everything to `metrics`; `watch` is set while a fallback is armed."""
        self.metrics = metrics
        self.watch: LatencyWatch | None = None
        self.observe_invocation = metrics.observe_invocation
        self.observe_error = metrics.observe_error

    def observe_request(self, latency_ms: float, *, cache_hit: bool = False) -> None:
        """Record the request in the metrics and, when armed and not a cache hit, the watch."""
        self.metrics.observe_request(latency_ms, cache_hit=cache_hit)
        watch = self.watch
        if watch is not None and not cache_hit:
            watch.observe(latency_ms)


@dataclass(frozen=True)
class EngageFallback:
    """Work item: the watch of `generation`'s fallback `sha256` saw a sustained breach."""

    generation: int
    sha256: str
    breach: Breach


class FallbackSwitch:
    """Arms, engages and reports the desired state's fallback for the daemon (its work thread)."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        store: ModelStore,
        stager: ArtifactStager,
        state: UpdateStateFile,
        observer: WatchingObserver,
        serving_sha: Callable[[], str | None],
        serve: Callable[[str, int | None], None],
        emit: Callable[..., bool],
        publish_status: Callable[[], None],
        enqueue: Callable[[EngageFallback], None],
    ) -> None:
        """Work on the daemon's store, state and inference service through these callables."""
        self.config = config
        self.store = store
        self.stager = stager
        self.state = state
        self.observer = observer
        self._serving_sha = serving_sha
        self._serve = serve
        self._emit = emit
        self._publish_status = publish_status
        self._enqueue = enqueue
        # A desired state whose fallback waits for the primary's report to be acknowledged.
        self._pending: tuple[Desired, Callable[[], bool]] | None = None

    def threads(self, fallback: ArmedFallback) -> int | None:
        """Interpreter threads of the fallback: its own, else the agent's setting."""
        return fallback.threads if fallback.threads is not None else self.config.threads

    def disarm(self, keep: frozenset[str] = frozenset()) -> None:
        """Stop watching and forget the fallback; its model is deleted unless a pointer or
        `keep` (what the next desired state needs) references it."""
        self.observer.watch = None
        self.store.pinned = frozenset()
        self._pending = None
        armed = self.state.record.fallback
        if armed is None:
            return
        self.state.update(fallback=None)
        if armed.sha256 not in keep:
            self.store.discard(armed.sha256)

    def arm(self, desired: Desired, cancelled: Callable[[], bool]) -> None:
        """Fetch and self-test the desired fallback (not served), then watch served latency.

        Called once the primary is active and reported; a fallback that cannot be fetched or
        fails its self-test is reported as an error and the primary stays active.
        """
        wanted = desired.fallback
        record = self.state.record
        if wanted is None or desired.artifact is None:
            return
        if (
            record.generation != desired.generation
            or record.state != "active"
            or self._serving_sha() != desired.artifact.sha256
        ):
            return  # the primary did not become active: nothing to fall back from
        if not (record.reported and record.benchmarked):
            # The controller judges the primary on its activation and benchmark: a switch
            # before those are acknowledged would hide them. Armed after the next report.
            self._pending = (desired, cancelled)
            return
        self._pending = None
        sha = wanted.artifact.sha256
        if record.fallback is not None:
            return  # armed (or engaged) already for this generation
        armed = ArmedFallback(
            sha256=sha,
            latency_ms=wanted.latency_ms,
            window_s=wanted.window_s,
            threads=wanted.threads,
            primary_sha256=desired.artifact.sha256,
        )
        self.store.pinned = frozenset({sha})
        try:
            fetched = self.stager.fetch(wanted.artifact, self.config.fetch_timeout_s, cancelled)
            self.stager.verify(fetched)
            result = run_selftest(
                self.store.path(sha),
                threads=self.threads(armed),
                timeout_s=self.config.selftest_timeout_s,
                golden=self.store.golden_path(sha) if fetched.golden else None,
                latency_budget_ms=tighter_budget(
                    self.config.latency_budget_ms, desired.latency_budget_ms
                ),
                memory_budget_mb=tighter_budget(
                    self.config.memory_budget_mb, desired.memory_budget_mb
                ),
            )
            if not result.ok:
                raise UpdateFailed(f"self-test failed: {result.reason}")
        except Superseded:
            self.store.pinned = frozenset()
            return  # a newer generation decides what to fall back to
        except Exception as exc:  # a fallback problem must never touch the active primary
            log.warning("fallback %s not armed: %s", sha[:12], exc)
            self.store.pinned = frozenset()
            if sha != self._serving_sha():
                self.store.discard(sha)
            # No deployment/generation on purpose: a controller reads an error of the generation
            # as a failed update, and the primary's update did not fail.
            self._emit(
                "error",
                f"generation {desired.generation}: fallback {sha[:12]} not armed: {exc}; "
                f"{desired.artifact.sha256[:12]} stays active",
            )
            return
        self.state.update(fallback=armed)
        self._watch(armed, desired.generation)
        log.info(
            "fallback %s armed: budget p95 %g ms over %g s (threads %s)",
            sha[:12],
            armed.latency_ms,
            armed.window_s,
            self.threads(armed),
        )

    def restore(self) -> None:
        """After a restart: keep the fallback's model, and watch again unless it was engaged."""
        record = self.state.record
        armed = record.fallback
        if armed is None:
            return
        self.store.pinned = frozenset({armed.sha256})
        if armed.engaged or record.state != "active":
            return
        if self._serving_sha() != armed.primary_sha256 or not self.store.has(armed.sha256):
            log.warning("fallback %s not re-armed: its primary is not serving", armed.sha256[:12])
            return
        self._watch(armed, record.generation)
        log.info("fallback %s re-armed after restart", armed.sha256[:12])

    def _watch(self, armed: ArmedFallback, generation: int) -> None:
        """Install a fresh LatencyWatch whose breach queues an EngageFallback work item."""
        sha = armed.sha256

        def on_breach(breach: Breach) -> None:
            self._enqueue(EngageFallback(generation, sha, breach))

        self.observer.watch = LatencyWatch(armed.latency_ms, armed.window_s, on_breach)

    def engage(self, item: EngageFallback) -> None:
        """Serve the fallback (work thread), make it current on disk, record and report it."""
        record = self.state.record
        armed = record.fallback
        if (
            armed is None
            or armed.engaged
            or armed.sha256 != item.sha256
            or record.generation != item.generation
            or record.state != "active"
        ):
            log.info("ignoring a latency breach of a fallback that is no longer armed")
            return
        self.observer.watch = None
        primary = armed.primary_sha256 or self._serving_sha() or "?"
        threads = self.threads(armed)
        try:
            self._serve(armed.sha256, threads)
        except (ModelLoadError, OSError) as exc:
            self.disarm()
            self._emit(  # like an arming failure: not an error of the generation's update
                "error",
                f"generation {record.generation}: fallback {armed.sha256[:12]} not engaged: "
                f"it does not load: {exc}; {primary[:12]} keeps serving",
            )
            return
        self.store.activate(armed.sha256)
        p95 = item.breach.p95_ms
        message = (
            f"fell back from {primary[:12]} to {armed.sha256[:12]} (threads {threads}): served p95 "
            f"{min(p95):.2f}-{max(p95):.2f} ms over the {armed.latency_ms:g} ms budget in each "
            f"of {len(p95)} slices of the {armed.window_s:g} s window"
        )
        log.warning("%s", message)
        self.state.update(
            sha256=armed.sha256,
            serving_sha256=armed.sha256,
            serving_threads=threads,
            # The primary no longer serves: its post-activation benchmark cannot be taken now.
            benchmarked=True,
            detail=message,
            fallback=replace(armed, engaged=True, message=message, p95_ms=max(p95)),
        )
        self._publish_status()
        self.report()

    def report(self) -> None:
        """Arm a fallback held back until the primary was reported, and send a pending switch.

        The fallback event (id g<generation>-fallback) is sent until the broker acknowledges it.
        """
        if self._pending is not None:
            desired, cancelled = self._pending
            self.arm(desired, cancelled)
        record = self.state.record
        armed = record.fallback
        if armed is None or not armed.engaged or armed.reported or record.deployment_id is None:
            return
        if self._emit(
            "fallback",
            armed.message,
            deployment_id=record.deployment_id,
            generation=record.generation,
            suffix="fallback",
            wait=True,
        ):
            self.state.update(fallback=replace(armed, reported=True))

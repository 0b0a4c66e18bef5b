"""On-device fallback: the latency watch, its persistence, the injected slowdown, the daemon flow.

The daemon tests use the in-memory broker of tests/memory_agent.py: the update flow, the
child-process self-test and the real .tflite models run for real; only the network is in memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.daemon import Agent
from agent.failpoint import FailpointError, parse_injected_latency
from agent.fallback import Breach, EngageFallback, LatencyWatch, WatchingObserver
from agent.metrics import ServingMetrics
from agent.protocol import ArtifactRef, Fallback, Manifest
from agent.runtime import load_interpreter
from agent.serving import ServingModel
from agent.store import ModelStore
from agent.update.record import ArmedFallback, UpdateStateFile
from agent.update.table import UpdateEvent
from tests.memory_agent import NEW, OLD, MemoryBroker, apply_desired, make_desired

pytestmark = pytest.mark.agent

SHA_A = "a" * 64


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        """Start at 1000 s."""
        self.now = 1000.0

    def __call__(self) -> float:
        """The current fake time."""
        return self.now


def _watch(
    clock: FakeClock, budget: float = 10.0, window: float = 5.0
) -> tuple[LatencyWatch, list[Breach]]:
    """A watch on the fake clock that records its breaches."""
    fired: list[Breach] = []
    return LatencyWatch(budget, window, fired.append, clock=clock), fired


def _feed(watch: LatencyWatch, clock: FakeClock, slices: int, latencies: list[float]) -> None:
    """Serve `latencies` in each of `slices` consecutive 1 s slices (window 5 s)."""
    for _ in range(slices):
        start = clock.now
        for i, latency in enumerate(latencies):
            clock.now = start + 0.9 * i / len(latencies)
            watch.observe(latency)
        clock.now = start + 1.0


# ------------------------------------------------------------------------- LatencyWatch


def test_watch_fires_once_after_five_breaching_slices() -> None:
    clock = FakeClock()
    watch, fired = _watch(clock)
    _feed(watch, clock, 5, [30.0] * 6)
    assert fired == []  # the fifth slice is judged when the next request arrives
    watch.observe(30.0)
    assert len(fired) == 1
    assert fired[0].p95_ms == (30.0,) * 5
    assert (fired[0].budget_ms, fired[0].window_s) == (10.0, 5.0)
    _feed(watch, clock, 6, [30.0] * 6)
    assert len(fired) == 1 and watch.fired


def test_watch_needs_every_slice_to_breach() -> None:
    clock = FakeClock()
    watch, fired = _watch(clock)
    _feed(watch, clock, 4, [30.0] * 6)
    _feed(watch, clock, 1, [1.0] * 6)  # one healthy slice resets the streak
    _feed(watch, clock, 4, [30.0] * 6)
    watch.observe(30.0)
    assert fired == []
    _feed(watch, clock, 1, [30.0] * 6)
    watch.observe(30.0)
    assert len(fired) == 1


def test_watch_ignores_slices_with_fewer_than_five_requests() -> None:
    clock = FakeClock()
    watch, fired = _watch(clock)
    _feed(watch, clock, 10, [30.0] * 4)
    watch.observe(30.0)
    assert fired == []


def test_watch_empty_slices_break_the_streak() -> None:
    clock = FakeClock()
    watch, fired = _watch(clock)
    _feed(watch, clock, 3, [30.0] * 6)
    clock.now += 2.0  # two slices without a request
    _feed(watch, clock, 2, [30.0] * 6)
    watch.observe(30.0)
    assert fired == []
    _feed(watch, clock, 3, [30.0] * 6)
    watch.observe(30.0)
    assert len(fired) == 1


def test_watch_p95_not_mean_decides() -> None:
    """A few slow requests (under 5 %) do not breach; a slow tail over 5 % does."""
    clock = FakeClock()
    watch, fired = _watch(clock)
    mostly_fast = [1.0] * 97 + [100.0] * 3  # p95 = 1 ms, mean 4 ms
    _feed(watch, clock, 6, mostly_fast)
    assert fired == []
    slow_tail = [1.0] * 90 + [100.0] * 10  # p95 = 100 ms
    _feed(watch, clock, 5, slow_tail)
    watch.observe(1.0)
    assert len(fired) == 1
    assert all(p == pytest.approx(100.0) for p in fired[0].p95_ms)


def test_watch_budget_boundary_is_strict() -> None:
    clock = FakeClock()
    watch, fired = _watch(clock)
    _feed(watch, clock, 6, [10.0] * 8)  # exactly at the budget: not above it
    assert fired == []


def test_watch_refuses_bad_settings() -> None:
    with pytest.raises(ValueError):
        LatencyWatch(0.0, 5.0, lambda b: None)
    with pytest.raises(ValueError):
        LatencyWatch(10.0, 0.0, lambda b: None)


def test_observer_feeds_metrics_and_watch_but_not_cache_hits() -> None:
    clock = FakeClock()
    metrics = ServingMetrics()
    observer = WatchingObserver(metrics)
    observer.observe_request(5.0)  # nothing armed: metrics only
    watch, fired = _watch(clock)
    observer.watch = watch
    for _ in range(7):
        start = clock.now
        for i in range(6):
            clock.now = start + 0.1 * i
            observer.observe_request(30.0, cache_hit=True)
        clock.now = start + 1.0
    assert fired == []  # cache hits never reach the model
    for _ in range(6):
        start = clock.now
        for i in range(6):
            clock.now = start + 0.1 * i
            observer.observe_request(30.0)
        clock.now = start + 1.0
    assert len(fired) == 1
    stats = metrics.snapshot_and_reset()
    assert stats.requests == 1 + 42 + 36 and stats.cache_hits == 42


# ------------------------------------------------------------------------- persistence


def test_old_update_json_without_the_new_fields_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "update.json"
    path.write_text(
        json.dumps({"state": "active", "generation": 3, "sha256": SHA_A, "applied_generation": 3})
    )
    state = UpdateStateFile(path)
    assert state.problem is None
    record = state.record
    assert (record.serving_sha256, record.serving_threads, record.fallback) == (None, None, None)


def test_fallback_and_serving_threads_survive_a_reload(tmp_path: Path) -> None:
    path = tmp_path / "update.json"
    state = UpdateStateFile(path)
    armed = ArmedFallback(
        sha256="b" * 64, latency_ms=12.5, window_s=30.0, threads=2, primary_sha256=SHA_A
    )
    state.fire(UpdateEvent.SERVING, sha256=SHA_A, serving_sha256=SHA_A, serving_threads=4)
    state.update(fallback=armed)
    again = UpdateStateFile(path)
    assert again.problem is None
    assert again.record.fallback == armed
    assert (again.record.serving_sha256, again.record.serving_threads) == (SHA_A, 4)


@pytest.mark.parametrize(
    "fallback",
    [
        {"sha256": "b" * 64, "latency_ms": "fast", "window_s": 5.0},
        {"sha256": "b" * 64, "latency_ms": 0, "window_s": 5.0},
        {"latency_ms": 10, "window_s": 5.0},
        {"sha256": "b" * 64, "latency_ms": 10, "window_s": 5.0, "surprise": 1},
        "b" * 64,
    ],
)
def test_a_damaged_fallback_record_is_quarantined(tmp_path: Path, fallback: Any) -> None:
    path = tmp_path / "update.json"
    path.write_text(json.dumps({"state": "active", "fallback": fallback}))
    state = UpdateStateFile(path)
    assert state.problem is not None and "fallback" in state.problem
    assert state.record.fallback is None


def test_a_pinned_model_is_not_discarded(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    source = tmp_path / "m.tflite"
    source.write_bytes(OLD.read_bytes())
    sha = __import__("hashlib").sha256(OLD.read_bytes()).hexdigest()
    store.add_verified(sha, source)
    store.pinned = frozenset({sha})
    store.discard(sha)
    assert store.has(sha)
    store.pinned = frozenset()
    store.discard(sha)
    assert not store.has(sha)


# ------------------------------------------------------------------------- injected latency


def test_injected_latency_parses_prefixes_and_milliseconds() -> None:
    assert parse_injected_latency("") is None
    injected = parse_injected_latency(" ABC1:30, 0f:2.5 ")
    assert injected is not None
    assert injected.rules == (("abc1", 30.0), ("0f", 2.5))
    assert injected.delay_s("abc1" + "0" * 60) == pytest.approx(0.030)
    assert injected.delay_s("0f" + "0" * 62) == pytest.approx(0.0025)
    assert injected.delay_s("ff" * 32) == 0.0


@pytest.mark.parametrize("text", ["abc", "abc:", "xyz:10", "abc:ten", "abc:-1", ":5", "a:1e9"])
def test_injected_latency_refuses_bad_values_clearly(text: str) -> None:
    with pytest.raises(FailpointError, match="EDGEFLEET_INJECT_LATENCY_MS"):
        parse_injected_latency(text)


def test_injected_latency_slows_only_the_matching_served_model() -> None:
    sha = "c" * 64
    serving = ServingModel(parse_injected_latency("cc:40"))
    serving.swap(load_interpreter(OLD, 1), sha, 1.0)
    inputs = [np.zeros(d["shape"], d["dtype"]) for d in serving.input_details()]
    assert serving.infer(inputs).latency_ms >= 40.0
    serving.swap(load_interpreter(OLD, 1), "d" * 64, 1.0)
    assert serving.infer(inputs).latency_ms < 40.0


# ------------------------------------------------------------------------- daemon flow

MakeAgent = Callable[..., tuple[Agent, MemoryBroker]]


def _fallback(manifest: Manifest, **kw: Any) -> Fallback:
    """A fallback on `manifest` with a 10 ms budget over the shortest window."""
    ref = ArtifactRef(manifest.sha256, manifest.size, manifest.name, manifest.version)
    return Fallback(artifact=ref, **{"latency_ms": 10.0, "window_s": 1.0, **kw})


def test_threads_per_artifact_and_reload_without_download(make_agent: MakeAgent) -> None:
    agent, broker = make_agent()
    old = broker.offer(OLD.read_bytes())
    apply_desired(agent, make_desired(1, old, threads=2))
    benchmark = broker.events(event_id="g1-benchmark")[0]["benchmark"]
    assert benchmark["threads"] == 2 and agent.local.threads == 2
    assert agent.state.record.serving_threads == 2
    apply_desired(agent, make_desired(2, old, threads=1))
    assert broker.events(event_id="g2-fetching") == []  # no download, no self-test
    assert broker.events(event_id="g2-active")
    assert broker.events(event_id="g2-benchmark")[0]["benchmark"]["threads"] == 1
    # None = the agent's own setting (1): nothing to reload.
    apply_desired(agent, make_desired(3, old))
    assert broker.events(event_id="g3-active")[0]["message"].startswith("activated (already")
    apply_desired(agent, make_desired(4, old, threads=2))
    assert broker.events(event_id="g4-benchmark")[0]["benchmark"]["threads"] == 2
    restarted, _ = make_agent(broker)  # configured threads = 1
    assert restarted.local.threads == 2  # serves with the threads it was activated with


def test_a_reload_with_other_threads_is_self_tested_against_the_budgets(
    make_agent: MakeAgent,
) -> None:
    agent, broker = make_agent()
    old = broker.offer(OLD.read_bytes())
    apply_desired(agent, make_desired(1, old, threads=1))
    # No process fits 1 MB.
    apply_desired(agent, make_desired(2, old, threads=2, memory_budget_mb=1.0))
    (failed,) = broker.events(event_id="g2-failed")
    assert failed["stage"] == "self-testing", failed  # a verdict, not retried as transport
    assert "self-test with threads 2 failed" in failed["message"]
    assert agent.local.threads == 1 and agent.serving.sha256 == old.sha256  # unchanged


def test_fallback_is_armed_engaged_once_and_kept_after_restart(make_agent: MakeAgent) -> None:
    agent, broker = make_agent()
    old, new = broker.offer(OLD.read_bytes()), broker.offer(NEW.read_bytes())
    apply_desired(agent, make_desired(1, old, fallback=_fallback(new, threads=2)))
    armed = agent.state.record.fallback
    assert armed is not None and armed.sha256 == new.sha256 and not armed.engaged
    assert agent.serving.sha256 == old.sha256  # self-tested, not served
    assert agent.store.has(new.sha256) and new.sha256 not in vars(agent.store.pointers()).values()
    assert agent.local.observer.watch is not None
    # Served requests over budget in every 0.2 s slice of the 1 s window: the watch queues the
    # switch for the work thread (nothing switches on the serving thread).
    deadline = time.monotonic() + 5.0
    while agent.inbox.queue.empty() and time.monotonic() < deadline:
        agent.local.observer.observe_request(25.0)
        time.sleep(0.005)
    item = agent.inbox.queue.get_nowait()
    assert isinstance(item, EngageFallback) and item.sha256 == new.sha256
    assert agent.serving.sha256 == old.sha256
    agent.fallback.engage(item)
    agent.fallback.engage(item)  # a second breach report has no effect
    assert agent.serving.sha256 == new.sha256 and agent.local.threads == 2
    assert agent.store.pointers().current == new.sha256
    assert agent.store.pointers().previous == old.sha256
    events = broker.events(kind="fallback")
    assert len(events) == 1
    event = events[0]
    assert event["event_id"] == "g1-fallback" and event["generation"] == 1
    assert event["model_sha256"] == new.sha256 and event["deployment_id"] == "dep-1"
    assert old.sha256[:12] in event["message"] and new.sha256[:12] in event["message"]
    assert "10 ms budget" in event["message"]
    record = agent.state.record
    assert record.fallback is not None and record.fallback.engaged and record.fallback.reported
    status = json.loads(broker.retained[broker.topics.status("dev-u")])
    assert status["model_sha256"] == new.sha256

    restarted, _ = make_agent(broker)
    assert restarted.serving.sha256 == new.sha256 and restarted.local.threads == 2
    assert restarted.state.record.state == "active"
    assert restarted.local.observer.watch is None  # engaged: nothing left to watch
    restarted.reporter.report_outcome()
    restarted.fallback.report()
    assert len(broker.events(kind="fallback")) == 1

    # The next desired generation decides: back to the primary, the fallback disarmed.
    apply_desired(restarted, make_desired(2, old))
    assert restarted.serving.sha256 == old.sha256
    assert restarted.state.record.fallback is None


def test_restart_re_arms_an_armed_fallback(make_agent: MakeAgent) -> None:
    agent, broker = make_agent()
    old, new = broker.offer(OLD.read_bytes()), broker.offer(NEW.read_bytes())
    apply_desired(agent, make_desired(1, old, fallback=_fallback(new)))
    restarted, _ = make_agent(broker)
    assert restarted.serving.sha256 == old.sha256
    watch = restarted.local.observer.watch
    assert watch is not None and watch.budget_ms == 10.0 and watch.window_s == 1.0
    # A newer generation without a fallback disarms it and deletes the unused fallback model.
    apply_desired(restarted, make_desired(2, old))
    assert restarted.local.observer.watch is None
    assert not restarted.store.has(new.sha256)


def test_fallback_that_cannot_be_fetched_is_reported_and_the_primary_stays(
    make_agent: MakeAgent,
) -> None:
    agent, broker = make_agent(fetch_timeout_s=1.0)
    old = broker.offer(OLD.read_bytes())
    missing = Manifest(
        sha256="e" * 64,
        size=100,
        chunk_size=100,
        chunk_sha256=("e" * 64,),
        name="m",
        version="2",
        recipe="int8",
    )
    apply_desired(agent, make_desired(1, old, fallback=_fallback(missing)))
    errors = [e for e in broker.events(kind="error") if "not armed" in e["message"]]
    assert len(errors) == 1 and errors[0]["stage"] is None
    # Not tied to the generation: the controller would read that as a failed update.
    assert errors[0]["generation"] is None and errors[0]["message"].startswith("generation 1:")
    record = agent.state.record
    assert record.state == "active" and record.fallback is None
    assert agent.serving.sha256 == old.sha256
    assert broker.events(event_id="g1-failed") == []

"""The agent's output: events, the retained status, and exactly one result per generation."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Callable
from typing import Protocol

from agent.benchmark import BenchmarkCancelled
from agent.protocol import AgentState, BenchmarkReport, Desired, Event, Topics, dump
from agent.protocol.config import AgentConfig
from agent.serving import InferenceError
from agent.status import build_hello, build_status
from agent.store import ModelStore
from agent.update.record import UpdateStateFile

log = logging.getLogger(__name__)

# How long the work thread waits for the broker to acknowledge a terminal event before it
# leaves it marked unsent (re-sent, same event id, on the next connect or start).
REPORT_ACK_WAIT_S = 10.0
# Event ids are 1-64 characters (protocol); longer derived ids are shortened by hashing.
_MAX_EVENT_ID = 64


class Publisher(Protocol):
    """The part of MqttSession the output needs (tests pass an in-memory broker)."""

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, wait_s: float = 0
    ) -> bool:
        """Publish; True when `wait_s` > 0 and the broker acknowledged in time."""
        ...


def derived_event_id(base: str, suffix: str) -> str:
    """`base-suffix`, hashed down to the protocol's 64 characters when longer (stable)."""
    text = f"{base}-{suffix}"
    if len(text) <= _MAX_EVENT_ID:
        return text
    return f"{hashlib.sha256(base.encode()).hexdigest()[:40]}-{suffix}"[:_MAX_EVENT_ID]


class Reporter:
    """Publishes events and status; re-sends a generation's result until it is acknowledged."""

    def __init__(
        self,
        config: AgentConfig,
        topics: Topics,
        session: Publisher,
        state: UpdateStateFile,
        store: ModelStore,
        serving_sha: Callable[[], str | None],
        benchmark: Callable[[int, int], BenchmarkReport],
    ) -> None:
        """Wire the output to the session, the saved state and the serving model."""
        self.config = config
        self.topics = topics
        self.session = session
        self.state = state
        self.store = store
        self.serving_sha = serving_sha
        self.benchmark = benchmark

    # ----------------------------------------------------------------- status
    def status_payload(self, *, online: bool) -> bytes:
        """The encoded status message (online, or the offline last will)."""
        sha = self.serving_sha()
        return dump(build_status(self.config, self.state.record, self.store, sha, online=online))

    def publish_status(self) -> None:
        """Publish the retained status."""
        topic = self.topics.status(self.config.device_id)
        self.session.publish(topic, self.status_payload(online=True), retain=True)

    def announce(self) -> None:
        """Publish hello (facts) and the retained status."""
        hello = build_hello(self.config)
        self.session.publish(self.topics.hello(self.config.device_id), dump(hello))
        self.publish_status()

    def report_problem(self, message: str) -> None:
        """Log and report a local problem (queued until connected); the agent keeps running."""
        log.error("%s", message)
        self.emit("error", message)

    # ----------------------------------------------------------------- events
    def emit(
        self,
        kind: str,
        message: str,
        *,
        desired: Desired | None = None,
        deployment_id: str | None = None,
        generation: int | None = None,
        suffix: str | None = None,
        event_id: str | None = None,
        stage: AgentState | None = None,
        benchmark: BenchmarkReport | None = None,
        wait: bool = False,
    ) -> bool:
        """Publish an event; with `suffix` its id is g<generation>-<suffix>, stable across restarts.

        Returns True when `wait` is set and the broker acknowledged the event.
        """
        if desired is not None:
            deployment_id, generation = desired.deployment_id, desired.generation
        if event_id is None and suffix is not None and generation is not None:
            event_id = f"g{generation}-{suffix}"
        event = Event(
            device_id=self.config.device_id,
            event_id=event_id or uuid.uuid4().hex,
            kind=kind,  # type: ignore[arg-type]
            message=message[:4000],
            deployment_id=deployment_id,
            generation=generation,
            state=self.state.record.state,
            stage=stage,
            model_sha256=self.serving_sha(),
            benchmark=benchmark,
        )
        return self.session.publish(
            self.topics.events(self.config.device_id),
            dump(event),
            wait_s=REPORT_ACK_WAIT_S if wait else 0.0,
        )

    # ----------------------------------------------------------------- exactly-once results
    def report_outcome(self) -> None:
        """Send the recorded generation's result (and benchmark) until the broker acknowledges it.

        Event ids are deterministic (g<generation>-active / -failed / -benchmark) and the
        controller dedupes by (device, event id), so re-sending after a crash or a reconnect
        yields exactly one terminal result per generation.
        """
        r = self.state.record
        if r.deployment_id is None or r.generation < 1 or r.applied_generation != r.generation:
            return
        dep, gen = r.deployment_id, r.generation
        if r.state == AgentState.FAILED and not r.reported:
            if self.emit(
                "error",
                r.detail,
                deployment_id=dep,
                generation=gen,
                suffix="failed",
                stage=r.stage,
                wait=True,
            ):
                self.state.update(reported=True)
        elif r.state == AgentState.ACTIVE:
            if not r.reported:
                message = f"activated ({r.detail})" if r.detail else "activated"
                if not self.emit(
                    "update", message, deployment_id=dep, generation=gen, suffix="active", wait=True
                ):
                    return  # the next connect re-sends it, same id
                r = self.state.update(reported=True)
            due = not r.benchmarked and r.sha256 is not None and r.sha256 == self.serving_sha()
            if due and self.benchmark_and_report(
                r.benchmark_runs,
                r.benchmark_warmup,
                deployment_id=dep,
                generation=gen,
                suffix="benchmark",
                wait=True,
            ):
                self.state.update(benchmarked=True)

    def benchmark_and_report(
        self,
        runs: int,
        warmup: int,
        *,
        deployment_id: str | None = None,
        generation: int | None = None,
        suffix: str | None = None,
        event_id: str | None = None,
        wait: bool = False,
    ) -> bool:
        """Benchmark the serving model and send a benchmark event; True once acknowledged."""
        try:
            report = self.benchmark(runs, warmup)
        except BenchmarkCancelled as exc:  # SIGTERM: answer it now, report nothing
            log.info("benchmark cancelled: %s", exc)
            return False
        except InferenceError:  # nothing is loaded
            return self.emit(
                "error",
                "benchmark requested but no model is active",
                deployment_id=deployment_id,
                generation=generation,
                wait=wait,
            )
        except Exception as exc:  # a runtime error must not fail an already activated update
            log.exception("benchmark failed")
            return self.emit(
                "error",
                f"benchmark failed: {type(exc).__name__}: {exc}",
                deployment_id=deployment_id,
                generation=generation,
                suffix=f"{suffix}-error" if suffix else None,
                event_id=derived_event_id(event_id, "error") if event_id else None,
                stage=AgentState.ACTIVE,
                wait=wait,
            )
        return self.emit(
            "benchmark",
            "benchmark finished",
            deployment_id=deployment_id,
            generation=generation,
            benchmark=report,
            suffix=suffix,
            event_id=event_id,
            wait=wait,
        )

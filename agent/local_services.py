"""What runs beside the update flow on a device: the inference service and telemetry."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from agent.benchmark import benchmark_interpreter
from agent.environment import environment_snapshot
from agent.failpoint import (
    SlowedInterpreter,
    benchmark_slowdown_from_env,
    injected_latency_from_env,
)
from agent.fallback import WatchingObserver
from agent.inference_server import InferenceServer
from agent.metrics import ServingMetrics
from agent.power import TELEMETRY_SAMPLE_INTERVAL_S, PowerModel, PowerSource, detect_power_source
from agent.protocol import BenchmarkReport, SeqRange, Topics
from agent.protocol.config import AgentConfig
from agent.protocol.transport import MqttSession
from agent.runtime import Interpreter, RuntimeInfo
from agent.serving import ServingModel
from agent.spool import TelemetrySpool
from agent.telemetry import TelemetryReporter

log = logging.getLogger(__name__)


class LocalServices:
    """Owns the serving model, the local inference server, the serving metrics and telemetry.

    The daemon swaps models through `swap()` so that a telemetry record never mixes two models,
    and it starts and stops the services around its own run loop.
    """

    def __init__(
        self,
        config: AgentConfig,
        session: MqttSession,
        topics: Topics,
        power_model: PowerModel,
        on_problem: Callable[[str], None],
    ) -> None:
        """Open the spool and build the services; nothing listens or runs until start()."""
        self.config = config
        self.power_model = power_model
        self._on_problem = on_problem
        # EDGEFLEET_INJECT_LATENCY_MS (tests) is read once here; a bad value stops the start.
        self.serving = ServingModel(injected_latency_from_env())
        self._benchmark_slowdown = benchmark_slowdown_from_env()
        # Interpreter threads of the serving model (the desired state's, else the config's).
        self.threads: int | None = config.threads
        self.metrics = ServingMetrics()
        # Served latencies go to the metrics and, while a fallback is armed, its LatencyWatch.
        self.observer = WatchingObserver(self.metrics)
        self.server: InferenceServer | None = None
        if config.socket_path is not None or config.serve_http:
            self.server = InferenceServer(
                self.serving,
                socket_path=config.socket_path,
                http=config.serve_http,
                batch_window_ms=config.batch_window_ms,
                max_batch=config.max_batch,
                result_cache_entries=config.result_cache_entries,
                observer=self.observer,
            )
        self.spool = TelemetrySpool(
            config.spool_path,
            max_records=config.spool_max_records,
            overflow=config.spool_overflow,  # type: ignore[arg-type]  # checked by AgentConfig
            keep_acked=config.spool_keep_acked,
        )

        def power_source() -> PowerSource:
            return detect_power_source(
                power_model=power_model,
                threads=self.threads or 1,
                sample_interval_s=TELEMETRY_SAMPLE_INTERVAL_S,
            )

        self.reporter = TelemetryReporter(
            session=session,
            topic=topics.telemetry(config.device_id),
            device_id=config.device_id,
            spool=self.spool,
            metrics=self.metrics,
            model_sha=lambda: self.serving.sha256,
            power_source=power_source,
            interval_s=config.telemetry_interval_s,
            on_problem=on_problem,
        )

    def start(self) -> None:
        """Start telemetry, then the inference server; a server that cannot bind is reported and
        the agent keeps updating and reporting without it."""
        self.reporter.start()
        if self.server is None:
            return
        try:
            self.server.start()
        except (OSError, ValueError) as exc:
            self._on_problem(f"inference service not started: {exc}")
            self.server = None
            return
        where = [str(self.config.socket_path)] if self.config.socket_path else []
        if self.server.http_url:
            where.append(self.server.http_url)
        log.info("inference service listening on %s", ", ".join(where))

    def stop(self) -> None:
        """Stop serving requests, spool the last partial interval, close the spool."""
        # Never raises: the daemon still has to publish its offline status and disconnect.
        try:
            if self.server is not None:
                self.server.stop()
            self.reporter.stop()
        except Exception:
            log.exception("stopping the local services failed; unsent records stay spooled")
        finally:
            self.spool.close()

    def swap(
        self, interpreter: Interpreter, sha256: str, init_ms: float, threads: int | None
    ) -> None:
        """Serve another model (loaded with `threads`); the interval so far is closed into a
        record of the old model."""
        before = self.reporter.collect_now if self.serving.sha256 not in (None, sha256) else None
        self.serving.swap(interpreter, sha256, init_ms, before_switch=before)
        self.threads = threads

    def clear(self) -> None:
        """Serve nothing (no model loads); requests fail with a clear error meanwhile."""
        if self.serving.sha256 is not None:
            self.reporter.collect_now()
        self.serving.clear()

    def benchmark(
        self,
        runs: int,
        warmup: int,
        runtime: RuntimeInfo,
        stop: threading.Event | None = None,
    ) -> BenchmarkReport:
        """Benchmark the serving model as benchmark_model does; InferenceError if none is loaded.

        Served requests wait meanwhile: they would distort the timings, and one interpreter must
        never run two invocations at once.
        """
        threads = self.threads
        source = detect_power_source(power_model=self.power_model, threads=threads or 1)
        # Conditions of the run (governor, clock, temperature) explain an outlier device later.
        # No external delegate is applied today: the runtime's built-in CPU kernels run the model.
        environment = environment_snapshot(threads=threads, delegate=None)
        with self.serving.exclusive() as (interpreter, sha):
            slowdown = self._benchmark_slowdown.delay_s(sha) if self._benchmark_slowdown else 0.0
            log.info("benchmark of %s: %d runs after %d warm-up", sha[:12], runs, warmup)
            result = benchmark_interpreter(
                SlowedInterpreter(interpreter, slowdown) if slowdown else interpreter,
                runs=runs,
                warmup=warmup,
                power_source=source,
                init_ms=self.serving.init_ms or 0.0,
                stop=stop,
            )
        return BenchmarkReport(
            model_sha256=sha,
            runtime=runtime.name,
            runtime_version=runtime.version,
            threads=threads,
            environment=environment,
            **result,
        )

    def on_connect(self) -> None:
        """Drain the spool now that the broker is back."""
        self.reporter.wake()

    def resend(self, ranges: Sequence[SeqRange]) -> int:
        """Answer a resend request (blocks for PUBACKs: call it from the work thread)."""
        return self.reporter.resend(ranges)

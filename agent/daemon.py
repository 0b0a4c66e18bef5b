"""The agent daemon: wires its parts together and runs the work loop until stopped.

Messages arrive on paho's thread and are routed (routing.py) into the inbox (work.py); one work
thread applies desired states (update/flow.py), runs commands (commands.py), engages the fallback
and re-sends unacknowledged results (reporting.py). update/restore.py recovers after a start.
"""

from __future__ import annotations

import logging
import queue

from agent.commands import CommandDispatcher, SeenCommands
from agent.fallback import EngageFallback, FallbackSwitch
from agent.fetch import Fetcher
from agent.highwater import HighWater
from agent.loader import ModelLoader
from agent.local_services import LocalServices
from agent.memory import release_memory
from agent.power import PowerModel
from agent.protocol import Command, Desired, Topics, dump
from agent.protocol.config import AgentConfig
from agent.protocol.transport import MqttSession
from agent.reporting import Reporter, derived_event_id
from agent.routing import Counters, Router
from agent.runtime import runtime_info
from agent.staging import ArtifactStager
from agent.status import build_status
from agent.store import ModelStore
from agent.trust import TrustStore
from agent.update.errors import Superseded, UpdateFailed
from agent.update.flow import UpdateFlow
from agent.update.record import UpdateStateFile
from agent.update.restore import Recovery
from agent.work import Inbox, ReportOutcome, WorkItem

log = logging.getLogger(__name__)

__all__ = [
    "Agent",
    "Counters",
    "ReportOutcome",
    "Superseded",
    "UpdateFailed",
    "derived_event_id",
]

# How long the work loop waits for an item before it checks the stop flag again.
_POLL_S = 0.2


class Agent:
    """One device's agent; `run()` blocks until `stop()`."""

    def __init__(self, config: AgentConfig, session: MqttSession | None = None) -> None:
        """Open the model store and saved state; nothing touches the network yet.

        `session`: an MQTT session to use instead of connecting to `config.broker` (tests).
        """
        self.config = config
        self.topics = Topics(config.topic_root)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = ModelStore(config.models_dir)
        self.state = UpdateStateFile(config.data_dir / "update.json")
        self.seen_commands = SeenCommands(config.data_dir / "commands.json")
        self.trust = TrustStore(config.trusted_keys, config.data_dir / "trusted_keys.json")
        # Anti-rollback marks kept apart from update.json, which may be rebuilt when corrupt.
        self.highwater = HighWater(config.data_dir / "highwater.json")
        self.runtime = runtime_info()
        self.inbox = Inbox()
        self.power_model = PowerModel(
            idle_w=config.power.idle_w,
            active_w_per_core=config.power.active_w_per_core,
            accelerator_active_w=config.power.accelerator_active_w,
        )
        self.session = session or self._connect_session()
        self.reporter = Reporter(
            config,
            self.topics,
            self.session,
            self.state,
            self.store,
            serving_sha=lambda: self.serving.sha256,
            benchmark=lambda runs, warmup: self.local.benchmark(
                runs, warmup, self.runtime, stop=self.inbox.stopping
            ),
        )
        self.fetcher = Fetcher(
            self.session,
            self.topics,
            config.device_id,
            config.downloads_dir,
            config.repair_interval_s,
        )
        self.stager = ArtifactStager(self.store, self.fetcher, config.downloads_dir)
        # The inference service, its metrics and telemetry (docs/inference.md, telemetry.md).
        self.local = LocalServices(
            config, self.session, self.topics, self.power_model, self.reporter.report_problem
        )
        self.serving = self.local.serving
        self.loader = ModelLoader(self.store, self.local, self.state, config.threads)
        self.fallback = FallbackSwitch(
            config=config,
            store=self.store,
            stager=self.stager,
            state=self.state,
            observer=self.local.observer,
            serving_sha=lambda: self.serving.sha256,
            serve=self.loader.serve,
            emit=self.reporter.emit,
            publish_status=self.reporter.publish_status,
            enqueue=self.inbox.put,
        )
        self.router = Router(
            config,
            self.topics,
            self.trust,
            self.state,
            self.fetcher,
            self.inbox,
            self.reporter,
            on_connected=self.local.on_connect,
            highwater=self.highwater,
            seen_commands=self.seen_commands,
        )
        self.counters = self.router.counters
        self.flow = UpdateFlow(
            config,
            self.state,
            self.store,
            self.stager,
            self.loader,
            self.local,
            self.fallback,
            self.reporter,
            self.inbox,
        )
        self.commands = CommandDispatcher(
            self.seen_commands,
            self.reporter,
            self.local,
            self.store,
            self.loader,
            self.fallback,
            self.state,
        )
        self.recovery = Recovery(
            self.state,
            self.store,
            self.loader,
            self.local,
            self.fallback,
            self.reporter,
            self.trust,
            problems=(self.seen_commands.problem, self.highwater.problem),
        )

    def _connect_session(self) -> MqttSession:
        """The MQTT session to config.broker, with the offline status as its last will."""
        config = self.config
        offline = dump(build_status(config, self.state.record, self.store, None, online=False))
        return MqttSession(
            config.broker,
            config.device_id,
            on_message=lambda topic, payload: self.router.on_message(topic, payload),
            on_connect=lambda: self.router.on_connect(self.session),
            will=(self.topics.status(config.device_id), offline),
            username=config.username,
            password=config.password,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
        )

    # ----------------------------------------------------------------- lifecycle
    def run(self) -> None:
        """Restore, connect, then process desired states and commands until stopped."""
        self.restore()
        self.local.start()
        self.session.start()
        try:
            while not self.inbox.stopping.is_set():
                try:
                    item = self.inbox.queue.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                try:
                    self._handle(item)
                except Exception as exc:  # one bad item must not take the agent down
                    log.exception("work item failed")
                    self._internal_error(item, exc)
                release_memory()
        finally:
            self.local.stop()  # the last partial interval is spooled and, if possible, sent
            self.session.publish(
                self.topics.status(self.config.device_id),
                self.reporter.status_payload(online=False),
                retain=True,
                wait_s=2.0,
            )
            self.session.stop()

    def stop(self) -> None:
        """Ask run() to return."""
        self.inbox.stopping.set()

    def restore(self) -> None:
        """Recover from the saved state and load the current model to serve (update/restore.py)."""
        self.recovery.restore()

    def _handle(self, item: WorkItem) -> None:
        """Run one work item on the work thread."""
        if isinstance(item, Desired):
            self.flow.apply(item)
        elif isinstance(item, Command):
            self.commands.run(item)
        elif isinstance(item, EngageFallback):
            self.fallback.engage(item)
        else:
            self.reporter.report_outcome()
            self.fallback.report()

    def _internal_error(self, item: WorkItem, exc: Exception) -> None:
        """Report an unexpected exception; fail the update unless its generation already ended."""
        text = f"internal error: {type(exc).__name__}: {exc}"
        record = self.state.record
        if isinstance(item, Desired) and item.generation > record.applied_generation:
            self.flow.fail(item, text)
        elif isinstance(item, Command):
            self.reporter.emit("error", f"command {item.command_id} failed: {text}")
        else:
            self.reporter.emit("error", text)

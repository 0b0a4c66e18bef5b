"""Routing of incoming MQTT messages, with the trust checks (signatures, binding, rollback)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.commands import SeenCommands
from agent.fetch import Fetcher
from agent.highwater import HighWater
from agent.protocol import (
    Command,
    Desired,
    FleetKeyChain,
    Manifest,
    ProtocolError,
    Topics,
    parse,
    parse_fleet_keys,
)
from agent.protocol.config import AgentConfig
from agent.protocol.transport import MqttSession
from agent.reporting import Reporter
from agent.trust import SecurityRejected, TrustStore
from agent.update.record import UpdateStateFile
from agent.work import Inbox, ReportOutcome

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """What the agent counted since start (rejected input must be visible, not silent)."""

    rejected_messages: int = 0
    reasons: list[str] = field(default_factory=list)

    def reject(self, reason: str) -> None:
        """Count a rejection and keep the last few reasons."""
        self.rejected_messages += 1
        self.reasons = [*self.reasons[-9:], reason]


class Router:
    """Turns messages into work items; bad or untrusted input is rejected, counted, reported."""

    def __init__(
        self,
        config: AgentConfig,
        topics: Topics,
        trust: TrustStore,
        state: UpdateStateFile,
        fetcher: Fetcher,
        inbox: Inbox,
        reporter: Reporter,
        on_connected: Callable[[], None],
        highwater: HighWater,
        seen_commands: SeenCommands,
    ) -> None:
        """Wire the router; `on_connected` runs after each (re)subscribe (telemetry flush)."""
        self.highwater = highwater
        self.seen_commands = seen_commands
        self.config = config
        self.topics = topics
        self.trust = trust
        self.state = state
        self.fetcher = fetcher
        self.inbox = inbox
        self.reporter = reporter
        self.on_connected = on_connected
        self.counters = Counters()
        # The last desired state refused only because its key was unknown: checked again once a
        # signed key rotation arrives (the retained keys and desired may arrive in either order).
        self._unknown_key_desired: tuple[str, bytes] | None = None

    def on_connect(self, session: MqttSession) -> None:
        """(Re)subscribe, announce facts and status, and re-send an unacknowledged result."""
        device = self.config.device_id
        session.subscribe(
            self.topics.desired(device),
            self.topics.cmd(device),
            self.topics.fleet_keys(),
            *self.fetcher.subscriptions(),
        )
        self.reporter.announce()
        self.inbox.put(ReportOutcome())
        self.on_connected()

    def on_message(self, topic: str, payload: bytes) -> None:
        """Route one message; bad input is rejected, counted and reported, never fatal."""
        try:
            parsed = self.topics.parse(topic)
            if parsed.kind == "artifact" and parsed.channel == "chunks":
                self.fetcher.on_chunk(parsed.ident, parsed.index or 0, payload)
            elif parsed.kind == "artifact" and parsed.channel == "manifest":
                if payload:  # empty: a cleared retained manifest
                    self._on_manifest(parsed.ident, parse(payload, Manifest))
            elif parsed.kind == "fleet":
                if payload:
                    self._on_fleet_keys(parse_fleet_keys(payload))
            elif parsed.channel == "desired":
                self._on_desired(topic, payload)
            elif parsed.channel == "cmd":
                self._on_command(parse(payload, Command))
        except ProtocolError as exc:
            self.counters.reject(f"{topic}: {exc}")
            log.warning("rejected message on %s: %s", topic, exc)
            self.reporter.emit("rejected", f"rejected message on {topic}: {exc}")
        except SecurityRejected as exc:
            self.counters.reject(f"{topic}: {exc}")
            log.warning("security: refused message on %s: %s", topic, exc)
            self.reporter.emit("security", f"refused message on {topic}: {exc}")

    def _on_manifest(self, topic_sha: str, manifest: Manifest) -> None:
        """Hand a manifest for its own topic (signed, when enforced) to the fetcher."""
        if manifest.sha256 != topic_sha:
            raise ProtocolError("$.sha256: does not match the manifest topic")
        if self.trust.enforcing:
            try:
                self.trust.check_manifest(manifest)
            except SecurityRejected as exc:
                self.fetcher.on_manifest_refused(manifest.sha256, str(exc))
                raise
        self.fetcher.on_manifest(manifest)

    def _on_desired(self, topic: str, payload: bytes) -> None:
        """Check a desired state (signature, binding, anti-rollback, expiry) and queue it."""
        desired = parse(payload, Desired)
        if self.trust.enforcing:
            record = self.state.record
            try:
                self.trust.check_desired(
                    desired,
                    device_id=self.config.device_id,
                    profile=self.config.profile,
                    highest_generation=max(
                        record.generation,
                        record.applied_generation,
                        self.inbox.latest_generation,
                        self.highwater.get("generation"),
                    ),
                    applied_generation=record.applied_generation,
                )
            except SecurityRejected as exc:
                unknown_key = desired.sig is not None and "unknown key" in str(exc)
                self._unknown_key_desired = (topic, payload) if unknown_key else None
                raise
            self.highwater.raise_to("generation", desired.generation)
        self._unknown_key_desired = None
        self.inbox.put_desired(desired)

    def _on_command(self, command: Command) -> None:
        """Check a command (signature, device, expiry, replay counter) and queue it."""
        if self.trust.enforcing:
            if command.command_id in self.seen_commands:
                log.info("ignoring repeated command %s", command.command_id)
                return
            self.trust.check_command(
                command,
                device_id=self.config.device_id,
                highest_counter=self.highwater.get("command"),
            )
            self.highwater.raise_to("command", command.counter)
        self.inbox.put(command)

    def _on_fleet_keys(self, chain: FleetKeyChain) -> None:
        """Walk a signed key rotation chain (each link persisted first); then re-check a desired
        state it unblocks."""
        if not self.trust.enforcing:
            log.debug("ignoring fleet keys: signatures not enforced")
            return
        if self.trust.accept_chain(chain) and self._unknown_key_desired is not None:
            topic, payload = self._unknown_key_desired
            self._unknown_key_desired = None
            self.on_message(topic, payload)

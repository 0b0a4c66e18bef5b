"""Inbound device messages: drained in batches, parsed, handed to the fleet's ingest; resends."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid

from agent.protocol import (
    Command,
    Event,
    Hello,
    Need,
    ProtocolError,
    Status,
    Telemetry,
    dump,
    escape_controls,
    parse,
)
from controller.fleet.registry import Fleet
from controller.runtime.adopt import Acknowledge
from controller.runtime.kick import kick_in_background
from controller.runtime.telemetry_ingest import TelemetryIngest, drain
from controller.runtime.tuning import (
    ANNOUNCE_RETRY_S,
    MAX_BATCH,
    MAX_RESEND_RANGES,
)

log = logging.getLogger(__name__)

# Least seconds between two takeovers of one revoked device's session: its next message after
# a takeover (it reconnects before the broker reloaded) triggers another, without a storm.
REKICK_S = 5.0


def _channel_of(topic: str) -> str:
    """The channel a topic ends in (hello, events, telemetry, need, ...), for metric labels."""
    last = topic.rsplit("/", 1)[-1]
    return last if last.isalpha() else "unknown"


def _same_device(claimed: str, topic_id: str) -> None:
    """A message must be about the device whose topic carries it."""
    if claimed != topic_id:
        raise ProtocolError(f"$.device_id: {claimed!r} does not match topic device {topic_id!r}")


def _clean_hello(hello: Hello) -> Hello:
    """The hello with every free-text fact escaped (escape_controls)."""
    facts = hello.facts
    cleaned = dataclasses.replace(
        facts,
        arch=escape_controls(facts.arch),
        system=escape_controls(facts.system),
        runtime=escape_controls(facts.runtime),
        runtime_version=escape_controls(facts.runtime_version),
        python=escape_controls(facts.python),
        board=escape_controls(facts.board) if facts.board is not None else None,
    )
    return dataclasses.replace(hello, facts=cleaned)


class Inbound(TelemetryIngest):
    """Drains the inbox into fleet ingest, a transaction per batch (ControllerService mixin)."""

    def _ingest(
        self,
        fleet: Fleet,
        batch: list[tuple[str, bytes]],
        needs: dict[str, set[int]],
        first_need: dict[str, float],
    ) -> None:
        """Apply a batch: the device messages in one exclusive commit (each message a
        savepoint; if the commit itself fails, one by one rather than lose them), then its
        telemetry in a transaction that locks only those devices, so replicas ingest it in
        parallel (docs/storage.md)."""
        self.messages += len(batch)
        # One stat of revoked.json per batch, not per message (it was 5 % of the loop's time).
        revoked = self.revoked.snapshot()
        telemetry: list[Telemetry] = []
        others: list[tuple[str, bytes]] = []
        for topic, payload in batch:
            if _channel_of(topic) == "telemetry":
                self._handle(fleet, topic, payload, needs, first_need, telemetry, revoked)
            else:
                others.append((topic, payload))
        if others:
            try:
                with fleet.db.transaction():
                    self._handle_each(fleet, others, needs, first_need, revoked)
            except Exception:
                self.errors += 1
                log.exception("batch of %d messages failed; applying one by one", len(others))
                self._handle_each(fleet, others, needs, first_need, revoked)
        if telemetry:
            self._store_telemetry(fleet, telemetry)

    def _handle_each(
        self,
        fleet: Fleet,
        batch: list[tuple[str, bytes]],
        needs: dict[str, set[int]],
        first_need: dict[str, float],
        revoked: frozenset[str] | None = None,
    ) -> None:
        """Handle messages; one bad message never stops the others. `revoked`: the batch's
        revoked ids (read now when not given)."""
        if revoked is None:
            revoked = self.revoked.snapshot()
        for topic, payload in batch:
            try:
                self._handle(fleet, topic, payload, needs, first_need, [], revoked)
            except Exception:
                self.errors += 1
                log.exception("failed to handle a message on %s", topic)

    def _store_telemetry(self, fleet: Fleet, messages: list[Telemetry]) -> None:
        """Store a batch's telemetry in one transaction; if that fails, message by message."""
        received = time.time()
        self._note_lag(messages, received)
        try:
            results = [fleet.telemetry.ingest_many(messages, received)]
        except Exception:
            self.errors += 1
            log.exception(
                "telemetry batch of %d messages failed; storing one by one", len(messages)
            )
            results = []
            for message in messages:
                try:
                    results.append(fleet.telemetry.ingest(message, time.time()))
                except Exception:
                    self.errors += 1
                    log.exception("cannot store telemetry from %s", message.device_id)
        for result in results:
            self.records_stored += result.stored
            self.records_duplicate += result.duplicates
            if self.metrics is not None:
                self.metrics.observe_ingest(result)

    def _drain(self, timeout: float) -> list[tuple[str, bytes, Acknowledge | None]]:
        """Up to MAX_BATCH queued messages, waiting at most `timeout` for the first."""
        return drain(self._inbox, timeout, MAX_BATCH)

    def _handle(
        self,
        fleet: Fleet,
        topic: str,
        payload: bytes,
        needs: dict[str, set[int]],
        first_need: dict[str, float],
        telemetry: list[Telemetry],
        revoked: frozenset[str],
    ) -> None:
        """Parse and apply one inbound message (telemetry is only parsed and collected);
        reject bad input with a counted log line. `revoked`: the batch's revoked ids."""
        try:
            parsed = self.topics.parse(topic)
            if parsed.kind == "device" and parsed.ident in revoked:
                self._refuse_revoked(parsed.ident, topic)
                return
            if parsed.channel == "hello":
                hello = parse(payload, Hello)
                _same_device(hello.device_id, parsed.ident)
                fleet.record_hello(_clean_hello(hello))
            elif parsed.channel == "status":
                if not payload:
                    return  # a cleared retained message
                status = parse(payload, Status)
                _same_device(status.device_id, parsed.ident)
                status = dataclasses.replace(status, detail=escape_controls(status.detail))
                if not fleet.has_device(status.device_id):
                    self._ask_to_announce(fleet, status.device_id)
                fleet.record_status(status)
            elif parsed.channel == "events":
                event = parse(payload, Event)
                _same_device(event.device_id, parsed.ident)
                event = dataclasses.replace(event, message=escape_controls(event.message))
                fleet.record_event(event)
                self.pacer.on_event(event)  # past `fetching`: its download slot is free
            elif parsed.channel == "telemetry":
                message = parse(payload, Telemetry)
                _same_device(message.device_id, parsed.ident)
                telemetry.append(message)
            elif parsed.channel == "need":
                need = parse(payload, Need)
                self.needs_received += 1
                manifest = fleet.manifest(parsed.ident)
                valid = {i for i in need.chunks if 0 <= i < manifest.chunk_count}
                needs[parsed.ident] |= valid
                first_need.setdefault(parsed.ident, time.monotonic())
        except (ProtocolError, ValueError) as exc:
            self.rejected += 1
            if self.metrics is not None:
                self.metrics.observe_rejected(_channel_of(topic))
            log.warning("rejected message on %s: %s", topic, exc)

    def _request_resends(self, fleet: Fleet) -> None:
        """Ask devices for telemetry records missing longer than the grace period."""
        if not self.session.connected.is_set():
            return
        now = time.time()
        due = fleet.telemetry.due_resends(
            now, grace_s=self.resend_grace(), retry_s=self.resend_retry_s
        )
        if fleet.telemetry.last_expired:
            log.warning(
                "%d telemetry records marked lost: resends went unanswered",
                fleet.telemetry.last_expired,
            )
            if self.metrics is not None:
                self.metrics.observe_expired(fleet.telemetry.last_expired)
        for device_id, ranges in due.items():
            for start in range(0, len(ranges), MAX_RESEND_RANGES):
                part = tuple(ranges[start : start + MAX_RESEND_RANGES])
                command = fleet.sign_command(
                    device_id,
                    Command(
                        command_id=f"resend-{uuid.uuid4().hex[:12]}",
                        action="resend_telemetry",
                        seq_ranges=part,
                    ),
                )
                self.session.publish(self.topics.cmd(device_id), dump(command))
                fleet.telemetry.mark_requested(device_id, part, now)
                self.resend_requests += 1
                if self.metrics is not None:
                    self.metrics.observe_resend()
                log.info("asked %s to resend %d telemetry range(s)", device_id, len(part))

    def _kick_newly_revoked(self) -> None:
        """Take over the session of every device revoked since the last look (one stat)."""
        revoked = self.revoked.snapshot()
        if revoked is self._revoked_seen:
            return
        for device_id in sorted(revoked - self._revoked_seen):
            self._kick(device_id)
        self._revoked_seen = revoked

    def _refuse_revoked(self, device_id: str, topic: str) -> None:
        """Drop a message of a revoked device (a hello must not register it again) and take
        its broker session over, at most every REKICK_S per device."""
        self.rejected += 1
        log.warning("rejected message on %s: device %r is revoked", topic, device_id)
        self._kick(device_id)

    def _kick(self, device_id: str) -> None:
        """Take a revoked device's broker session over, at most every REKICK_S per device.

        Only over the plaintext loopback listener, where client ids are kept: on a device
        listener `use_username_as_clientid` would turn the takeover into one of the
        controller's own session. There the reloaded password file and ACL deny stop it.
        """
        if self.broker_url.lower().startswith(("mqtts://", "ssl://")):
            return
        now = time.monotonic()
        if now - self._kicked.get(device_id, -REKICK_S) < REKICK_S:
            return
        self._kicked[device_id] = now
        kick_in_background(
            self.broker_url,
            device_id,
            username=self._credentials[0],
            password=self._credentials[1],
        )

    def _ask_to_announce(self, fleet: Fleet, device_id: str) -> None:
        """A device we only know from its retained status lost its hello (it connected before
        our first subscription existed): ask it to announce itself again."""
        now = time.monotonic()
        if now - self._announce_asked.get(device_id, -ANNOUNCE_RETRY_S) < ANNOUNCE_RETRY_S:
            return
        self._announce_asked[device_id] = now
        command = fleet.sign_command(
            device_id,
            Command(command_id=f"announce-{uuid.uuid4().hex[:12]}", action="resend_status"),
        )
        self.session.publish(self.topics.cmd(device_id), dump(command))

"""State and MQTT wiring of the controller service, shared by its inbound, publisher, leader."""

from __future__ import annotations

import cProfile
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent.protocol import (
    DEFAULT_ROOT,
    Topics,
)
from agent.protocol.transport import MqttSession
from controller.fleet.registry import Fleet
from controller.runtime.adopt import Acknowledge, Adoption
from controller.runtime.lease import Lease
from controller.runtime.pacing import DEFAULT_MAX_FETCHING, DEFAULT_PER_MINUTE, FetchPacer
from controller.runtime.tuning import (
    CONTROLLER_INFLIGHT,
    RESEND_GRACE_S,
    RESEND_RETRY_S,
    RETAINED_SWEEP_S,
    SHARE_GROUP,
    TELEMETRY_MAX_UNACKED,
    TELEMETRY_RAW_DAYS,
)
from controller.security.revocation import RevokedSet

if TYPE_CHECKING:
    from controller.runtime.prometheus import ControllerMetrics

log = logging.getLogger(__name__)


def profiled(run: Callable[[], None], suffix: str) -> None:
    """Run `run`, under cProfile when EDGEFLEET_PROFILE names an output file (written there
    plus `suffix` when it returns): bench/bench_rollout.py --profile, where each of the
    controller's threads spends its time."""
    out = os.environ.get("EDGEFLEET_PROFILE")
    if not out:
        run()
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        run()
    finally:
        profile.disable()
        profile.dump_stats(out + suffix)


class ServiceCore:
    """State of one controller service: its session, counters and settings (base of every part)."""

    def __init__(
        self,
        home: Path,
        broker_url: str,
        *,
        topic_root: str = DEFAULT_ROOT,
        client_id: str = "edgefleet-controller",
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        stats_interval_s: float = 60.0,
        resend_grace_s: float = RESEND_GRACE_S,
        telemetry_raw_days: float = TELEMETRY_RAW_DAYS,
        metrics: ControllerMetrics | None = None,
        replica: str | None = None,
        max_fetching: int = DEFAULT_MAX_FETCHING,
        fetches_per_minute: float = DEFAULT_PER_MINUTE,
    ) -> None:
        """Prepare the session; start() connects and begins the loop.

        At most `max_fetching` devices download at once and `fetches_per_minute` start a
        download per minute (0 = no limit; controller/runtime/pacing.py).

        With `replica` (a name unique among the replicas), device messages arrive through
        shared subscriptions and only the replica holding the leader lease drives rollouts and
        publishes (docs/storage.md, "Replicas").
        """
        self.home = home
        self.replica = replica
        self.name = replica or "controller"
        self.is_leader = False
        # time.monotonic() of the last reconcile pass that finished without error (/healthz).
        self.last_reconcile_at: float | None = None
        self.leader_terms = 0
        self._lease: Lease | None = None
        self.topics = Topics(topic_root)
        self._inbox: queue.Queue[tuple[str, bytes, Acknowledge | None]] = queue.Queue()
        # Telemetry goes to its own thread (controller/runtime/telemetry_ingest.py).
        self._telemetry_inbox: queue.Queue[tuple[str, bytes, Acknowledge | None]] = queue.Queue()
        self._telemetry_thread: threading.Thread | None = None
        # Median seconds between a device closing a record and its storage, last batch.
        self.telemetry_lag_s = 0.0
        self._stop = threading.Event()
        self._reconnected = threading.Event()
        self._connected_at = 0.0
        self.ready = threading.Event()
        # The signed fleet-keys message last published retained (key rotation), None = not yet.
        self._keys_published: bytes | None = None
        self.rejected = 0
        self._announce_asked: dict[str, float] = {}
        self.errors = 0
        self.chunks_published = 0
        self.bytes_published = 0
        self._thread: threading.Thread | None = None
        self.retained_sweep_s = RETAINED_SWEEP_S
        self.stats_interval_s = stats_interval_s
        self.resend_grace_s = resend_grace_s
        self.resend_retry_s = RESEND_RETRY_S
        self.telemetry_raw_days = telemetry_raw_days
        self.metrics = metrics
        self.records_stored = 0
        self.records_duplicate = 0
        self.messages = 0
        self.resend_requests = 0
        self.needs_received = 0
        self.repairs_coalesced = 0  # chunks asked for but published within the round already
        # (sha, chunk index) -> when it was last published (retained), for repair coalescing.
        self._republished: dict[tuple[str, int], float] = {}
        self.pacer = FetchPacer(max_fetching, fetches_per_minute)
        # clean_session=False with a fixed client id: the broker queues device events for us
        # while the controller restarts, so a restart loses nothing.
        if replica is not None:
            client_id = f"{client_id}-{replica}"
        self.broker_url = broker_url
        self.client_id = client_id
        self._credentials = (username, password)
        self._tls = (ca_file, cert_file, key_file)
        # Revoked devices (HOME/security/revoked.json): their messages are refused, their
        # sessions taken over (controller/runtime/kick.py), at most every REKICK_S each.
        self.revoked = RevokedSet(home)
        self._kicked: dict[str, float] = {}
        self._revoked_seen: frozenset[str] = self.revoked.snapshot()
        self._adoptions: list[Adoption] = []
        self.adopted_messages = 0
        self.session = MqttSession(
            broker_url,
            client_id,
            # Acknowledged once processed (committed): a crash loses no message, the broker
            # delivers what was not acknowledged again, and the database dedupes it.
            on_acked_message=self._on_message,
            on_connect=self._on_connect,
            username=username,
            password=password,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            clean_session=False,
            max_inflight=CONTROLLER_INFLIGHT,
        )
        # Telemetry's own persistent session, so its backlog never queues events behind it;
        # not over TLS, where the broker may make the username the client id (a takeover).
        self.telemetry_session: MqttSession | None = None
        if not broker_url.lower().startswith(("mqtts://", "ssl://")):
            self.telemetry_session = MqttSession(
                broker_url,
                f"{client_id}-telemetry",
                on_acked_message=self._on_message,
                on_connect=self._on_telemetry_connect,
                username=username,
                password=password,
                clean_session=False,
                max_inflight=CONTROLLER_INFLIGHT,
                # Its network thread only receives (the session publishes nothing), so pausing
                # it under a backlog delays no publish of the controller's.
                max_unacked=TELEMETRY_MAX_UNACKED,
            )

    def _on_connect(self) -> None:
        """Subscribe to every device's inbound channels and artifact repair requests."""
        # Status is retained and idempotent: every replica takes every status (shared, a live
        # change would reach one replica; MQTT 5 gives shared subscriptions no retained ones).
        self.session.subscribe(*self._device_filters(), self.topics.all_devices("status"))
        if self.telemetry_session is not None:
            # A persistent session keeps its subscriptions: one from before telemetry had its
            # own session would still deliver telemetry here.
            self.session.unsubscribe(*self._telemetry_filters())
        self._connected_at = time.monotonic()
        self._keys_published = None  # retained state may be gone: publish the keys again
        self._reconnected.set()
        self.ready.set()

    def _device_filters(self) -> tuple[str, ...]:
        """What devices send the controller's main session; for replicas, shared: each message
        to one. Telemetry only when it has no session of its own."""
        t = self.topics
        filters: tuple[str, ...] = (t.all_devices("hello"), t.all_devices("events"), t.all_needs())
        if self.telemetry_session is None:
            filters += (t.all_devices("telemetry"),)
        return self._shared(filters)

    def _telemetry_filters(self) -> tuple[str, ...]:
        """What the telemetry session subscribes to (shared for replicas)."""
        return self._shared((self.topics.all_devices("telemetry"),))

    def _shared(self, filters: tuple[str, ...]) -> tuple[str, ...]:
        """The filters as shared subscriptions when this is a replica, else as they are."""
        if self.replica is None:
            return filters
        return tuple(f"$share/{SHARE_GROUP}/{f}" for f in filters)

    def _on_message(self, topic: str, payload: bytes, ack: Acknowledge | None = None) -> None:
        """Hand a message to the service thread, telemetry to the telemetry thread (paho's
        thread must not touch the database)."""
        inbox = self._telemetry_inbox if topic.endswith("/telemetry") else self._inbox
        inbox.put((topic, payload, ack))

    def _on_telemetry_connect(self) -> None:
        """Subscribe the telemetry session (defined by TelemetryIngest)."""
        raise NotImplementedError

    def counters(self) -> dict[str, int]:
        """This replica's service counters (heartbeat, stats line, benchmarks)."""
        return {
            "records_stored": self.records_stored,
            "records_duplicate": self.records_duplicate,
            "messages": self.messages,
            "chunks_published": self.chunks_published,
            "rejected": self.rejected,
            "errors": self.errors,
            "leader_terms": self.leader_terms,
            "adopted_messages": self.adopted_messages,
            "resend_requests": self.resend_requests,
            "needs_received": self.needs_received,
            "repairs_coalesced": self.repairs_coalesced,
        }

    def _still_leading(self, fleet: Fleet) -> bool:
        """Whether this replica still holds the leader lease (defined by Leadership)."""
        raise NotImplementedError

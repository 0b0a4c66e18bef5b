"""Replica leadership: the leader lease, heartbeats, adopting a dead replica's session."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from controller.fleet.registry import Fleet
from controller.runtime.adopt import Acknowledge, Adoption, dead_replicas, mark_adopted
from controller.runtime.lease import LEASE_TTL_S, RENEW_INTERVAL_S, Lease, heartbeat
from controller.storage.db import Database, database_target
from controller.storage.open import open_database

if TYPE_CHECKING:
    pass

from controller.runtime.core import ServiceCore

log = logging.getLogger(__name__)


class Leadership(ServiceCore):
    """Keeps the leader lease; adopts dead replicas' sessions (ControllerService mixin)."""

    def _lead_forever(self, started: float) -> None:
        """Leadership thread: every RENEW_INTERVAL_S, renew or take the leader lease and beat
        the heartbeat, on a connection of its own, so a slow batch, reconcile or compaction
        in the service loop never lets the lease lapse. A lost connection is reopened."""
        db: Database | None = None
        try:
            while not self._stop.is_set():
                try:
                    if db is None or not db.healthy():
                        if db is not None:
                            self.is_leader = False
                            db.close()
                            db = None
                        db = open_database(database_target(self.home), migrate=False)
                        self._lease = Lease(db, self.name)
                    assert self._lease is not None
                    self._lead(self._lease, db, started)
                except Exception:  # the database is away: lead again once it answers
                    self.is_leader = False
                    self.errors += 1
                    log.exception("leadership: cannot reach the database")
                self._stop.wait(RENEW_INTERVAL_S)
        finally:
            for adoption in self._adoptions:
                adoption.stop()
            if db is not None:
                try:
                    if self._lease is not None:
                        self._lease.release()  # a clean stop hands over at once, not after TTL
                except Exception:
                    log.exception("cannot release the leader lease")
                db.close()

    def _lead(self, lease: Lease, db: Database, started: float) -> None:
        """Renew or take the leader lease, beat this replica's heartbeat, tend adoptions."""
        try:
            leader = lease.acquire()
        except Exception:  # the database is away: stop leading until it answers again
            self.errors += 1
            log.exception("cannot renew the leader lease")
            leader = False
        if leader and not self.is_leader:
            self.leader_terms += 1
            # Whatever the last leader published may be missing (a broker restart during the
            # handover): publish the fleet's desired state again, as after a reconnect.
            self._reconnected.set()
            log.info("%s leads (term %d): driving rollouts and publishing", self.name, lease.epoch)
        elif self.is_leader and not leader:
            log.warning("%s lost the leader lease: ingesting only", self.name)
        self.is_leader = leader
        try:
            heartbeat(
                db,
                self.name,
                started=started,
                leader=leader,
                stats=self.counters(),
                client_id=self.client_id,
                shared=self.replica is not None,
            )
            self._adopt(db, leader)
        except Exception:
            self.errors += 1
            log.exception("cannot record the heartbeat or adopt a dead replica's session")

    def _adopt(self, db: Database, leader: bool) -> None:
        """Close drained adoptions; as leader, take over dead replicas' sessions (adopt.py)."""
        for adoption in [a for a in self._adoptions if a.done()]:
            adoption.stop()
            self._adoptions.remove(adoption)
            log.info(
                "released the session of replica %s after %d message(s)",
                adoption.replica,
                adoption.messages,
            )
        if not leader or self.replica is None:
            return
        for row in dead_replicas(db, self.name):
            # Its plain status subscription too: else the broker queues every status for the
            # dead session, and a replica coming back would replay stale ones.
            sessions = [
                (row["client_id"], (*self._device_filters(), self.topics.all_devices("status")))
            ]
            if self.telemetry_session is not None:  # and its telemetry session's backlog
                sessions.append((f"{row['client_id']}-telemetry", self._telemetry_filters()))
            mark_adopted(db, row["name"], self.name)
            for client_id, filters in sessions:
                adoption = Adoption(
                    self.broker_url,
                    row["name"],
                    client_id,
                    filters,
                    self._on_message_adopted,
                    username=self._credentials[0],
                    password=self._credentials[1],
                )
                adoption.start()
                self._adoptions.append(adoption)
            log.warning("replica %s stopped beating: adopting its MQTT sessions", row["name"])

    def _still_leading(self, fleet: Fleet) -> bool:
        """Right before leader-only work: the lease is ours, this term, for at least half its
        TTL more, read from the database, so a leader that stalled past its expiry publishes
        nothing once another replica may have taken over."""
        lease = self._lease
        if not self.is_leader or lease is None:
            return False
        try:
            # A read-only snapshot: on SQLite a transaction would wait for the write lock, which
            # the telemetry thread holds for its batches (122 ms a check, profiled at 10,000
            # devices); the lease row is read the same either way.
            with fleet.db.snapshot() as conn:
                return lease.held(conn, fleet.db.clock(), margin_s=LEASE_TTL_S / 2)
        except Exception:  # the database is away: not leading (the loop sees it unhealthy)
            self.errors += 1
            log.exception("cannot check the leader lease")
            return False

    def _on_message_adopted(self, topic: str, payload: bytes, ack: Acknowledge | None) -> None:
        """A message a dead replica held: processed here like our own."""
        self.adopted_messages += 1
        self._on_message(topic, payload, ack)

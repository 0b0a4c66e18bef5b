"""Adopting a dead replica's MQTT session, so the messages it held are not stranded.

A replica subscribes with a persistent session (clean_session=False), so what the broker handed
it but it never acknowledged, and what the broker keeps queuing for it while it is down, waits
in that session. mosquitto (like EMQX for persistent sessions) does not hand those to the other
members of the shared group. The leader therefore connects with the dead replica's client id,
takes the queued and unacknowledged messages into its own inbox (acknowledged once processed),
unsubscribes the shared filters so the broker stops queuing for the dead one, and disconnects
once quiet. A replica that comes back takes its client id over and subscribes again.
docs/storage.md, "Replicas".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.protocol.transport import Ack, MqttSession
from controller.runtime.lease import DEAD_AFTER_S
from controller.storage.db import Database
from controller.storage.queries import leases as q

log = logging.getLogger(__name__)

# The adopted session is given up after this long without a message...
QUIET_S = 2.0
# ...or after this long in all (a busy fleet keeps queuing until the unsubscribe lands).
MAX_ADOPTION_S = 60.0

# Sends one message's PUBACK: a transport Ack, or an adoption's counting wrapper of one.
Acknowledge = Callable[[], None]
Deliver = Callable[[str, bytes, Acknowledge | None], None]


class Adoption:
    """One adopted session: connected, unsubscribing, draining, then closed."""

    def __init__(
        self,
        broker_url: str,
        replica: str,
        client_id: str,
        filters: tuple[str, ...],
        deliver: Deliver,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        """Prepare a session that impersonates `client_id` once (no reconnect)."""
        self.replica = replica
        self.filters = filters
        self.messages = 0
        self.outstanding = 0  # delivered to the adopter, not yet acknowledged
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.last_message = self.started
        self._deliver = deliver
        self.session = MqttSession(
            broker_url,
            client_id,
            on_acked_message=self._on_message,
            on_connect=self._on_connect,
            username=username,
            password=password,
            clean_session=False,
            reconnect=False,
        )

    def start(self) -> None:
        """Connect in the background."""
        self.session.start()

    def _on_connect(self) -> None:
        """Stop the broker queuing for the dead replica (its shared filters and its plain
        status one); what it holds still arrives."""
        self.session.unsubscribe(*self.filters)

    def _on_message(self, topic: str, payload: bytes, ack: Ack) -> None:
        """Pass a stranded message to the adopter's inbox; count it until acknowledged."""
        with self._lock:
            self.messages += 1
            self.outstanding += 1
        self.last_message = time.monotonic()

        def acknowledge() -> None:
            ack()
            with self._lock:
                self.outstanding -= 1

        self._deliver(topic, payload, acknowledge)

    def done(self) -> bool:
        """True once the session ended (taken back by its replica), or once every adopted
        message is committed and acknowledged and the session has been quiet (or timed out:
        unacknowledged ones then stay in the session for its replica, or the next adoption)."""
        now = time.monotonic()
        if self.session.closed.is_set():
            return True
        if now - self.started > MAX_ADOPTION_S:
            return True
        if not self.session.connected.is_set():
            return False
        with self._lock:
            settled = self.outstanding == 0
        return settled and now - self.last_message > QUIET_S

    def stop(self) -> None:
        """Disconnect (the session, now without subscriptions, stays with the broker)."""
        self.session.stop()


def dead_replicas(db: Database, me: str) -> list[dict[str, str]]:
    """Replicas on shared subscriptions whose heartbeat stopped and whose death nobody adopted."""
    now = db.clock()
    return q.dead_unadopted(db.conn, me, now - DEAD_AFTER_S)


def mark_adopted(db: Database, name: str, by: str) -> None:
    """Record that `by` adopted replica `name`'s session for this death."""
    with db.transaction() as tx:
        q.mark_adopted(tx, name, by, db.clock())

"""Leader election for controller replicas: one lease row, renewed by its holder, taken over
by another replica once it expires (docs/storage.md, "Replicas").

Every lease operation runs in an exclusive transaction, so the read-decide-write below is
atomic across replicas on both backends. Times come from the database's clock. A holder that
stalls past its expiry may still be mid-transaction; work that must not run twice checks
`held(tx)` inside its own transaction, which serializes it against the takeover (fencing).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from controller.storage.db import Connection, Database
from controller.storage.queries import leases as q

log = logging.getLogger(__name__)

# The lease that lets one replica drive rollouts and publish desired state, chunks and keys.
LEADER_LEASE = "leader"
# A dead leader is replaced within LEASE_TTL_S + one renew interval.
LEASE_TTL_S = 5.0
RENEW_INTERVAL_S = 1.0
# A replica whose heartbeat is this old is dead (a live one beats every RENEW_INTERVAL_S).
DEAD_AFTER_S = LEASE_TTL_S


@dataclass(frozen=True)
class LeaseState:
    """Who holds a lease, since when, until when; epoch counts the changes of holder."""

    name: str
    holder: str
    epoch: int
    acquired: float
    expires: float


class Lease:
    """One named lease as seen by one replica (`holder`)."""

    def __init__(self, db: Database, holder: str, name: str = LEADER_LEASE,
                 ttl_s: float = LEASE_TTL_S) -> None:  # fmt: skip
        """Bind the lease `name` to this replica's database connection."""
        self.db = db
        self.holder = holder
        self.name = name
        self.ttl_s = ttl_s
        self.epoch = 0  # the epoch this replica holds, 0 when it does not hold the lease

    def acquire(self) -> bool:
        """Renew the lease if this replica holds it, take it if free or expired; True if held."""
        with self.db.transaction() as tx:
            now = self.db.clock()
            row = q.lease(tx, self.name)
            if row is None:
                q.create_lease(tx, self.name, self.holder, now, now + self.ttl_s)
                epoch = 1
            elif row[0] == self.holder and row[2] > now and row[1] == self.epoch:
                q.renew_lease(tx, self.name, now, now + self.ttl_s)
                epoch = row[1]
            elif row[2] <= now or row[0] == self.holder:
                # Expired, or ours from before a restart (same name): a new term either way.
                epoch = row[1] + 1
                q.take_lease(tx, self.name, self.holder, epoch, now, now + self.ttl_s)
                log.info("%s took the %s lease (term %d) from %s", self.holder, self.name,
                         epoch, row[0])  # fmt: skip
            else:
                epoch = 0
        self.epoch = epoch
        return epoch > 0

    def held(self, tx: Connection, now: float, margin_s: float = 0.0) -> bool:
        """Inside the caller's transaction (`now` from its database's clock): does this replica
        still hold the lease, this term, for at least `margin_s` more?"""
        if not self.epoch:
            return False
        row = q.lease(tx, self.name)
        return (
            row is not None
            and row[0] == self.holder
            and row[1] == self.epoch
            and row[2] > now + margin_s
        )

    def release(self) -> None:
        """Give the lease up now (clean shutdown), so another replica need not wait the TTL."""
        if not self.epoch:
            return
        with self.db.transaction() as tx:
            q.expire_lease(tx, self.name, self.holder, self.epoch, self.db.clock())
        self.epoch = 0

    def state(self) -> LeaseState | None:
        """The lease row, or None before anyone took it."""
        row = q.lease_row(self.db.conn, self.name)
        if row is None:
            return None
        return LeaseState(
            row["name"], row["holder"], int(row["epoch"]), row["acquired"], row["expires"]
        )


def heartbeat(
    db: Database,
    name: str,
    *,
    started: float,
    leader: bool,
    stats: dict[str, Any],
    client_id: str,
    shared: bool,
) -> None:
    """Record that replica `name` is alive, whether it leads, its MQTT client and counters."""
    now = db.clock()
    with db.transaction(exclusive=False) as tx:
        q.heartbeat(tx, {
            "name": name, "host": socket.gethostname(), "pid": os.getpid(), "started": started,
            "last_seen": now, "leader": int(leader), "stats": json.dumps(stats, sort_keys=True),
            "client_id": client_id, "shared": int(shared),
        })  # fmt: skip


def replicas(db: Database) -> list[dict[str, Any]]:
    """Every replica that ever ran against this database, newest heartbeat first."""
    now = db.clock()
    rows = q.all_replicas(db.conn)
    for r in rows:
        r["stats"] = json.loads(r["stats"])
        r["age_s"] = now - r["last_seen"]
    return rows


def running_elsewhere(db: Database, name: str, wait_s: float) -> dict[str, Any] | None:
    """The live replica already using `name` (its heartbeat still fresh after up to `wait_s`,
    and not this process), or None. A crashed one's heartbeat goes stale within the wait, so a
    supervisor's quick restart goes ahead; a second live process with the name is refused."""
    deadline = time.monotonic() + wait_s
    me = (socket.gethostname(), os.getpid())
    while True:
        row = q.presence(db.conn, name)
        if row is None or (row["host"], row["pid"]) == me:
            return None
        if db.clock() - row["last_seen"] > DEAD_AFTER_S:
            return None
        if time.monotonic() >= deadline:
            return row
        time.sleep(0.25)

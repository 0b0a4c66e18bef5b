"""Server-side search, filter and paging over the device registry (dashboard at 10,000 devices)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from controller.errors import FleetError
from controller.storage.db import Database
from controller.storage.queries import devices as q

# Largest page one request returns: a browser table of more rows is unreadable and slow to draw.
MAX_PAGE = 1000
# Page size when the caller gives none: a screenful or two of rows.
DEFAULT_PAGE = 100
# Longest search string: a device id is at most 64 characters; more is a mistake.
MAX_QUERY = 64


@dataclass(frozen=True)
class DeviceQuery:
    """What to show: a substring of the id, exact profile/state, online or not, one page."""

    q: str = ""
    profile: str | None = None
    state: str | None = None
    online: bool | None = None
    limit: int = DEFAULT_PAGE
    offset: int = 0

    def check(self) -> None:
        """FleetError naming the first bad field (the API answers 400 with it)."""
        if len(self.q) > MAX_QUERY:
            raise FleetError(f"q: at most {MAX_QUERY} characters (a device id is at most 64)")
        if not 1 <= self.limit <= MAX_PAGE:
            raise FleetError(f"limit: must be 1..{MAX_PAGE}, got {self.limit}")
        if self.offset < 0:
            raise FleetError(f"offset: must be >= 0, got {self.offset}")


def search_devices(db: Database, query: DeviceQuery) -> dict[str, Any]:
    """One page of matching devices (ordered by id), how many match, and fleet-wide counts.

    `summary` counts the whole fleet (not just the matches) per profile and state, so that the
    overview's cards stay the fleet's while the table shows a filtered page.
    """
    query.check()
    where = q.search_filter(query.q, query.profile, query.state, query.online)
    total = q.count(db.conn, where)
    rows = q.page(db.conn, where, query.limit, query.offset)
    items = []
    for row in rows:
        item = dict(row)
        item["facts"] = json.loads(item.get("facts") or "{}")
        item["online"] = bool(item["online"])
        items.append(item)
    return {
        "items": items,
        "total": total,
        "limit": query.limit,
        "offset": query.offset,
        "summary": fleet_summary(db),
    }


def fleet_summary(db: Database) -> dict[str, Any]:
    """Devices, online, per profile (total/online) and per state across the whole fleet."""
    by_profile: dict[str, dict[str, int]] = {}
    by_state: dict[str, int] = {}
    devices = online = 0
    for row in q.profile_state_counts(db.conn):
        n, on = int(row["n"]), int(row["online"] or 0)
        profile = row["profile"] or "(none)"
        p = by_profile.setdefault(profile, {"total": 0, "online": 0})
        p["total"] += n
        p["online"] += on
        state = row["state"] or "unknown"
        by_state[state] = by_state.get(state, 0) + n
        devices, online = devices + n, online + on
    return {"devices": devices, "online": online, "by_profile": by_profile, "by_state": by_state}

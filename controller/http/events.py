"""GET /api/v1/events/stream: server-sent `change` events when the fleet's state moves."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

if TYPE_CHECKING:
    from controller.fleet.registry import Fleet
    from controller.http.app import FleetPerThread

# How often the event stream compares the fleet's version (cheap: a few indexed MAX/COUNTs).
EVENTS_POLL_S = 0.5
# A stream ends after this long (the client reconnects, and its token is checked again) ...
EVENTS_MAX_S = 300.0
# ... and carries a comment line this often when nothing changed (proxies, dead clients).
EVENTS_PING_S = 15.0


def event_routes(
    api: APIRouter,
    fleets: FleetPerThread,
    stopping: threading.Event,
    errors: dict[int | str, dict[str, Any]],
    version: Callable[[Fleet], list[Any]],
) -> None:
    """The change stream the dashboard follows (`errors`: the OpenAPI error responses;
    `version`: what changes when the fleet does)."""

    @api.get(
        "/events/stream",
        response_class=StreamingResponse,
        responses={**errors, 200: {"content": {"text/event-stream": {}}}},
    )
    async def events_stream(request: Request) -> StreamingResponse:
        """Server-sent events: `change` whenever devices, rollouts or events change."""

        async def changes() -> Any:
            """`: connected`, then one `change` event per new fleet version, pings between.

            The stream ends after EVENTS_MAX_S (the client reconnects and its token is checked
            again) and when the server stops; a ping every EVENTS_PING_S keeps proxies from
            cutting it and lets a dead client be noticed.
            """
            last = await anyio.to_thread.run_sync(lambda: version(fleets()))
            yield ": connected\n\n"  # after the first read: any later change is reported
            opened = pinged = time.monotonic()
            while not await request.is_disconnected() and not stopping.is_set():
                await anyio.sleep(EVENTS_POLL_S)
                now = time.monotonic()
                if now - opened > EVENTS_MAX_S:
                    return
                current = await anyio.to_thread.run_sync(lambda: version(fleets()))
                if current != last:
                    yield f"event: change\ndata: {json.dumps(current)}\n\n"
                    pinged = now
                elif now - pinged > EVENTS_PING_S:
                    yield ": ping\n\n"
                    pinged = now
                last = current

        return StreamingResponse(
            changes(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

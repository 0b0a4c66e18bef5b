"""Disconnecting a revoked device that is still connected.

mosquitto re-reads its password file and ACL on SIGHUP but keeps already authenticated
connections (checked with 2.0.11: a subscriber whose password was removed kept receiving). The
controller therefore takes the device's session over: it connects once with the device's
client id (which the device listeners force to its username, the device id) and leaves. The
broker drops the device; the reloaded password file or the ACL keeps it out afterwards.
"""

from __future__ import annotations

import logging
import threading
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger(__name__)

__all__ = ["KICK_TIMEOUT_S", "kick_client"]

# A CONNECT/CONNACK round trip on the broker's own host takes milliseconds; 5 s only trips
# when the broker is down (the next message from the device triggers another attempt).
KICK_TIMEOUT_S = 5.0


def kick_client(
    url: str,
    client_id: str,
    *,
    username: str | None,
    password: str | None,
    timeout_s: float = KICK_TIMEOUT_S,
) -> bool:
    """Connect once as `client_id` (plaintext loopback) with a clean session and disconnect;
    True once the broker accepted the connection."""
    parts = urlsplit(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    if username:
        client.username_pw_set(username, password)
    accepted = threading.Event()
    client.on_connect = lambda c, u, flags, reason, props: (
        accepted.set() if not reason.is_failure else None
    )
    try:
        client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=10)
    except OSError as exc:
        log.warning("cannot reach the broker to disconnect %s: %s", client_id, exc)
        return False
    client.loop_start()
    try:
        return accepted.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()


def kick_in_background(
    url: str, client_id: str, *, username: str | None, password: str | None
) -> threading.Thread:
    """kick_client in a daemon thread, so the controller's message loop never waits for it."""

    def run() -> None:
        """Kick and log the outcome."""
        if kick_client(url, client_id, username=username, password=password):
            log.warning("disconnected revoked device %s from the broker", client_id)
        else:
            log.warning("could not take over the session of revoked device %s", client_id)

    thread = threading.Thread(target=run, name=f"kick-{client_id}", daemon=True)
    thread.start()
    return thread

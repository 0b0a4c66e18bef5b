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
import time

from agent.mqtt import MqttSession

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
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    timeout_s: float = KICK_TIMEOUT_S,
) -> bool:
    """Connect once as `client_id` with a clean session and disconnect; True once connected."""
    session = MqttSession(
        url,
        client_id,
        on_message=lambda topic, payload: None,
        on_connect=lambda: None,
        username=username,
        password=password,
        clean_session=True,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        reconnect=False,
    )
    session.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if session.connected.wait(0.05) or session.closed.is_set():
                break
        return session.connected.is_set()
    finally:
        session.stop()


def kick_in_background(url: str, client_id: str, **credentials: str | None) -> threading.Thread:
    """kick_client in a daemon thread, so the controller's message loop never waits for it."""

    def run() -> None:
        """Kick and log the outcome."""
        if kick_client(url, client_id, **credentials):
            log.warning("disconnected revoked device %s from the broker", client_id)
        else:
            log.warning("could not take over the session of revoked device %s", client_id)

    thread = threading.Thread(target=run, name=f"kick-{client_id}", daemon=True)
    thread.start()
    return thread

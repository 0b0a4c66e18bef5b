"""The MQTT session both sides use: paho 2.x with reconnect/backoff, last will, QoS1, acks.

The one module of agent.protocol that is not standard library only: paho-mqtt is a dependency
of the agent and the controller alike (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger(__name__)

# Reconnect backoff: retry quickly after a blip, but never hammer a broker that is down.
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
# Keepalive: the broker declares the device offline (last will) after 1.5 × this many seconds.
KEEPALIVE_S = 30
# QoS1 messages in flight at once: enough to stream chunks, small enough for a tiny device.
MAX_INFLIGHT = 20
# IANA ports: MQTT and MQTT over TLS; what a URL without a port means.
MQTT_PORT = 1883
MQTTS_PORT = 8883

_PLAIN_SCHEMES = ("mqtt", "tcp")
_TLS_SCHEMES = ("mqtts", "ssl")


def parse_mqtt_url(url: str) -> tuple[str, int]:
    """Split mqtt://host:port or mqtts://host:port (default 1883 / 8883); ValueError naming it."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    scheme = parts.scheme.lower()
    if scheme not in _PLAIN_SCHEMES + _TLS_SCHEMES:
        raise ValueError(f"unsupported broker URL scheme {parts.scheme!r} in {url!r}")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} has no host")
    return parts.hostname, parts.port or (MQTTS_PORT if scheme in _TLS_SCHEMES else MQTT_PORT)


def is_tls_url(url: str) -> bool:
    """Whether the broker URL asks for TLS (mqtts:// or ssl://)."""
    return url.split("://", 1)[0].lower() in _TLS_SCHEMES if "://" in url else False


def tls_context(
    ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client TLS context verifying the broker (hostname + chain); ValueError on a bad file.

    `ca_file` None trusts the system's CAs; `cert_file`/`key_file` add a client certificate.
    """
    for key, value in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
        if value is not None and not Path(value).is_file():
            raise ValueError(f"{key} {value!r} does not exist or is not a file")
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file must be given together")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as exc:
            raise ValueError(f"cannot load client certificate {cert_file!r}: {exc}") from None
    return context


class _Client(paho.Client):
    """paho's client, remembering why the last connection attempt failed.

    paho's on_connect_fail callback gets no exception, and paho logs the failure only at its own
    DEBUG level through a logger nobody enabled: the agent then said nothing while it could not
    reach the broker. reconnect() is where paho opens the socket (and TLS), so the error is
    caught there and re-raised unchanged.
    """

    last_error: BaseException | None = None
    # Clients whose network thread this thread owes one wake-up (inside acks_batched()).
    _owed = threading.local()
    # Whether the attempt in progress is the first one of connect_async(): paho then waits
    # twice before the next (once in its first-connection loop, once in its main loop).
    first_attempt = False

    def reconnect(self) -> paho.MQTTErrorCode:
        """paho's reconnect, keeping the OSError (refused, DNS, TLS) for the failure log."""
        connect_async = getattr(
            getattr(paho, "_ConnectionState", None), "MQTT_CS_CONNECT_ASYNC", object()
        )
        first = getattr(self, "_state", None) == connect_async
        self.first_attempt = False
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_error = exc
            self.first_attempt = first  # the double wait follows only a failed socket
            raise

    # paho wakes its network thread for every packet queued from another thread (one byte on a
    # socketpair per PUBACK: a syscall, and a loop turn of the network thread). Inside
    # acks_batched() the queueing thread sees no socketpair, and wakes the loop once at the end.
    @property
    def _sockpairW(self) -> socket.socket | None:
        """paho's wake-up socket, or None while this thread batches acknowledgements."""
        owed = getattr(_Client._owed, "clients", None)
        if owed is not None:
            owed.add(self)
            return None
        real: socket.socket | None = self.__dict__.get("_real_sockpair_w")
        return real

    @_sockpairW.setter
    def _sockpairW(self, value: socket.socket | None) -> None:
        self.__dict__["_real_sockpair_w"] = value

    def wake(self) -> None:
        """Wake the network thread (as paho does after queueing a packet)."""
        real = self.__dict__.get("_real_sockpair_w")
        if real is not None:
            with contextlib.suppress(OSError):  # full (already woken) or closed
                real.send(b"0")


@contextlib.contextmanager
def acks_batched() -> Iterator[None]:
    """Acknowledgements sent inside wake each session's network thread once, at the end,
    instead of once per message."""
    owed: set[_Client] = set()
    _Client._owed.clients = owed
    try:
        yield
    finally:
        _Client._owed.clients = None
        for client in owed:
            client.wake()


def next_backoff_s(client: paho.Client) -> float:
    """The wait paho applies before its next attempt (its exponential backoff, min..max).

    Read from paho 2.x's own state (tests/integration/test_agent_connect_log.py checks the
    prediction against the real gaps between attempts, so a paho change shows up there).
    """
    current = getattr(client, "_reconnect_delay", None)
    low = getattr(client, "_reconnect_min_delay", RECONNECT_MIN_S)
    high = getattr(client, "_reconnect_max_delay", RECONNECT_MAX_S)
    wait = low if current is None else min(current * 2, high)
    if getattr(client, "first_attempt", False):
        wait += min(wait * 2, high)
    return float(wait)


MessageHandler = Callable[[str, bytes], None]


class Ack:
    """The PUBACK of one received QoS1 message, sent when its owner has processed it.

    With manual acknowledgement the broker keeps an unacknowledged message and delivers it
    again after a reconnect, so a crash between receipt and commit loses nothing. An Ack from
    an earlier connection is dropped: its packet id may be reused, and the broker resends it.
    """

    __slots__ = ("_connection", "_mid", "_qos", "_session")

    def __init__(self, session: MqttSession, connection: int, mid: int, qos: int) -> None:
        """Remember which connection and packet id to acknowledge."""
        self._session = session
        self._connection = connection
        self._mid = mid
        self._qos = qos

    def __call__(self) -> None:
        """Acknowledge (once; later calls and stale connections are no-ops). Frees the
        message's place among the session's unacknowledged ones, whatever its connection."""
        session, self._session = self._session, None  # type: ignore[assignment]
        if session is None:
            return
        if self._qos > 0 and session.connection == self._connection:
            session.client.ack(self._mid, self._qos)
        if session.unacked is not None:
            session.unacked.release()


AckedMessageHandler = Callable[[str, bytes, Ack], None]


class MqttSession:
    """One paho client with a network thread, reconnecting forever with backoff."""

    def __init__(
        self,
        url: str,
        client_id: str,
        *,
        on_message: MessageHandler | None = None,
        on_connect: Callable[[], None],
        on_acked_message: AckedMessageHandler | None = None,
        will: tuple[str, bytes] | None = None,
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = True,
        max_inflight: int = MAX_INFLIGHT,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        reconnect: bool = True,
        max_unacked: int = 0,
    ) -> None:
        """Configure the client; nothing connects until start(). mqtts:// URLs use TLS.

        `reconnect=False`: one connection only; `closed` is set when it ends (the owner then
        calls stop()), e.g. to adopt another client's session until that client returns.

        `max_unacked` (with on_acked_message; 0 = no bound): at most this many messages handed
        to the owner and not yet acknowledged; the network thread stops reading until one is.
        Brokers are meant to bound this themselves (mosquitto's max_inflight_messages), but
        mosquitto before 2.0.13 sends up to that many more on every acknowledgement, so a
        backlog moved into the subscriber's memory (docs/telemetry.md, "Inbox bound").
        """
        self.host, self.port = parse_mqtt_url(url)
        self.tls = is_tls_url(url)
        if not self.tls and (ca_file or cert_file or key_file):
            raise ValueError(f"TLS files given but broker URL {url!r} is not mqtts://")
        context = tls_context(ca_file, cert_file, key_file) if self.tls else None
        if (on_message is None) == (on_acked_message is None):
            raise ValueError("give exactly one of on_message and on_acked_message")
        self.connected = threading.Event()
        self.closed = threading.Event()
        self.reconnect = reconnect
        self._stopping = False  # stop() was called: a disconnect now is ours, not a failure
        # Counts connections, so an Ack taken on an earlier one is never sent on a later one.
        self.connection = 0
        self._on_message_cb = on_message
        self._on_acked_cb = on_acked_message
        self._on_connect_cb = on_connect
        # Places for unacknowledged messages: taken by the network thread, freed by Ack.
        self.unacked: threading.Semaphore | None = None
        if max_unacked > 0:
            if on_acked_message is None:
                raise ValueError("max_unacked needs on_acked_message")
            self.unacked = threading.BoundedSemaphore(max_unacked)
        # Times the network thread waited for a free place (the bound at work; tests).
        self.unacked_waits = 0
        # Consecutive failed attempts since the last successful CONNACK (for the log).
        self.failures = 0
        self.client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv311,
            clean_session=clean_session,
            manual_ack=on_acked_message is not None,
            # One connection only: a lost one ends the network thread, never reconnects later.
            reconnect_on_failure=reconnect,
        )
        if context is not None:
            self.client.tls_set_context(context)
        self.client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self.client.max_inflight_messages_set(max_inflight)
        # Keep QoS1 messages queued while offline instead of refusing them.
        self.client.max_queued_messages_set(0)
        if username:
            self.client.username_pw_set(username, password)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = self._handle_connect
        self.client.on_connect_fail = self._handle_connect_fail
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message

    def start(self) -> None:
        """Connect in the background; paho retries with backoff until the broker answers."""
        self.client.connect_async(self.host, self.port, keepalive=KEEPALIVE_S)
        self.client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        qos: int = 1,
        wait_s: float = 0.0,
    ) -> bool:
        """Queue a publish (QoS1 waits in paho's queue across a reconnect); optionally await it.

        Returns True only when `wait_s` was given and the broker acknowledged the message in
        time, so a caller can persist "sent" only for what really reached the broker.
        """
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            log.warning("publish to %s failed: %s", topic, paho.error_string(info.rc))
        elif wait_s and self.connected.is_set():
            try:
                info.wait_for_publish(wait_s)
                if info.is_published():
                    return True
            except (RuntimeError, ValueError):  # not sent on this connection
                pass
            log.warning("publish to %s not acknowledged within %.1f s", topic, wait_s)
        return False

    def subscribe(self, *topics: str) -> None:
        """Subscribe at QoS1."""
        self.client.subscribe([(t, 1) for t in topics])

    def unsubscribe(self, *topics: str) -> None:
        """Drop subscriptions."""
        self.client.unsubscribe(list(topics))

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        """Mark connected and let the owner (re)subscribe and announce itself."""
        if reason_code.is_failure:
            self.failures += 1
            log.warning(
                "broker %s:%s refused the connection (attempt %d): %s%s",
                self.host,
                self.port,
                self.failures,
                reason_code,
                self._retry_note(),
            )
            return
        if self.failures:
            log.info(
                "connected to %s:%s after %d failed attempts", self.host, self.port, self.failures
            )
        else:
            log.info("connected to %s:%s", self.host, self.port)
        self.failures = 0
        self.connection += 1
        self.connected.set()
        self._on_connect_cb()

    def _retry_note(self) -> str:
        """'; retrying in N s' with paho's backoff, or '' for a one-shot session."""
        if not self.reconnect:
            return ""
        return f"; retrying in {next_backoff_s(self.client):.0f} s"

    def _handle_connect_fail(self, client, userdata) -> None:  # type: ignore[no-untyped-def]
        """Log a connection attempt that failed before MQTT (refused, DNS, TLS) and the backoff."""
        self.failures += 1
        error = getattr(client, "last_error", None)
        reason = f"{type(error).__name__}: {error}" if error is not None else "unknown error"
        log.warning(
            "cannot connect to %s%s:%s (attempt %d): %s%s",
            "mqtts://" if self.tls else "mqtt://",
            self.host,
            self.port,
            self.failures,
            reason,
            self._retry_note(),
        )

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        """Mark disconnected; paho's loop reconnects with backoff."""
        self.connected.clear()
        if self._stopping:
            if not self.reconnect:
                self.closed.set()
            log.info("disconnected from %s:%s (stopped)", self.host, self.port)
            return
        if not self.reconnect:
            self.closed.set()
            log.info("disconnected (%s)", reason_code)
            return
        log.info("disconnected (%s); reconnecting with backoff", reason_code)

    def _handle_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        """Hand the message to the owner; a handler bug must not kill the network thread."""
        try:
            if self._on_acked_cb is not None:
                if self.unacked is not None and not self._take_place():
                    return  # stopping: unacknowledged, so the broker delivers it again
                ack = Ack(self, self.connection, message.mid, message.qos)
                try:
                    self._on_acked_cb(message.topic, bytes(message.payload), ack)
                except Exception:
                    if self.unacked is not None:
                        self.unacked.release()  # never handed over: nobody will call ack
                    raise
            else:
                assert self._on_message_cb is not None
                self._on_message_cb(message.topic, bytes(message.payload))
        except Exception:
            log.exception("handler failed for %s", message.topic)

    def _take_place(self) -> bool:
        """Wait for a free place among the unacknowledged messages; False once stopping.

        While the network thread waits it reads nothing, so the broker keeps the backlog (TCP
        flow control, then its own per-session queue); the wait lasts one ingest batch.
        """
        assert self.unacked is not None
        if self.unacked.acquire(blocking=False):
            return True
        self.unacked_waits += 1
        while not self._stopping:
            if self.unacked.acquire(timeout=0.1):
                return True
        return False

"""MqttProbe: a paho 2.x test client that collects messages and publishes with PUBACK waits."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.client import MQTTMessage, topic_matches_sub
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from controller.brokers.base import BrokerHandle

# Generous for a loaded CI runner, yet a test that waits this long has certainly failed.
DEFAULT_TIMEOUT_S = 10.0
# Short keepalive so a broker notices a probe that died with its test (last wills fire quickly).
KEEPALIVE_S = 15


@dataclass(frozen=True)
class ReceivedMessage:
    """One message a probe received: topic, raw payload, QoS, retain flag and arrival time."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    received_at: float = field(compare=False)

    def json(self) -> Any:
        """The payload decoded as JSON."""
        return json.loads(self.payload)


MessagePredicate = Callable[[ReceivedMessage], bool]


@dataclass(frozen=True)
class LastWill:
    """A last-will message the broker publishes when the probe drops without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttProbe:
    """A paho client (CallbackAPIVersion.VERSION2) for tests: subscribe, wait_for, publish."""

    def __init__(
        self,
        handle: BrokerHandle,
        *,
        client_id: str | None = None,
        protocol: int = mqtt.MQTTv311,
        clean_session: bool = True,
        will: LastWill | None = None,
    ) -> None:
        """Create (not connect) a probe for the broker behind `handle`."""
        self.handle = handle
        self.client_id = client_id or f"probe-{uuid.uuid4().hex[:12]}"
        self._cond = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._connect_result: ReasonCode | None = None
        self._subacks: dict[int, list[ReasonCode]] = {}
        kwargs: dict[str, Any] = {"client_id": self.client_id, "protocol": protocol}
        if protocol != mqtt.MQTTv5:
            kwargs["clean_session"] = clean_session
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, **kwargs)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        if will is not None:
            self.client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    # ---------------------------------------------------------------- lifecycle

    def connect(self, timeout: float = DEFAULT_TIMEOUT_S) -> MqttProbe:
        """Connect, start paho's network thread and wait for a successful CONNACK."""
        with self._cond:
            self._connect_result = None
        self.client.connect(self.handle.host, self.handle.port, keepalive=KEEPALIVE_S)
        self.client.loop_start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._connect_result is not None, timeout):
                raise TimeoutError(f"{self.client_id}: no CONNACK from {self.handle.url}")
            result = self._connect_result
        assert result is not None
        if result.is_failure:
            raise ConnectionError(
                f"{self.client_id}: connect refused by {self.handle.url}: {result}"
            )
        return self

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread (safe to call twice)."""
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """Simulate a crash: stop the network thread and close the socket without DISCONNECT."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def __enter__(self) -> MqttProbe:
        """Connect on entering a ``with`` block."""
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        """Close on leaving a ``with`` block."""
        self.close()

    # ---------------------------------------------------------------- subscribe / receive

    def subscribe(
        self, topic_filter: str, qos: int = 1, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        """Subscribe and wait for the SUBACK; raise if the broker refused the filter."""
        rc, mid = self.client.subscribe(topic_filter, qos)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectionError(f"{self.client_id}: subscribe {topic_filter!r} failed: rc={rc}")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, timeout):
                raise TimeoutError(f"{self.client_id}: no SUBACK for {topic_filter!r}")
            codes = self._subacks.pop(mid)
        if any(code.is_failure for code in codes):
            raise ConnectionError(f"{self.client_id}: broker refused {topic_filter!r}: {codes}")

    def messages(self, topic_pattern: str = "#") -> list[ReceivedMessage]:
        """A snapshot of every message received so far whose topic matches `topic_pattern`."""
        with self._cond:
            return [m for m in self._messages if topic_matches_sub(topic_pattern, m.topic)]

    def clear(self) -> None:
        """Forget every message received so far."""
        with self._cond:
            self._messages.clear()

    def wait_for(
        self,
        topic_pattern: str,
        predicate: MessagePredicate | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> ReceivedMessage:
        """The first received message matching the MQTT filter and `predicate`, waiting for it."""
        return self.wait_for_count(topic_pattern, 1, predicate, timeout)[0]

    def wait_for_count(
        self,
        topic_pattern: str,
        count: int,
        predicate: MessagePredicate | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> list[ReceivedMessage]:
        """The first `count` matching messages, in arrival order; AssertionError after `timeout`."""

        def matching() -> list[ReceivedMessage]:
            return [
                m
                for m in self._messages
                if topic_matches_sub(topic_pattern, m.topic) and (predicate is None or predicate(m))
            ]

        with self._cond:
            if self._cond.wait_for(lambda: len(matching()) >= count, timeout):
                return matching()[:count]
            found = len(matching())
            seen = sorted({m.topic for m in self._messages})
        raise AssertionError(
            f"{self.client_id}: wanted {count} message(s) on {topic_pattern!r}, got {found} within "
            f"{timeout:.1f}s; topics seen: {seen[:10]}"
        )

    # ---------------------------------------------------------------- publish

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = 1,
        retain: bool = False,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """Publish and, for QoS ≥ 1, wait until the broker acknowledged it (PUBACK/PUBCOMP)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"{self.client_id}: publish to {topic!r} failed: rc={info.rc}")
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"{self.client_id}: no acknowledgement for {topic!r} in {timeout}s")

    # ---------------------------------------------------------------- paho callbacks

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        """Record the CONNACK result for connect()."""
        with self._cond:
            self._connect_result = reason_code
            self._cond.notify_all()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Any,
    ) -> None:
        """Record the SUBACK reason codes for subscribe()."""
        with self._cond:
            self._subacks[mid] = list(reason_codes)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: MQTTMessage) -> None:
        """Collect a received message."""
        received = ReceivedMessage(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            received_at=time.monotonic(),
        )
        with self._cond:
            self._messages.append(received)
            self._cond.notify_all()


def wait_until(condition: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Poll `condition` until it is true or `timeout` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        # Polling every 20 ms is far below any timing a broker test cares about.
        time.sleep(0.02)
    return True

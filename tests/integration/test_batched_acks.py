"""Acknowledgements of a batch wake paho's network thread once (transport.acks_batched), and
every PUBACK still reaches the broker."""

from __future__ import annotations

import threading
from typing import Any

from agent.protocol.transport import Ack, MqttSession, acks_batched
from controller.brokers.base import BrokerHandle
from tests.mqtt_helpers import MqttProbe
from tests.polling import wait_until

WINDOW = 64  # the generated config's max_inflight_messages: no more until PUBACKs arrive
TOTAL = 100


class _CountingSocket:
    """The wake-up socket of paho's network thread, counting what is sent on it."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.sends = 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        return int(self.real.send(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_batch_of_acks_wakes_the_network_thread_once(mosquitto_broker: BrokerHandle) -> None:
    acks: list[Ack] = []
    lock = threading.Lock()
    ready = threading.Event()

    def on_message(topic: str, payload: bytes, ack: Ack) -> None:
        if topic == "acks/ready":
            ready.set()
            ack()
            return
        with lock:
            acks.append(ack)

    session = MqttSession(
        mosquitto_broker.url,
        "batched-acks",
        on_acked_message=on_message,
        on_connect=lambda: session.subscribe("acks/#"),
        clean_session=False,
    )
    session.start()
    try:
        assert session.connected.wait(10)
        with MqttProbe(mosquitto_broker).connect() as probe:
            wait_until(lambda: probe.publish("acks/ready", b"") or ready.is_set(), 10, "SUBACK")
            for i in range(TOTAL):
                probe.publish("acks/x", str(i).encode())
            wait_until(lambda: len(acks) >= WINDOW, 10, "the broker's in-flight window")
            client = session.client
            counting = _CountingSocket(client.__dict__["_real_sockpair_w"])
            client.__dict__["_real_sockpair_w"] = counting
            with lock:
                first = list(acks)
            with acks_batched():
                for ack in first:
                    ack()
            assert counting.sends == 1
            # The broker sends the rest only once it has the PUBACKs of the window.
            wait_until(lambda: len(acks) == TOTAL, 10, "the messages after the window")
            with acks_batched():
                for ack in acks[len(first) :]:
                    ack()
    finally:
        session.stop()

"""The paho side of the simulation: one client per agent, its callbacks and (re)connects, all
driven by Simulation's epoll loop (controller/simulate/loop.py) instead of paho's threads."""

from __future__ import annotations

import contextlib
import logging
import random
import select
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol import dump
from controller.simulate.agent import RECONNECT_MIN_S, SimAgent, SimCounters

if TYPE_CHECKING:
    pass

log = logging.getLogger("controller.simulate")

# Clients whose CONNECT is out but whose CONNACK is not in yet: a 1,000-device start then
# reaches the broker as a steady stream instead of 1,000 simultaneous handshakes.
MAX_CONNECTING = 64
# Inflight window, reconnect backoff ceiling: as the agent (protocol/transport.py).
MAX_INFLIGHT = 20
RECONNECT_MAX_S = 30.0
# ±20 % jitter on reconnect delays, so a broker restart is not answered by one burst.
RECONNECT_JITTER = 0.2


class PahoPlumbing:
    """Client creation, paho callbacks and the connect queue of a Simulation (a mixin)."""

    if TYPE_CHECKING:
        host: str
        port: int
        keepalive_s: int
        counters: SimCounters
        _ep: select.epoll
        _by_fd: dict[int, SimAgent]
        _connect_queue: deque[SimAgent]
        _connecting: int
        _dirty: set[SimAgent]
        _stopping: bool

        def call_at(self, when: float, callback: Callable[[], None]) -> None: ...
        def drop_connection(self, agent: SimAgent, down_for: float) -> None: ...

    def new_client(self, agent: SimAgent) -> paho.Client:
        """A paho client for an agent: MQTT 3.1.1, clean session, driven by our epoll loop."""
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=agent.device_id,
            protocol=paho.MQTTv311,
            clean_session=True,
            userdata=agent,
        )
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.max_queued_messages_set(0)  # keep QoS1 messages across a reconnect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        if agent.telemetry is not None:
            client.on_publish = self._on_publish  # PUBACKs release telemetry batches
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.connect_async(self.host, self.port, keepalive=self.keepalive_s)
        return client

    def _on_socket_open(self, client: paho.Client, agent: SimAgent, sock: Any) -> None:
        """Watch a new socket for reads."""
        agent.fd = sock.fileno()
        agent.write_registered = False
        self._by_fd[agent.fd] = agent
        self._ep.register(agent.fd, select.EPOLLIN)

    def _on_socket_close(self, client: paho.Client, agent: SimAgent, sock: Any) -> None:
        """Stop watching a socket paho is about to close."""
        if agent.fd is not None:
            self._by_fd.pop(agent.fd, None)
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(agent.fd)
            agent.fd = None

    def _on_connect(
        self, client: paho.Client, agent: SimAgent, flags: Any, reason: Any, props: Any
    ) -> None:
        """CONNACK: count it and let the agent subscribe and announce itself."""
        self._connect_done(agent)
        if reason.is_failure:
            self.counters.connect_failures += 1
            log.warning("%s: broker refused the connection: %s", agent.device_id, reason)
            return
        agent.connected = True
        agent.backoff = RECONNECT_MIN_S
        self.counters.connected += 1
        self.counters.connects += 1
        self._guard(agent, agent.on_connected)

    def _on_disconnect(
        self, client: paho.Client, agent: SimAgent, flags: Any, reason: Any, props: Any
    ) -> None:
        """Lost or closed: schedule a reconnect with backoff (after a fault's down time)."""
        self._connect_done(agent)
        was_connected = agent.connected
        if was_connected:
            agent.connected = False
            self.counters.connected -= 1
        if self._stopping:
            return
        if was_connected:
            delay = RECONNECT_MIN_S
        else:
            delay = agent.backoff
            agent.backoff = min(agent.backoff * 2, RECONNECT_MAX_S)
        self._schedule_connect(agent, delay)

    def _on_publish(
        self, client: paho.Client, agent: SimAgent, mid: int, reason: Any, props: Any
    ) -> None:
        """PUBACK of a QoS1 publish: a telemetry batch with this packet id is delivered."""
        if agent.telemetry is not None:
            self._guard(agent, agent.telemetry.on_puback, mid)

    def _on_message(self, client: paho.Client, agent: SimAgent, message: paho.MQTTMessage) -> None:
        """Hand a message to its agent."""
        self._guard(agent, agent.on_message, message.topic, message.payload)

    def _guard(self, agent: SimAgent, func: Callable[..., None], *args: Any) -> None:
        """Run agent code; a bug hits one message of one agent, not the loop."""
        try:
            func(*args)
        except Exception:
            self.counters.errors += 1
            log.exception("%s: simulated agent failed", agent.device_id)
        self._dirty.add(agent)

    def _connect_done(self, agent: SimAgent) -> None:
        """The connect attempt of an agent ended (CONNACK or failure)."""
        if agent.connecting is not None:
            agent.connecting = None
            self._connecting -= 1

    def _schedule_connect(self, agent: SimAgent, delay: float) -> None:
        """Queue a (re)connect after `delay` ± jitter, never before a fault's down time ends."""
        if agent.reconnect_pending:
            return
        agent.reconnect_pending = True
        jitter = 1.0 + random.uniform(-RECONNECT_JITTER, RECONNECT_JITTER)
        when = max(time.monotonic() + delay * jitter, agent.down_until)
        self.call_at(when, lambda: self._connect_queue.append(agent))

    def _start_connects(self) -> None:
        """Open connections from the queue while fewer than MAX_CONNECTING await CONNACK."""
        while self._connect_queue and self._connecting < MAX_CONNECTING and not self._stopping:
            agent = self._connect_queue.popleft()
            agent.reconnect_pending = False
            client = agent.client
            # The will carries the state at connect time, like the daemon's.
            client.will_set(
                agent.base + "status", dump(agent.status(online=False)), qos=1, retain=True
            )
            try:
                client.reconnect()
            except OSError as exc:
                self.counters.connect_failures += 1
                log.debug("%s: connect failed: %s", agent.device_id, exc)
                delay = agent.backoff
                agent.backoff = min(agent.backoff * 2, RECONNECT_MAX_S)
                self._schedule_connect(agent, delay)
                continue
            agent.connecting = time.monotonic()
            self._connecting += 1
            self._dirty.add(agent)

"""The in-process amqtt broker: its own thread and asyncio loop, stoppable without hanging."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import threading
import time
from typing import TYPE_CHECKING

from controller.brokers.base import (
    _POLL_INTERVAL_S,
    AUTO_PORT_ATTEMPTS,
    START_TIMEOUT_S,
    BrokerError,
    BrokerHandle,
    PortInUseError,
    _check_port_free,
    free_port,
    is_loopback,
)

if TYPE_CHECKING:
    from amqtt.broker import Broker

log = logging.getLogger(__name__)

# amqtt logs every connection, packet and state change at INFO/DEBUG and WARNs on a bare TCP
# probe; ERROR keeps real failures visible. Only applied when nobody configured the logger.
AMQTT_LOG_LEVEL = logging.ERROR
# Why amqtt stays on loopback (checked in amqtt 0.12.1, docs/security.md): its FileAuthPlugin
# reads argon2 / sha512_crypt hashes, not our mosquitto $7$ file; TopicAccessControlListPlugin
# takes fixed per-username topic lists (no %u pattern), and nothing binds the client id to the
# username, so device A could take over B's session. Beyond loopback that is not safe.
AMQTT_LOOPBACK_ONLY = (
    "the in-process amqtt broker only listens on loopback: it cannot confine each device to "
    "its own topics or stop client-id takeover, so listening on {host} would let any device read "
    "and forge another's traffic; install mosquitto (apt-get install mosquitto) for a secured "
    "broker, or use --broker with one you run"
)


class _PortProbeFilter(logging.Filter):
    """Drop amqtt's ERROR for a TCP connection that never sends CONNECT (probes, health checks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record except the two amqtt writes for a bare TCP probe."""
        message = str(record.msg)
        return not message.startswith(("No data from", "Failed to initialize client session"))


def _quiet_amqtt_logging() -> None:
    """Raise amqtt's (and its state machine library's) log level unless the user set one."""
    for name in ("amqtt", "transitions"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(AMQTT_LOG_LEVEL)
    broker_logger = logging.getLogger("amqtt.broker")
    if not any(isinstance(f, _PortProbeFilter) for f in broker_logger.filters):
        broker_logger.addFilter(_PortProbeFilter())


def _amqtt_config(host: str, port: int) -> dict[str, object]:
    """amqtt 0.12 config: one `external` listener (we own the socket) and anonymous auth."""
    return {
        # `external`: amqtt opens no socket; our asyncio server hands it each connection through
        # Broker.external_connected(). That way we can close client connections before
        # Broker.shutdown(), which otherwise can hang (see AmqttThread._serve). `bind` is only
        # informative for an external listener.
        "listeners": {"default": {"type": "external", "bind": f"{host}:{port}"}},
        # The `plugins` form replaces the deprecated `auth` / `topic-check` sections. Leaving out
        # EventLoggerPlugin, PacketLoggerPlugin and BrokerSysPlugin (a $SYS publish every 20 s)
        # keeps the embedded broker quiet; with no topic plugin, every topic is allowed.
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


class AmqttThread:
    """An amqtt Broker running on its own asyncio loop in a daemon thread."""

    def __init__(self, host: str, port: int) -> None:
        """Prepare (not start) a broker thread for `host:port`."""
        self.host = host
        self.port = port
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = False
        self._stop_timeout = 5.0
        self._thread = threading.Thread(target=self._run, name=f"amqtt-{port}", daemon=True)

    def start(self, timeout: float) -> None:
        """Start the thread and block until the listener is bound, or raise what went wrong."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise BrokerError(
                f"amqtt did not start on {self.host}:{self.port} within {timeout:.0f}s"
            )
        if self._error is not None:
            self._thread.join(timeout)
            if isinstance(self._error, OSError) and self._error.errno == errno.EADDRINUSE:
                raise PortInUseError(self.host, self.port) from self._error
            msg = f"amqtt failed to start on {self.host}:{self.port}: {self._error}"
            raise BrokerError(msg) from self._error

    def is_running(self) -> bool:
        """Whether the broker loop is up and serving."""
        return self._started and self._thread.is_alive()

    def stop(self, timeout: float) -> None:
        """Ask the loop to shut the broker down and wait for the thread to end."""
        self._stop_timeout = timeout
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop_event.set)
        if self._thread.is_alive():
            # shutdown itself is bounded by `timeout` inside the loop; allow for task cancellation
            self._thread.join(timeout + 2.0)
        if self._thread.is_alive():
            raise BrokerError(
                f"amqtt on {self.host}:{self.port} did not stop within {timeout:.1f}s"
            )

    def _run(self) -> None:
        """Thread body: own event loop, run the broker until asked to stop, then close cleanly."""
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            with contextlib.suppress(Exception):
                _cancel_pending(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._started = False
            self._ready.set()

    async def _serve(self) -> None:
        """Bind, start amqtt, serve until asked to stop, then close clients and shut amqtt down."""
        # imported here: amqtt is heavy and only the fallback broker
        from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
        from amqtt.broker import Broker

        self._stop_event = asyncio.Event()
        clients: set[asyncio.StreamWriter] = set()
        broker: Broker | None = None

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            """Hand one TCP connection to amqtt and forget it when amqtt is done with it."""
            clients.add(writer)
            try:
                assert broker is not None
                await broker.external_connected(
                    StreamReaderAdapter(reader), StreamWriterAdapter(writer), "default"
                )
            except Exception:  # one broken client must not take the listener down
                log.debug("amqtt client handler failed", exc_info=True)
            finally:
                clients.discard(writer)
                writer.close()

        try:
            # Bind before starting amqtt (start_serving=False): a taken port fails right here.
            server = await asyncio.start_server(
                on_client, self.host, self.port, reuse_address=True, start_serving=False
            )
        except OSError as exc:
            self._error = exc
            self._ready.set()
            return
        try:
            broker = Broker(_amqtt_config(self.host, self.port))
            await broker.start()
            await server.start_serving()
        except Exception as exc:
            server.close()
            self._error = exc
            self._ready.set()
            return
        self._started = True
        self._ready.set()
        await self._stop_event.wait()
        self._started = False
        await self._shutdown(server, broker, clients)

    async def _shutdown(
        self, server: asyncio.Server, broker: Broker, clients: set[asyncio.StreamWriter]
    ) -> None:
        """Close the listener and every client, then Broker.shutdown(), all within the timeout."""
        deadline = time.monotonic() + self._stop_timeout
        server.close()
        # amqtt 0.12 on Python 3.11: Broker.shutdown() cancels each client's reader task, and
        # asyncio.wait_for() in that reader can swallow the cancellation when a packet arrives
        # at the same moment; the reader then blocks forever and shutdown() with it. Closing the
        # sockets first ends every session through the ordinary EOF path instead.
        for writer in list(clients):
            writer.close()
        while clients and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_INTERVAL_S)
        try:
            await asyncio.wait_for(broker.shutdown(), timeout=max(deadline - time.monotonic(), 0.1))
        except (Exception, asyncio.CancelledError):  # it is going away either way
            log.warning("amqtt on %s:%d did not shut down cleanly", self.host, self.port)


def _cancel_pending(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and drain every task left on `loop` (client handlers amqtt did not stop itself)."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


def start_amqtt(*, host: str = "127.0.0.1", port: int = 0) -> BrokerHandle:
    """Start amqtt in-process (own thread and asyncio loop); port 0 picks a free port."""
    if not is_loopback(host):
        raise BrokerError(AMQTT_LOOPBACK_ONLY.format(host=host))
    _quiet_amqtt_logging()
    attempts = AUTO_PORT_ATTEMPTS if port == 0 else 1
    for attempt in range(1, attempts + 1):
        chosen = free_port(host) if port == 0 else port
        try:
            _check_port_free(host, chosen)
            runner = AmqttThread(host, chosen)
            runner.start(START_TIMEOUT_S)
        except PortInUseError:
            if attempt == attempts:
                raise
            continue
        log.info("amqtt listening on %s:%d (in-process)", host, chosen)
        return BrokerHandle("amqtt", host, chosen, None, None, _amqtt=runner)
    raise AssertionError("unreachable")  # pragma: no cover

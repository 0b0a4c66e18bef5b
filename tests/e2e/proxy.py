"""A loopback TCP proxy for fault tests: cut, stall, restore and throttle the agent's link.

Sits between clients (agents) and an upstream port (the broker), on 127.0.0.1 only. Threads,
not asyncio, so a test can drive it from plain synchronous code:

    proxy = TcpProxy(broker.port).start()
    agent = start_agent("dev", broker=proxy.url)
    proxy.cut()                 # reset every connection; new ones are closed at once
    proxy.restore()
    proxy.cut_after(300_000)    # cut automatically once 300 kB more went upstream -> client
    proxy.stop()
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

# Bytes moved per read: small enough that a throttle and cut_after() act with fine grain.
_READ_SIZE = 16 * 1024
# How often blocked loops re-check for stop/cut: short, so tests never wait on the proxy.
_POLL_S = 0.05


@dataclass
class _Link:
    """One client connection and its upstream connection."""

    client: socket.socket
    upstream: socket.socket
    threads: list[threading.Thread] = field(default_factory=list)

    def close(self, reset: bool) -> None:
        """Close both sockets; with `reset`, send RST (SO_LINGER 0) like a dropped link."""
        for sock in (self.client, self.upstream):
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """Forward 127.0.0.1:<port> to 127.0.0.1:<upstream_port>, with faults on demand."""

    def __init__(self, upstream_port: int, *, down_bytes_per_s: float | None = None) -> None:
        """Prepare (not start) the proxy; `down_bytes_per_s` throttles upstream -> client."""
        self.upstream_port = upstream_port
        self.down_bytes_per_s = down_bytes_per_s
        self.bytes_down = 0
        self.bytes_up = 0
        self.connections = 0
        self.cuts = 0
        self.cut_done = threading.Event()  # set when a cut (manual or automatic) happened
        self._lock = threading.Condition()
        self._links: list[_Link] = []
        self._mode: str | None = None  # None (forwarding), "reset" or "stall"
        self._cut_at: int | None = None
        self._cut_mode = "reset"
        self._stopped = threading.Event()
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="proxy-accept", daemon=True
        )

    @property
    def url(self) -> str:
        """The broker URL clients use to go through the proxy."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        """Listen and start forwarding."""
        self._server.listen(64)
        self._server.settimeout(_POLL_S)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close every connection and the listener."""
        self._stopped.set()
        self._acceptor.join(5)
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close(reset=False)
        with contextlib.suppress(OSError):
            self._server.close()

    # ------------------------------------------------------------------ faults
    def cut(self, mode: str = "reset") -> None:
        """Take the link down: "reset" drops every connection (RST) and closes new ones at once;
        "stall" keeps connections open but forwards nothing (a black hole TCP cannot see)."""
        if mode not in ("reset", "stall"):
            raise ValueError(f"unknown cut mode {mode!r}: expected 'reset' or 'stall'")
        with self._lock:
            self._mode = mode
            self._cut_at = None
            self.cuts += 1
            links = list(self._links) if mode == "reset" else []
            if mode == "reset":
                self._links = []
            self._lock.notify_all()
        for link in links:
            link.close(reset=True)
        self.cut_done.set()

    def cut_after(self, down_bytes: int, mode: str = "reset") -> None:
        """Cut automatically once `down_bytes` more bytes went upstream -> client."""
        with self._lock:
            self._cut_at = self.bytes_down + down_bytes
            self._cut_mode = mode
            self.cut_done.clear()

    def restore(self) -> None:
        """Forward again (stalled connections resume; reset ones reconnect on their own)."""
        with self._lock:
            self._mode = None
            self._lock.notify_all()

    @property
    def is_cut(self) -> bool:
        """True while the link is down."""
        return self._mode is not None

    # ------------------------------------------------------------------ forwarding
    def _accept_loop(self) -> None:
        """Accept clients; pair each with a fresh upstream connection (or close it while cut)."""
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._mode == "reset":
                _Link(client, socket.socket()).close(reset=True)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
            except OSError:  # upstream (the broker) is down: the client sees a dropped link
                _Link(client, socket.socket()).close(reset=True)
                continue
            for sock in (client, upstream):
                sock.settimeout(_POLL_S)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream)
            with self._lock:
                self._links.append(link)
                self.connections += 1
            for src, dst, down in ((upstream, client, True), (client, upstream, False)):
                thread = threading.Thread(
                    target=self._pump, args=(link, src, dst, down), name="proxy-pump", daemon=True
                )
                link.threads.append(thread)
                thread.start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket, down: bool) -> None:
        """Copy bytes one way until either side closes; honour stall, throttle and cut_after."""
        while not self._stopped.is_set():
            with self._lock:
                while self._mode == "stall" and not self._stopped.is_set():
                    self._lock.wait(_POLL_S)
            try:
                data = src.recv(_READ_SIZE)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            with self._lock:  # a cut while this read was in flight: hold it, or drop the link
                while self._mode == "stall" and not self._stopped.is_set():
                    self._lock.wait(_POLL_S)
                if self._mode == "reset":
                    break
            try:
                dst.sendall(data)
            except OSError:
                break
            if down:
                self._count_down(len(data))
            else:
                self.bytes_up += len(data)
        link.close(reset=False)
        with self._lock:
            if link in self._links:
                self._links.remove(link)

    def _count_down(self, size: int) -> None:
        """Count bytes towards the client; throttle; trigger a pending cut_after()."""
        with self._lock:
            self.bytes_down += size
            trigger = self._cut_at is not None and self.bytes_down >= self._cut_at
        if trigger:
            self.cut(self._cut_mode)
        if self.down_bytes_per_s:
            time.sleep(size / self.down_bytes_per_s)

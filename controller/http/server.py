"""uvicorn in a thread of the controller process: the HTTP API and dashboard of `edgefleet up`."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from controller.http.app import create_app
from controller.http.auth import ensure_local_token

log = logging.getLogger(__name__)

# Where `up --http` writes its URL under the home (`edgefleet status` reads it).
HTTP_URL_FILE = "http-url"
# How long start() waits for uvicorn to serve on the bound socket before giving up.
START_TIMEOUT_S = 15.0
# Open connections (an event stream) get this long to finish once stop() is called.
GRACEFUL_STOP_S = 2


def listen_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket whose connections send small writes at once (TCP_NODELAY).

    socket.create_server() makes its socket with protocol 0, and asyncio sets TCP_NODELAY only
    on sockets whose protocol is IPPROTO_TCP: with Nagle on, a response written in two parts
    (headers, then body) waited for the client's delayed ACK, 40 ms on Linux, on every request
    of a kept-alive connection (bench/RESULTS.md, "HTTP request latency").
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as create_server does
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited on accept
        sock.bind((host, port))
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock


class HttpServer:
    """The API app served by uvicorn from a daemon thread; `start()` returns once it listens."""

    def __init__(
        self, home: Path, host: str = "127.0.0.1", port: int = 0, db: str | None = None
    ) -> None:
        """Serve the fleet in `home` (database `db`, default as Fleet) on host:port (0 = any)."""
        self.home = home
        self.db = db
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._status: Callable[[], dict[str, Any]] | None = None
        self._app: FastAPI | None = None

    @property
    def url(self) -> str:
        """http://HOST:PORT of the running server (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def set_status(self, status: Callable[[], dict[str, Any]] | None) -> None:
        """Report `status()` (the controller loop's health) in /healthz; None: no loop here."""
        self._status = status
        if self._app is not None:
            self._app.state.status = status

    def start(self) -> HttpServer:
        """Bind (OSError if the address is taken), start serving, wait until it accepts."""
        sock = listen_tcp(self.host, self.port)
        self._socket = sock
        self.port = sock.getsockname()[1]
        app = self._app = create_app(self.home, self.db)
        app.state.status = self._status
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_STOP_S,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="edgefleet-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            self.stop()
            raise OSError(f"the HTTP server did not start on {self.url}")
        log.info("HTTP API on %s", self.url)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit, wait for its thread, close the socket."""
        if self._server is not None:
            app = self._server.config.app
            stopping = getattr(getattr(app, "state", None), "stopping", None)
            if stopping is not None:
                stopping.set()  # event streams end by themselves instead of being cancelled
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(GRACEFUL_STOP_S + 5.0)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(5.0)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None


def start_http(home: Path, host: str, port: int) -> tuple[HttpServer, str]:
    """`edgefleet up --http`: the `local` admin token, a started server and the dashboard URL.

    The server's URL is written to HOME/HTTP_URL_FILE for `edgefleet status`.
    """
    token = ensure_local_token(home)
    server = HttpServer(home, host, port).start()
    (home / HTTP_URL_FILE).write_text(server.url + "\n")
    return server, f"{server.url}/#token={token}"


def recorded_url(home: Path) -> str | None:
    """The URL the last `up --http` on `home` served on, or None."""
    try:
        return (home / HTTP_URL_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None

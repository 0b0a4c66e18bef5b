"""uvicorn in a thread of the controller process: the HTTP API and dashboard of `edgefleet up`."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn

from controller.http.app import create_app
from controller.http.auth import ensure_local_token

log = logging.getLogger(__name__)

# How long start() waits for uvicorn to serve on the bound socket before giving up.
START_TIMEOUT_S = 15.0
# Open connections (an event stream) get this long to finish once stop() is called.
GRACEFUL_STOP_S = 2


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

    @property
    def url(self) -> str:
        """http://HOST:PORT of the running server (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HttpServer:
        """Bind (OSError if the address is taken), start serving, wait until it accepts."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, reuse_port=False)
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.home, self.db),
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
    """`edgefleet up --http`: the `local` admin token, a started server and the dashboard URL."""
    token = ensure_local_token(home)
    server = HttpServer(home, host, port).start()
    return server, f"{server.url}/#token={token}"

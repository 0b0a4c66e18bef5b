"""The API server's connections have Nagle off: a response written in parts is not held back
for the client's delayed ACK (40 ms per request on a kept-alive connection before)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

pytest.importorskip("fastapi")  # controller-only (not in the slim device env)
from controller.http.server import HttpServer, listen_tcp


def test_the_listener_is_tcp_with_nodelay_so_asyncio_keeps_it_on_every_connection() -> None:
    sock = listen_tcp("127.0.0.1", 0)
    try:
        # asyncio sets TCP_NODELAY on an accepted connection only for protocol IPPROTO_TCP;
        # socket.create_server() leaves the protocol 0.
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        client = socket.create_connection(sock.getsockname()[:2])
        accepted, _ = sock.accept()
        with client, accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()


def test_a_taken_port_is_still_refused(tmp_path: Path) -> None:
    first = HttpServer(tmp_path / "home").start()
    try:
        with pytest.raises(OSError):
            HttpServer(tmp_path / "home", port=first.port).start()
    finally:
        first.stop()

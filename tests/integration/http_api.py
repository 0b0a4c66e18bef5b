"""A real HTTP API server over a new fleet home with an admin and a read token; a module that
needs it imports the `api` fixture from here (after its importorskip of fastapi and httpx)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from controller.fleet.registry import Fleet
from controller.http.auth import create_token, ensure_local_token
from controller.http.server import HttpServer


class Api:
    """A running HttpServer with an admin and a read token, and the fleet home it serves."""

    def __init__(self, home: Path, server: HttpServer, admin: str, read: str) -> None:
        """Remember the server and its tokens."""
        self.home, self.server = home, server
        self.admin = httpx.Client(base_url=server.url, headers=bearer(admin), timeout=10)
        self.read = httpx.Client(base_url=server.url, headers=bearer(read), timeout=10)
        self.anonymous = httpx.Client(base_url=server.url, timeout=10)

    def close(self) -> None:
        """Close the clients."""
        for client in (self.admin, self.read, self.anonymous):
            client.close()


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for a token."""
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(name="api")
def api_server(tmp_path: Path) -> Iterator[Api]:
    """A server on a free port over a new home, with the `local` admin and a `viewer` token."""
    home = tmp_path / "home"
    fleet = Fleet(home)
    read = create_token(fleet.db, "viewer", "read")
    fleet.close()
    admin = ensure_local_token(home)
    server = HttpServer(home, "127.0.0.1", 0).start()
    client = Api(home, server, admin, read)
    yield client
    client.close()
    server.stop()

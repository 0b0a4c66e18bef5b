"""HTTP request latency of the API server, kept-alive and new connections (bench/RESULTS.md).

Two servers over one fleet home in one run: the listener as `HttpServer` makes it now
(TCP_NODELAY) and one made as before (`socket.create_server`, protocol 0: asyncio leaves Nagle
on). Requests alternate between them, so a busy machine slows both alike. With `--url` and
`--token`, it probes a running server instead (e.g. `edgefleet up --http 127.0.0.1:8080`).

    .venv/bin/python bench/bench_http.py --requests 200
    .venv/bin/python bench/bench_http.py --url http://127.0.0.1:8080 \
        --token "$(cat HOME/http-token)"
"""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

PATHS = ("/healthz", "/api/v1/devices?limit=50", "/api/v1/rollouts", "/app.css")


class Client:
    """GETs to one server, on one kept-alive connection or a new connection each."""

    def __init__(self, url: str, token: str, keep_alive: bool) -> None:
        """Aim at `url` with a bearer token."""
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.headers = {"Authorization": f"Bearer {token}"}
        self.keep_alive = keep_alive
        self.conn: http.client.HTTPConnection | None = None

    def get_ms(self, path: str) -> float:
        """Milliseconds from sending a GET to having read the whole answer."""
        if self.conn is None or not self.keep_alive:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        start = time.perf_counter()
        self.conn.request("GET", path, headers=self.headers)
        answer = self.conn.getresponse()
        answer.read()
        elapsed = (time.perf_counter() - start) * 1000
        if answer.status != 200:
            raise SystemExit(f"GET {path}: HTTP {answer.status}")
        if not self.keep_alive:
            self.conn.close()
        return elapsed


def _old_listener(host: str, port: int) -> socket.socket:
    """The listener as HttpServer made it before: protocol 0, so no TCP_NODELAY."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, reuse_port=False)


def _table(rows: list[tuple[str, str, list[float], list[float]]], names: tuple[str, str]) -> None:
    """Median and p95 per path and connection mode, and the ratio of the medians."""
    print(f"{'path':28} {'connection':10} {names[0]:>16} {names[1]:>16}  ratio")
    for path, mode, a, b in rows:
        ma, mb = statistics.median(a), statistics.median(b)
        pa = statistics.quantiles(a, n=20)[-1]
        pb = statistics.quantiles(b, n=20)[-1]
        print(
            f"{path:28} {mode:10} {ma:7.2f} (p95 {pa:5.1f}) {mb:7.2f} (p95 {pb:5.1f})"
            f"  {ma / mb:6.1f}x"
        )


def compare(requests: int) -> None:
    """Old and new listener side by side over one fresh fleet home."""
    from controller.fleet.registry import Fleet
    from controller.http import server as server_module
    from controller.http.auth import ensure_local_token

    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        home = Path(tmp) / "home"
        fleet = Fleet(home)
        for i in range(200):
            fleet.register_device(f"dev-{i:04d}", "rpi4")
        fleet.close()
        token = ensure_local_token(home)
        new = server_module.HttpServer(home).start()
        with mock.patch.object(server_module, "listen_tcp", _old_listener):
            old = server_module.HttpServer(home).start()
        try:
            rows = []
            for keep_alive in (True, False):
                mode = "keep-alive" if keep_alive else "new"
                clients = [Client(s.url, token, keep_alive) for s in (old, new)]
                for path in PATHS:
                    times: list[list[float]] = [[], []]
                    for _ in range(requests):
                        for i, client in enumerate(clients):  # interleaved
                            times[i].append(client.get_ms(path))
                    rows.append((path, mode, times[0], times[1]))
        finally:
            old.stop()
            new.stop()
    print(f"{requests} GETs per path and server, interleaved; ms, median (p95)")
    _table(rows, ("before (Nagle)", "now (NODELAY)"))


def probe(url: str, token: str, requests: int) -> None:
    """Median and p95 of GETs to a running server."""
    print(f"{url}: {requests} GETs per path; ms")
    for keep_alive in (True, False):
        client = Client(url, token, keep_alive)
        for path in PATHS:
            times = [client.get_ms(path) for _ in range(requests)]
            print(
                f"{path:28} {'keep-alive' if keep_alive else 'new':10} median "
                f"{statistics.median(times):7.2f}  p95 {statistics.quantiles(times, n=20)[-1]:7.2f}"
            )


def main() -> None:
    """Parse the options and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="GETs per path and server")
    parser.add_argument("--url", help="probe this running server instead")
    parser.add_argument("--token", help="its API token (with --url)")
    args = parser.parse_args()
    if args.url:
        probe(args.url, args.token or "", args.requests)
    else:
        compare(args.requests)


if __name__ == "__main__":
    main()

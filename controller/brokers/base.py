"""What every managed broker shares: the handle, errors, ports and URLs, process helpers."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from controller.brokers.amqtt_broker import AmqttThread

log = logging.getLogger(__name__)


# The IANA port for unencrypted MQTT; what a URL without a port means.
MQTT_DEFAULT_PORT = 1883


# Seconds a broker gets to accept connections after start; mosquitto needs ~20 ms, a loaded CI
# runner far more, and a broker that is not up after 10 s is broken rather than slow.
START_TIMEOUT_S = 10.0


# A port picked by free_port() can be taken by someone else before the broker binds it; three
# tries make a spurious failure astronomically unlikely and still fail fast on a real problem.
AUTO_PORT_ATTEMPTS = 3


# Poll interval while waiting for a port or a process; short enough to not slow tests down.
_POLL_INTERVAL_S = 0.02


_SCHEMES = ("mqtt", "tcp")


class BrokerError(RuntimeError):
    """A broker could not be started, reached or stopped."""


class PortInUseError(BrokerError):
    """The requested listener port is already bound by another process."""

    def __init__(self, host: str, port: int) -> None:
        """Build the message that tells the user how to get out of the conflict."""
        self.host = host
        self.port = port
        super().__init__(
            f"port {port} on {host} is already in use (another MQTT broker?); "
            "pass --port 0 for a free port or --broker URL to use it"
        )


@dataclass
class BrokerHandle:
    """A running broker: where it listens and how to stop it."""

    kind: str
    host: str
    port: int
    pid: int | None
    data_dir: Path | None
    # TLS listeners of a secured broker (controller/security/broker_config.py); None otherwise.
    tls_port: int | None = None
    cert_port: int | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    _amqtt: AmqttThread | None = field(default=None, repr=False, compare=False)

    @property
    def url(self) -> str:
        """The broker URL clients use, e.g. ``mqtt://127.0.0.1:41883``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    def is_running(self) -> bool:
        """Whether the broker process (or amqtt thread) is still alive."""
        if self._amqtt is not None:
            return self._amqtt.is_running()
        if self._process is not None:
            return self._process.poll() is None
        return self.pid is not None and _pid_alive(self.pid)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker: SIGTERM its PID, SIGKILL after `timeout`; amqtt shuts down its loop."""
        if self._amqtt is not None:
            self._amqtt.stop(timeout)
            return
        if self.pid is None or not self.is_running():
            self._reap()
            return
        _signal_pid(self.pid, signal.SIGTERM)
        if self._wait_exit(timeout):
            return
        log.warning(
            "%s pid %d ignored SIGTERM for %.1fs; sending SIGKILL", self.kind, self.pid, timeout
        )
        _signal_pid(self.pid, signal.SIGKILL)
        if not self._wait_exit(timeout):
            raise BrokerError(f"{self.kind} pid {self.pid} survived SIGKILL")

    def _wait_exit(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the process to exit (and reap it); True if it did."""
        if self._process is not None:
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.pid is not None and _pid_alive(self.pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL_S)
        return True

    def _reap(self) -> None:
        """Collect the exit status of a child that already died so it does not linger."""
        if self._process is not None:
            self._process.poll()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that nothing listens on right now (the OS picks it)."""
    family = _family(host)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Block until `host:port` accepts a TCP connection; TimeoutError after `timeout` seconds."""
    _wait_accepting(host, port, timeout, alive=lambda: True)


def parse_broker_url(url: str) -> tuple[str, int]:
    """Split ``mqtt://host[:port]`` (or tcp://) into (host, port); ValueError names the bad part."""
    text = url.strip()
    if "://" not in text:
        raise ValueError(f"broker URL {url!r} has no scheme: expected mqtt://host[:port]")
    parts = urlsplit(text)
    if parts.scheme.lower() not in _SCHEMES:
        raise ValueError(
            f"unsupported scheme {parts.scheme!r} in broker URL {url!r}: "
            "expected mqtt:// or tcp:// (TLS and websockets are not supported)"
        )
    if parts.username is not None or parts.password is not None:
        redacted = re.sub(r"(://)[^/@]*@", r"\1***@", text)  # never echo the secret
        raise ValueError(
            f"credentials in broker URL {redacted!r} are not supported; remove 'user@'"
        )
    if parts.path not in ("", "/"):
        raise ValueError(f"unexpected path {parts.path!r} in broker URL {url!r}")
    if parts.query or parts.fragment:
        extra = parts.query or parts.fragment
        raise ValueError(f"unexpected query or fragment {extra!r} in broker URL {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"missing host in broker URL {url!r}")
    try:
        port = parts.port
    except ValueError:
        raw = parts.netloc.rsplit(":", 1)[-1]
        raise ValueError(f"invalid port {raw!r} in broker URL {url!r}: expected 1-65535") from None
    if port is None:
        if parts.netloc.endswith(":"):
            raise ValueError(f"empty port in broker URL {url!r}: expected 1-65535")
        return host, MQTT_DEFAULT_PORT
    if port == 0:
        raise ValueError(f"invalid port '0' in broker URL {url!r}: expected 1-65535")
    return host, port


def _family(host: str) -> socket.AddressFamily:
    """Address family for a literal IP or a name (IPv4 unless the host is an IPv6 literal)."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


def _connect_host(host: str) -> str:
    """Where to connect to reach a listener bound to `host` (wildcards map to loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address or the name localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    """Raise PortInUseError if `host:port` cannot be bound; nothing is started before this check."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        # Brokers bind with SO_REUSEADDR too, so a TIME_WAIT left by our own previous broker on
        # this port is not a conflict, while a live listener still is.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(host, port) from exc
            raise BrokerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _wait_accepting(host: str, port: int, timeout: float, alive: Callable[[], bool]) -> None:
    """Poll until `host:port` accepts connections; BrokerError as soon as `alive()` is False."""
    target = _connect_host(host)
    deadline = time.monotonic() + timeout
    while True:
        if not alive():
            raise BrokerError(f"broker on {host}:{port} exited before accepting connections")
        try:
            with socket.create_connection((target, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout:.1f}s")
        time.sleep(_POLL_INTERVAL_S)


def _pid_alive(pid: int) -> bool:
    """Whether a process with `pid` exists (signal 0 probes without delivering anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_pid(pid: int, sig: signal.Signals) -> None:
    """Send `sig` to `pid`, ignoring a process that is already gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)

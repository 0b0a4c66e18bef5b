"""Managed MQTT brokers: mosquitto with a generated config; the embedded default picks one.

The in-process amqtt broker lives in controller/brokers/amqtt_broker.py.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import psutil

if TYPE_CHECKING:
    from controller.brokers.amqtt_broker import AmqttThread
    from controller.security.identity import FleetSecurity

__all__ = [
    "BrokerError",
    "BrokerHandle",
    "PortInUseError",
    "find_mosquitto",
    "free_port",
    "parse_broker_url",
    "start_embedded",
    "start_mosquitto",
    "wait_for_port",
]

log = logging.getLogger(__name__)

# The IANA port for unencrypted MQTT; what a URL without a port means.
MQTT_DEFAULT_PORT = 1883
# Broker memory is bounded by what these allow (docs/rollouts.md, "Distribution", has the
# formula). Queued entries are references to one shared message store (a chunk fanned out to
# 1,000 devices is one copy), but a message in flight is copied into the client's output
# buffer: 64 in flight × 64 KiB chunks is 4 MiB per downloading device, 40 GB at 10,000 (what
# issue 20 measured growing past 16 GB). So in-flight bytes are capped per client:
# 256 KiB = 4 chunks keeps a device's link busy (2.5 MB/s at a 100 ms RTT, 40× that on a LAN)
# and bounds the copies at 256 KiB per downloading device, 256 MiB for 1,000 at once.
MAX_INFLIGHT_BYTES = 256 * 1024
# Small messages (events, telemetry, commands) are limited by count, not bytes: 64 lets the
# controller's session (which acknowledges after its database commit) keep ~64 messages in
# flight, ~1,300 messages/s at a 50 ms commit, above a 10,000-device fleet's ~1,000/s.
MAX_INFLIGHT_MESSAGES = 64
# Queued beyond the in-flight window, per client. mosquitto's default (1000) silently drops
# QoS1 messages for a subscriber that lags, so it is sized deliberately: 100,000 messages is
# ~100 s of a 10,000-device fleet's events and telemetry for the controller's persistent
# session (a restart of that length loses nothing), and a device's queued retained chunks (a
# 100 MiB model is 1,600) fit easily.
MAX_QUEUED_MESSAGES = 100_000
# ...and in bytes: 128 MiB bounds the controller's backlog (its messages are unique, not shared)
# and a device's queued chunks at 2,048 × 64 KiB; past that mosquitto drops QoS1 (counted in
# $SYS) and a device re-subscribes the chunks it lacks in rounds (agent/fetch.py).
MAX_QUEUED_BYTES = 128 * 1024 * 1024
# 16 × the 128 KiB chunk cap: room for MQTT headers and for manifests listing many chunk hashes,
# while a runaway publisher is still cut off (disconnected, loudly). Not `message_size_limit`:
# it PUBACKs an oversize MQTT 3.1.1 publish as a success and drops it, and answers an MQTT 5 one
# with an error PUBACK that paho 2.x treats as a protocol error, reconnecting and resending the
# same message forever (measured, see docs/brokers.md).
MAX_PACKET_SIZE = 2 * 1024 * 1024
# With persistence on, mosquitto only writes its database at shutdown and every autosave_interval
# seconds (default 1800); 30 s bounds what a SIGKILL or power cut can lose.
AUTOSAVE_INTERVAL_S = 30
# Seconds a broker gets to accept connections after start; mosquitto needs ~20 ms, a loaded CI
# runner far more, and a broker that is not up after 10 s is broken rather than slow.
START_TIMEOUT_S = 10.0
# Enough log lines to show mosquitto's "Error found at ..." and the line before it.
LOG_TAIL_LINES = 20
# A port picked by free_port() can be taken by someone else before the broker binds it; three
# tries make a spurious failure astronomically unlikely and still fail fast on a real problem.
AUTO_PORT_ATTEMPTS = 3
# Debian and most distributions install mosquitto in sbin, which is not on a normal user's PATH.
MOSQUITTO_FALLBACK_DIRS: tuple[str, ...] = ("/usr/sbin", "/usr/local/sbin")
# Poll interval while waiting for a port or a process; short enough to not slow tests down.
_POLL_INTERVAL_S = 0.02

_SCHEMES = ("mqtt", "tcp")
_CONFIG_NAME = "mosquitto.conf"
_LOG_NAME = "mosquitto.log"
_STDERR_NAME = "mosquitto.stderr"
_PID_NAME = "mosquitto.pid"


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


# --------------------------------------------------------------------------- ports and URLs


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
        raise ValueError(f"credentials in broker URL {url!r} are not supported; remove 'user@'")
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


# --------------------------------------------------------------------------- mosquitto


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary: PATH first, then the sbin directories distributions use."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if MOSQUITTO_FALLBACK_DIRS:
        return shutil.which("mosquitto", path=os.pathsep.join(MOSQUITTO_FALLBACK_DIRS))
    return None


def mosquitto_config(
    data_dir: Path, *, host: str, port: int, persistence: bool, extra_config: str = ""
) -> str:
    """The generated mosquitto.conf text for one listener on `host:port` rooted in `data_dir`."""
    if "\n" in str(data_dir):
        raise BrokerError(f"data dir {str(data_dir)!r} contains a newline; mosquitto cannot use it")
    anonymous = "true" if is_loopback(host) else "false"
    lines = [
        "# Generated by edgefleet (brokers/mosquitto.py) on every start; edits here are lost.",
        "# Put extra settings in extra_config; docs/brokers.md explains each value.",
    ]
    if os.geteuid() == 0:
        # Started as root, mosquitto switches to user `mosquitto`, which cannot write a data dir
        # below a private (0700) parent such as pytest's tmp_path; stay the user who started it.
        # Not root: mosquitto never switches user, so no line is needed.
        lines.append("user root")
    lines += [
        f"pid_file {data_dir / _PID_NAME}",
        f"log_dest file {data_dir / _LOG_NAME}",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        f"max_inflight_bytes {MAX_INFLIGHT_BYTES}",
        f"max_packet_size {MAX_PACKET_SIZE}",
    ]
    if persistence:
        lines += [
            "persistence true",
            # mosquitto concatenates location and file name, so the trailing slash matters.
            f"persistence_location {data_dir}/",
            f"autosave_interval {AUTOSAVE_INTERVAL_S}",
        ]
    else:
        lines.append("persistence false")
    lines += [
        f"listener {port} {host}",
        # Anonymous access only where nobody else can reach the broker; a LAN listener needs a
        # password_file (or an explicit `allow_anonymous true`) in extra_config.
        f"allow_anonymous {anonymous}",
    ]
    if extra_config.strip():
        lines += ["# extra_config", extra_config.strip()]
    return "\n".join(lines) + "\n"


def start_mosquitto(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    persistence: bool = False,
    extra_config: str = "",
    binary: str | None = None,
) -> BrokerHandle:
    """Start mosquitto with a generated config in `data_dir`; port 0 picks a free port."""
    exe = binary or find_mosquitto()
    if exe is None:
        where = " or ".join(["PATH", *MOSQUITTO_FALLBACK_DIRS])
        raise BrokerError(
            f"mosquitto not found on {where}; install it (apt-get install mosquitto) "
            "or use the embedded amqtt broker"
        )
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    stale = _mosquitto_running_in(data_dir)
    if stale is not None:
        raise BrokerError(
            f"mosquitto pid {stale} from an earlier run still uses {data_dir}; two brokers on one "
            f"persistence file corrupt it: stop it (kill {stale}) or use another data dir"
        )
    attempts = AUTO_PORT_ATTEMPTS if port == 0 else 1
    for attempt in range(1, attempts + 1):
        chosen = free_port(host) if port == 0 else port
        try:
            _check_port_free(host, chosen)
            return _spawn_mosquitto(exe, data_dir, host, chosen, persistence, extra_config)
        except PortInUseError:
            if attempt == attempts:
                raise
            log.debug(
                "free port %d on %s was taken before mosquitto bound it; retrying", chosen, host
            )
    raise AssertionError("unreachable")  # pragma: no cover


def _mosquitto_running_in(data_dir: Path) -> int | None:
    """PID of a live mosquitto started with this data dir's config (a leftover), else None."""
    try:
        pid = int((data_dir / _PID_NAME).read_text().strip())
        cmdline = psutil.Process(pid).cmdline()
    except (OSError, ValueError, psutil.Error):
        return None  # no pid file, garbage in it, or that process is gone: a stale file
    return pid if str(data_dir / _CONFIG_NAME) in cmdline else None


def _spawn_mosquitto(
    exe: str, data_dir: Path, host: str, port: int, persistence: bool, extra_config: str
) -> BrokerHandle:
    """Write the config, start the process and wait for the listener; PortInUseError on a race."""
    conf = data_dir / _CONFIG_NAME
    conf.write_text(
        mosquitto_config(
            data_dir, host=host, port=port, persistence=persistence, extra_config=extra_config
        )
    )
    logfile = data_dir / _LOG_NAME
    log_offset = logfile.stat().st_size if logfile.exists() else 0
    stderr_path = data_dir / _STDERR_NAME
    with stderr_path.open("wb") as stderr:
        try:
            proc = subprocess.Popen(
                [exe, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                cwd=data_dir,
                close_fds=True,
            )
        except OSError as exc:
            raise BrokerError(f"cannot run {exe}: {exc}") from exc
    handle = BrokerHandle("mosquitto", host, port, proc.pid, data_dir, _process=proc)
    try:
        # Wait for *our* PID to hold the listener: a plain connect test would also succeed
        # against whoever grabbed the port between the free-port check and mosquitto's bind.
        _wait_listening(proc, port, START_TIMEOUT_S)
        _wait_accepting(host, port, START_TIMEOUT_S, alive=lambda: proc.poll() is None)
    except (BrokerError, TimeoutError) as exc:
        handle.stop(timeout=2.0)
        tail = _log_tail(stderr_path, logfile, log_offset)
        if "Address already in use" in tail:
            raise PortInUseError(host, port) from exc
        reason = (
            f"exited with code {proc.returncode}"
            if isinstance(exc, BrokerError)
            else f"did not accept connections within {START_TIMEOUT_S:.0f}s"
        )
        raise BrokerError(f"mosquitto ({exe} -c {conf}) {reason}; last log lines:\n{tail}") from exc
    log.info("mosquitto pid %d listening on %s (data dir %s)", proc.pid, handle.url, data_dir)
    return handle


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    """Poll until process `proc` has a TCP socket listening on `port`; BrokerError if it exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BrokerError(f"pid {proc.pid} exited before listening on port {port}")
        try:
            ps = psutil.Process(proc.pid)
            conns = (
                ps.net_connections("tcp")
                if hasattr(ps, "net_connections")
                else ps.connections("tcp")
            )
        except psutil.AccessDenied:
            return  # cannot inspect (hardened /proc): fall back to the connect test alone
        except psutil.NoSuchProcess:
            continue  # exited between poll() and here; the next poll() reports it
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr[1] == port for c in conns):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"pid {proc.pid} did not listen on port {port} within {timeout:.1f}s"
            )
        time.sleep(_POLL_INTERVAL_S)


def _log_tail(stderr_path: Path, logfile: Path, log_offset: int) -> str:
    """The last lines mosquitto wrote on this start: stderr (config errors) then its log file."""
    lines: list[str] = []
    with contextlib.suppress(OSError):
        lines += stderr_path.read_text(errors="replace").splitlines()
    with contextlib.suppress(OSError), logfile.open("rb") as fh:
        fh.seek(log_offset)
        lines += fh.read().decode(errors="replace").splitlines()
    tail = [line for line in lines if line.strip()][-LOG_TAIL_LINES:]
    return "\n".join(tail) if tail else "(mosquitto wrote nothing)"


# --------------------------------------------------------------------------- embedded default


def start_embedded(
    data_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    prefer: str = "auto",
    security: FleetSecurity | None = None,
    tls_port: int = 8883,
    cert_port: int | None = None,
) -> BrokerHandle:
    """Start the demo broker: mosquitto (with persistence) when installed, else amqtt in-process.

    Beyond loopback devices must authenticate: mosquitto then runs the secured config from
    `security` (password file, per-device ACLs, TLS on `tls_port`, plaintext `port` moved to
    loopback for the controller; docs/security.md); amqtt refuses (it cannot do that safely).
    """
    if prefer not in ("auto", "mosquitto", "amqtt"):
        raise ValueError(f"unknown broker {prefer!r}: expected 'auto', 'mosquitto' or 'amqtt'")
    binary = find_mosquitto() if prefer in ("auto", "mosquitto") else None
    if prefer == "mosquitto" or (prefer == "auto" and binary is not None):
        if not is_loopback(host):
            return _start_secured(data_dir, host, port, security, tls_port, cert_port, binary)
        # Persistence keeps retained device status across a controller (and broker) restart.
        return start_mosquitto(data_dir, host=host, port=port, persistence=True, binary=binary)
    if prefer == "auto":
        log.info("mosquitto not found; using the in-process amqtt broker (MQTT 3.1.1 only)")
    from controller.brokers.amqtt_broker import (
        start_amqtt,  # amqtt is not installed on every machine
    )

    return start_amqtt(host=host, port=port)


def _start_secured(
    data_dir: Path,
    host: str,
    port: int,
    security: FleetSecurity | None,
    tls_port: int,
    cert_port: int | None,
    binary: str | None,
) -> BrokerHandle:
    """The embedded mosquitto beyond loopback: authenticated, ACL-confined, TLS for devices."""
    if security is None:
        raise BrokerError(
            f"listening on {host} requires device authentication: pass the fleet's security "
            "(controller.security.identity.FleetSecurity(home)) so the broker gets the password "
            "file, ACLs and TLS certificate, or listen on 127.0.0.1"
        )
    from controller.security.broker_config import start_secure_mosquitto  # imports this module

    return start_secure_mosquitto(
        security,
        data_dir,
        host=host,
        plain_port=port,
        tls_port=tls_port,
        cert_port=cert_port,
        persistence=True,
        binary=binary,
    )

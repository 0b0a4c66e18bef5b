"""The agent's local inference service: a Unix socket (binary frames) and optional localhost HTTP.

Applications on the device call the active model through it (agent/client.py). Both transports
decode a request and hand it to one InferenceDispatcher (cache, micro-batching, metrics), which
runs it on the ServingModel. Every error is answered with a message and the server keeps going;
the socket framing and the HTTP endpoints are documented in docs/inference.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import stat
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from agent.batching import InferenceDispatcher
from agent.client import (
    MAX_PAYLOAD_BYTES,
    FrameError,
    decode_tensors,
    encode_frame,
    read_frame,
    send_frame,
)
from agent.serving import InferenceError, InferenceObserver, ServingModel

log = logging.getLogger(__name__)

# sockaddr_un.sun_path is 108 bytes on Linux, one of them the terminating NUL.
AF_UNIX_PATH_MAX = 107
# Socket file mode: owner and group (the applications' group) may connect, nobody else.
SOCKET_MODE = 0o660
# Connections served at once. Each is a thread (its stack mostly untouched virtual memory); past
# this a new client gets an error frame instead of an unbounded pile of threads. Local apps
# rarely hold more than a few connections.
MAX_CONNECTIONS = 256
# Backlog of not yet accepted connections: covers a burst of clients connecting together.
_LISTEN_BACKLOG = 128
# How long stop() waits for connection threads to notice their socket was shut down.
_JOIN_TIMEOUT_S = 5.0
# JSON is ~2-4× larger than the raw bytes it encodes, so HTTP gets the same byte cap as the
# socket: the parsed arrays then stay well below the socket's limit.
MAX_HTTP_BODY_BYTES = MAX_PAYLOAD_BYTES


def model_info(serving: ServingModel) -> dict[str, Any]:
    """The active model as the `model` op and GET /v1/model describe it; InferenceError if none."""

    def describe(detail: dict[str, Any]) -> dict[str, Any]:
        """One tensor: name, shape, shape_signature (-1 = free), dtype, quantization."""
        signature = detail.get("shape_signature")
        scale, zero_point = detail.get("quantization", (0.0, 0))
        return {
            "name": str(detail["name"]),
            "shape": [int(d) for d in detail["shape"]],
            "shape_signature": [int(d) for d in (signature if signature is not None else [])],
            "dtype": np.dtype(detail["dtype"]).name,
            "quantization": {"scale": float(scale), "zero_point": int(zero_point)},
        }

    sha, init_ms = serving.sha256, serving.init_ms
    inputs = [describe(d) for d in serving.input_details()]
    outputs = [describe(d) for d in serving.output_details()]
    return {
        "model_sha256": sha,
        "init_ms": init_ms,
        "batchable": serving.batchable,
        "inputs": inputs,
        "outputs": outputs,
    }


def _error_header(exc: Exception) -> dict[str, Any]:
    """Response header for a failed request."""
    return {
        "ok": False,
        "error": str(exc),
        "model_sha256": getattr(exc, "model_sha256", None),
        "fatal": bool(getattr(exc, "fatal", False)),
    }


def check_socket_path(path: Path) -> None:
    """Refuse a socket path longer than AF_UNIX allows, naming it (bind's error does not)."""
    length = len(os.fsencode(path))
    if length > AF_UNIX_PATH_MAX:
        raise ValueError(
            f"inference socket path is {length} bytes, AF_UNIX allows at most "
            f"{AF_UNIX_PATH_MAX}: {path} (use a shorter data_dir or serve_socket)"
        )


def parse_http_address(address: str, allow_non_loopback: bool) -> tuple[str, int]:
    """Split "HOST:PORT" ("[::1]:PORT" for IPv6); refuse non-loopback hosts unless allowed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise ValueError(f"HTTP address must be HOST:PORT, e.g. 127.0.0.1:8080, got {address!r}")
    host = host.strip("[]")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"HTTP port must be 0-65535, got {port}")
    if host == "localhost":
        return "127.0.0.1", port
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"HTTP host must be an IP address or localhost, got {host!r}") from None
    if not ip.is_loopback and not allow_non_loopback:
        raise ValueError(
            f"refusing to serve inference on non-loopback address {host}: the service has no "
            "authentication; pass allow_non_loopback=True to expose it deliberately"
        )
    return host, port


class InferenceServer:
    """Serves the active model over a Unix socket and/or localhost HTTP."""

    def __init__(
        self,
        serving: ServingModel,
        *,
        socket_path: Path | None,
        http: str | None = None,
        batch_window_ms: float = 0.0,
        max_batch: int = 8,
        result_cache_entries: int = 0,
        observer: InferenceObserver | None = None,
        allow_non_loopback: bool = False,
    ) -> None:
        """Configure the transports; nothing listens until start()."""
        if socket_path is None and http is None:
            raise ValueError("the inference server needs a socket_path, an http address or both")
        self.serving = serving
        self.socket_path = Path(socket_path) if socket_path is not None else None
        if self.socket_path is not None:
            check_socket_path(self.socket_path)
        self._http_address = parse_http_address(http, allow_non_loopback) if http else None
        self.dispatcher = InferenceDispatcher(
            serving,
            batch_window_ms=batch_window_ms,
            max_batch=max_batch,
            result_cache_entries=result_cache_entries,
            observer=observer,
        )
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._connections_lock = threading.Lock()
        self._http_server: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def http_port(self) -> int | None:
        """The HTTP port actually bound (useful with port 0), None without HTTP."""
        if self._http_server is None:
            return None
        return int(self._http_server.server_address[1])

    @property
    def http_url(self) -> str | None:
        """http://HOST:PORT of the HTTP transport, None without HTTP."""
        if self._http_server is None:
            return None
        host = str(self._http_server.server_address[0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.http_port}"

    def start(self) -> None:
        """Bind and start serving; raises OSError/ValueError when a transport cannot bind."""
        self._stopping.clear()
        self.dispatcher.start()
        try:
            if self.socket_path is not None:
                self._start_socket(self.socket_path)
            if self._http_address is not None:
                self._start_http(*self._http_address)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop accepting, close every connection, stop the batch worker, remove the socket file."""
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):  # shutdown wakes the thread blocked in accept()
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(_JOIN_TIMEOUT_S)
            self._accept_thread = None
        if self._listener is not None and self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        self._listener = None
        with self._connections_lock:
            connections = list(self._connections.items())
        for conn, _ in connections:
            with contextlib.suppress(OSError):  # the connection's thread sees EOF and exits
                conn.shutdown(socket.SHUT_RDWR)
        for _, thread in connections:
            thread.join(_JOIN_TIMEOUT_S)
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        if self._http_thread is not None:
            self._http_thread.join(_JOIN_TIMEOUT_S)
            self._http_thread = None
        self.dispatcher.stop()

    def __enter__(self) -> InferenceServer:
        """Start on entering a with block."""
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop on leaving it."""
        self.stop()

    # ================================================================== Unix socket

    def _start_socket(self, path: Path) -> None:
        """Remove a stale socket file, bind, set the mode, start the accept thread."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ValueError(f"refusing to replace {path}: it exists and is not a socket")
            if _socket_is_live(path):
                raise OSError(f"another inference service is already listening on {path}")
            path.unlink()  # stale: left by an agent that died without cleaning up
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(os.fspath(path))
            os.chmod(path, SOCKET_MODE)
            listener.listen(_LISTEN_BACKLOG)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name="inference-accept", daemon=True
        )
        self._accept_thread.start()
        log.info("inference service listening on %s", path)

    def _accept_loop(self, listener: socket.socket) -> None:
        """Accept connections and give each its own thread, up to MAX_CONNECTIONS."""
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)  # e.g. EMFILE: back off instead of spinning
                continue
            with self._connections_lock:
                full = len(self._connections) >= MAX_CONNECTIONS
                if not full:
                    thread = threading.Thread(
                        target=self._serve_connection,
                        args=(conn,),
                        name="inference-conn",
                        daemon=True,
                    )
                    self._connections[conn] = thread
            if full:
                self._refuse(conn)
                continue
            thread.start()

    def _refuse(self, conn: socket.socket) -> None:
        """Tell a client over the connection limit why, then close it."""
        self.dispatcher.error()
        error = FrameError(
            f"too many connections (limit {MAX_CONNECTIONS}); retry later", fatal=True
        )
        try:
            conn.settimeout(1.0)
            send_frame(conn, encode_frame(_error_header(error)))
        except OSError:
            pass
        conn.close()

    def _serve_connection(self, conn: socket.socket) -> None:
        """Answer frames on one persistent connection until the client closes it."""
        reader = conn.makefile("rb")
        try:
            while not self._stopping.is_set():
                try:
                    frame = read_frame(reader)
                except FrameError as exc:
                    self.dispatcher.error()
                    send_frame(conn, encode_frame(_error_header(exc)))
                    if exc.fatal:
                        return  # the stream is out of step: this connection cannot go on
                    continue
                if frame is None:
                    return
                started = time.perf_counter_ns()
                send_frame(conn, self._answer(*frame, started))
        except OSError:
            pass  # the client went away mid-frame; nothing to answer
        finally:
            reader.close()
            conn.close()
            with self._connections_lock:
                self._connections.pop(conn, None)

    def _answer(
        self, header: dict[str, Any], payload: bytes, started_ns: int
    ) -> list[bytes | memoryview]:
        """The response frame for one request frame (errors included)."""
        op = header.get("op")
        try:
            if op == "infer":
                inputs = decode_tensors(header, payload)
                result = self.dispatcher.serve(inputs, started_ns)
                reply = {
                    "ok": True,
                    "model_sha256": result.sha256,
                    "latency_ms": round(result.latency_ms, 4),
                    "cache_hit": result.cache_hit,
                }
                return encode_frame(reply, result.outputs)
            if op == "model":
                return encode_frame({"ok": True, "model": model_info(self.serving)})
            raise FrameError(f"unknown op {op!r}; use 'infer' or 'model'")
        except FrameError as exc:
            self.dispatcher.error()  # refused before it reached the dispatcher
            return encode_frame(_error_header(exc))
        except InferenceError as exc:
            # Inference errors were observed by the dispatcher; a failed `model` query (no
            # model loaded) is not an inference request and is not counted.
            return encode_frame(_error_header(exc))
        except Exception as exc:  # a bug must cost one request, not the connection
            log.exception("inference request failed unexpectedly")
            self.dispatcher.error()
            return encode_frame(_error_header(InferenceError(f"internal error: {exc!r}")))

    # ================================================================== HTTP

    def _start_http(self, host: str, port: int) -> None:
        """Bind the HTTP server and serve it from a thread."""
        handler = type("InferenceHTTPHandler", (_InferenceHTTPHandler,), {"service": self})
        server_class = _IPv6HTTPServer if ":" in host else _QuietHTTPServer
        self._http_server = server_class((host, port), handler)
        self._http_thread = threading.Thread(
            target=self._http_server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="inference-http",
            daemon=True,
        )
        self._http_thread.start()
        log.info("inference service listening on %s", self.http_url)


def _socket_is_live(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
    return True


class _QuietHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose request threads do not keep the process alive."""

    daemon_threads = True
    block_on_close = False


class _IPv6HTTPServer(_QuietHTTPServer):
    """The same on an IPv6 address (e.g. ::1)."""

    address_family = socket.AF_INET6


class _InferenceHTTPHandler(BaseHTTPRequestHandler):
    """POST /v1/infer, GET /v1/model, GET /healthz; JSON in and out, keep-alive."""

    protocol_version = "HTTP/1.1"  # persistent connections: one TCP handshake per client
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    service: InferenceServer  # set on the per-server subclass

    def log_message(self, format: str, *args: Any) -> None:
        """Route the access log to debug logging instead of stderr."""
        log.debug("http %s " + format, self.address_string(), *args)

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        """Send a JSON response with Content-Length (keep-alive needs it)."""
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, status: int, exc: Exception | str) -> None:
        """Observe and answer an error."""
        self.service.dispatcher.error()
        body = {"error": str(exc), "model_sha256": getattr(exc, "model_sha256", None)}
        self._reply(status, body)

    def do_GET(self) -> None:
        """GET /v1/model and /healthz."""
        serving = self.service.serving
        if self.path == "/healthz":
            self._reply(
                HTTPStatus.OK,
                {"status": "ok", "model_loaded": serving.loaded, "model_sha256": serving.sha256},
            )
        elif self.path == "/v1/model":
            try:
                self._reply(HTTPStatus.OK, model_info(serving))
            except InferenceError as exc:
                self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: GET {self.path}"})

    def do_POST(self) -> None:
        """POST /v1/infer with {"inputs": [nested lists, one per model input]}."""
        if self.path != "/v1/infer":
            self._reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: POST {self.path}"})
            return
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self.close_connection = True
            self._fail(HTTPStatus.LENGTH_REQUIRED, "POST /v1/infer needs a Content-Length")
            return
        length = int(length_text)
        if length > MAX_HTTP_BODY_BYTES:
            self.close_connection = True  # the body is not read, so the stream is lost
            self._fail(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request of {length} bytes exceeds the {MAX_HTTP_BODY_BYTES}-byte limit",
            )
            return
        body = self.rfile.read(length)
        started = time.perf_counter_ns()
        try:
            inputs = _json_inputs(body)
        except ValueError as exc:
            self._fail(HTTPStatus.BAD_REQUEST, exc)
            return
        try:
            result = self.service.dispatcher.serve(inputs, started, coerce=True)
        except InferenceError as exc:
            status = HTTPStatus.BAD_REQUEST if self.service.serving.loaded else 503
            body_out = {"error": str(exc), "model_sha256": exc.model_sha256}
            self._reply(status, body_out)  # the dispatcher already observed the error
            return
        self._reply(
            HTTPStatus.OK,
            {
                "outputs": [out.tolist() for out in result.outputs],
                "dtypes": [out.dtype.name for out in result.outputs],
                "model_sha256": result.sha256,
                "latency_ms": round(result.latency_ms, 4),
                "cache_hit": result.cache_hit,
            },
        )


def _json_inputs(body: bytes) -> list[np.ndarray]:
    """Parse {"inputs": [...]} into arrays (dtypes are converted later); ValueError says why not."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise ValueError('body must be {"inputs": [one nested list per model input]}')
    arrays = []
    for position, value in enumerate(request["inputs"]):
        try:
            array = np.asarray(value)
        except ValueError:  # numpy >= 1.24 refuses ragged nested lists
            raise ValueError(f"input {position} is not a rectangular nested list") from None
        if array.dtype == object or array.dtype.kind not in "biuf":
            raise ValueError(f"input {position} must be a rectangular nested list of numbers")
        arrays.append(array)
    return arrays

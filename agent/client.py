"""Client for the agent's local inference service, and the socket framing both sides share.

Applications import this module (numpy + stdlib only) and call the active model:

    from agent.client import InferenceClient
    with InferenceClient(socket_path="/var/lib/edgefleet/infer.sock") as client:
        logits = client.infer(image)            # one input -> one output array
        # float in, float out: an int8 model's input is quantized and its output dequantized
        # with the model's parameters; client.infer(q, raw=True) sends and returns raw tensors.

Frame (both directions), documented in docs/inference.md:

    magic b"EFI1" | header_len u32 LE | payload_len u32 LE | header (UTF-8 JSON) | payload

The header lists the tensors as {"dtype", "shape"}; the payload is their raw little-endian
C-order bytes, one after another. Requests carry {"op": "infer" | "model"}; responses carry
{"ok": true, ...} or {"ok": false, "error": message, "model_sha256": sha-or-null}.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from agent.quantization import ModelCodec
from agent.serving import InferenceError

MAGIC = b"EFI1"  # "EdgeFleet Inference", framing version 1
_PREFIX = struct.Struct("<4sII")  # magic, header length, payload length
# A header only lists tensors (about 50 bytes each): 64 KiB fits over a thousand of them, and a
# bound this small stops a garbage length from making the reader allocate much.
MAX_HEADER_BYTES = 64 * 1024
# Requests above this are refused before they are read: 64 MiB holds a batch of 64 full-HD RGB
# float16 frames, far above any edge model's input, yet it bounds what one buggy or hostile
# local client can make the agent allocate on a device with a few hundred MB of RAM.
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
# Little-endian numpy dtypes a tensor may have on the wire (everything TFLite models take).
WIRE_DTYPES = frozenset(
    {
        "bool",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "float16",
        "float32",
        "float64",
    }
)
# Wire name -> little-endian dtype, and back. Looked up per tensor: dtype.name costs
# microseconds in numpy 2, a dict lookup on the dtype object almost nothing.
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in WIRE_DTYPES}
_WIRE_NAMES = {dtype: name for name, dtype in _WIRE_DTYPES.items()}
# Encoded request headers kept per (dtype, shape): an app sends one or a few signatures.
_HEADER_CACHE_ENTRIES = 64
_infer_headers: dict[tuple[Any, ...], bytes] = {}
# Default per-call timeout: generous for a slow model on a small CPU, yet a dead agent does not
# hang the application forever.
DEFAULT_TIMEOUT_S = 30.0
# Tensors smaller than this are copied into bytes before sending: below a few KiB a copy costs
# less than building a memoryview, above it the copy starts to show in the latency.
_COPY_BELOW = 4096


class FrameError(InferenceError):
    """A frame that breaks the framing rules; `fatal` when the stream cannot be resynchronized."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        """Keep the message and whether the connection must close."""
        super().__init__(message)
        self.fatal = fatal


# ================================================================== framing (shared)


def encode_frame(
    header: dict[str, Any], arrays: Sequence[np.ndarray] = ()
) -> list[bytes | memoryview]:
    """Prefix + header + tensor bytes as buffers for sendmsg; adds the header's "tensors" list."""
    buffers: list[bytes | memoryview] = [b""]
    tensors = []
    payload_len = 0
    for array in arrays:
        name = _WIRE_NAMES.get(array.dtype)
        if name is None or not array.flags.c_contiguous:
            array = _to_wire(array)
            name = _WIRE_NAMES[array.dtype]
        tensors.append({"dtype": name, "shape": list(array.shape)})
        # Small tensors are copied (cheaper than a memoryview); large ones are sent in place.
        buffers.append(array.tobytes() if array.nbytes < _COPY_BELOW else _byte_view(array))
        payload_len += array.nbytes
    if payload_len > MAX_PAYLOAD_BYTES:
        raise InferenceError(
            f"request of {payload_len} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit"
        )
    plain_infer = len(header) == 1 and header.get("op") == "infer"
    header["tensors"] = tensors
    if plain_infer and len(tensors) == 1:
        # The usual request: one tensor, no other fields. Its header depends only on dtype and
        # shape, so it is encoded once per signature (saves a json.dumps per call).
        signature = (tensors[0]["dtype"], *tensors[0]["shape"])
        header_bytes = _infer_headers.get(signature)
        if header_bytes is None:
            header_bytes = json.dumps(header).encode()
            if len(_infer_headers) < _HEADER_CACHE_ENTRIES:
                _infer_headers[signature] = header_bytes
    else:
        header_bytes = json.dumps(header).encode()  # json's cached default encoder: fastest
    buffers[0] = _PREFIX.pack(MAGIC, len(header_bytes), payload_len) + header_bytes
    return buffers


def _to_wire(array: np.ndarray) -> np.ndarray:
    """A C-contiguous little-endian copy of an array; InferenceError for other dtypes."""
    little = array.dtype.newbyteorder("<")
    if array.dtype.kind not in "biuf" or little.name not in WIRE_DTYPES:
        raise InferenceError(f"dtype {array.dtype} cannot be sent (allowed: {_allowed()})")
    return np.ascontiguousarray(array, dtype=little)


def _byte_view(array: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array, without copying."""
    return array.reshape(-1).view(np.uint8).data


def _allowed() -> str:
    """The wire dtypes, sorted, for error messages."""
    return ", ".join(sorted(WIRE_DTYPES))


def send_frame(sock: socket.socket, buffers: list[bytes | memoryview]) -> None:
    """Send every buffer, with one sendmsg when the kernel takes it all (the usual case)."""
    total = sum(memoryview(b).nbytes for b in buffers)
    sent = sock.sendmsg(buffers)
    if sent == total:
        return
    rest = b"".join(bytes(b) for b in buffers)[sent:]
    sock.sendall(rest)


def read_frame(
    reader: BinaryIO, max_payload: int = MAX_PAYLOAD_BYTES
) -> tuple[dict[str, Any], bytes] | None:
    """Read one frame: (header, payload), or None on a clean end of stream before a frame.

    Raises FrameError: fatal for a wrong magic, an oversized or truncated frame (the stream is
    lost), non-fatal for a bad header (the frame was consumed, the connection can go on).
    """
    prefix = reader.read(_PREFIX.size)
    if not prefix:
        return None
    if len(prefix) < _PREFIX.size:
        raise FrameError("connection closed in the middle of a frame prefix", fatal=True)
    magic, header_len, payload_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise FrameError(
            f"bad frame: expected magic {MAGIC!r}, got {magic!r} (not an edgefleet client?)",
            fatal=True,
        )
    if header_len > MAX_HEADER_BYTES:
        raise FrameError(
            f"frame header of {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit",
            fatal=True,
        )
    if payload_len > max_payload:
        raise FrameError(
            f"request of {payload_len} bytes exceeds the {max_payload}-byte limit",
            fatal=True,
        )
    header_bytes = reader.read(header_len)
    payload = reader.read(payload_len) if payload_len else b""
    if len(header_bytes) < header_len or len(payload) < payload_len:
        raise FrameError("connection closed in the middle of a frame", fatal=True)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"bad frame: header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("bad frame: header must be a JSON object")
    return header, payload


def decode_tensors(header: dict[str, Any], payload: bytes) -> list[np.ndarray]:
    """The arrays a frame carries (read-only views of the payload); FrameError when malformed."""
    tensors = header.get("tensors", [])
    if not isinstance(tensors, list):
        raise FrameError("bad frame: 'tensors' must be a list")
    arrays = []
    offset = 0
    for position, tensor in enumerate(tensors):
        try:
            dtype = _WIRE_DTYPES[tensor["dtype"]]
            shape = tuple(tensor["shape"])
            count = math.prod(shape)
            valid = len(tensor) == 2 and all(type(d) is int and d >= 0 for d in shape)
        except (KeyError, TypeError):
            valid = False
        if not valid:
            raise FrameError(
                f"bad frame: tensor {position} must be {{'dtype': one of {_allowed()}, "
                f"'shape': [ints >= 0]}}, got {json.dumps(tensor)[:200]}"
            )
        nbytes = count * dtype.itemsize
        if offset + nbytes > len(payload):
            raise FrameError(
                f"bad frame: tensor {position} ({tensor['dtype']} {shape}) needs {nbytes} "
                f"bytes but the payload has {len(payload) - offset} left"
            )
        arrays.append(np.frombuffer(payload, dtype, count, offset).reshape(shape))
        offset += nbytes
    if offset != len(payload):
        raise FrameError(
            f"bad frame: payload has {len(payload)} bytes, the tensors describe {offset}"
        )
    return arrays


# ================================================================== client


@dataclass(frozen=True)
class InferenceReply:
    """One answer: outputs, the sha256 of the model that computed them, service latency."""

    outputs: list[np.ndarray]
    model_sha256: str
    latency_ms: float
    cache_hit: bool = False


def _as_inputs(inputs: np.ndarray | Sequence[Any]) -> tuple[list[np.ndarray], bool]:
    """Normalize to a list of arrays; True when a single array was given."""
    if isinstance(inputs, np.ndarray):
        return [inputs], True
    if isinstance(inputs, list | tuple):
        return [np.asarray(x) for x in inputs], False
    raise TypeError(f"infer() takes a numpy array or a list of them, got {type(inputs).__name__}")


class InferenceClient:
    """Connection to the agent's inference service over its Unix socket or localhost HTTP.

    One persistent connection, reused for every call; thread-safe (calls are serialized, so
    give each thread its own client for parallel requests).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        url: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
    ) -> None:
        """Name exactly one of socket_path or url ("http://127.0.0.1:PORT"); connects lazily."""
        if (socket_path is None) == (url is None):
            raise ValueError("give exactly one of socket_path or url")
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.url = url
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._reader: BinaryIO | None = None
        self._http: http.client.HTTPConnection | None = None
        # The active model's quantization, for float in/out (refreshed when the model changes).
        self._codec: ModelCodec | None = None
        if url is not None:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme != "http" or not parts.hostname or parts.port is None:
                raise ValueError(f"url must look like http://127.0.0.1:PORT, got {url!r}")
            self._host, self._port = parts.hostname, parts.port

    def __enter__(self) -> InferenceClient:
        """Use as a context manager; closes on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the connection."""
        self.close()

    def close(self) -> None:
        """Close the connection (the next call reconnects)."""
        with self._lock:
            self._disconnect()

    def infer(
        self, inputs: np.ndarray | Sequence[Any], *, raw: bool = False
    ) -> np.ndarray | list[np.ndarray]:
        """Run the active model: an array in -> its single output array (or the list if the
        model has several outputs); a list of arrays in (one per input) -> the list of outputs.

        Float input to a quantized (int8/uint8) model is quantized with the model's scale and
        zero point, and quantized outputs come back dequantized as float32; `raw=True` sends
        and returns the tensors exactly as given and computed.
        """
        arrays, single = _as_inputs(inputs)
        outputs = self.infer_detailed(arrays, raw=raw).outputs
        return outputs[0] if single and len(outputs) == 1 else outputs

    def infer_detailed(
        self, inputs: np.ndarray | Sequence[Any], *, raw: bool = False
    ) -> InferenceReply:
        """Run the active model and return outputs with the model's sha256 and the latency
        (float in and out as in infer(), unless `raw`)."""
        arrays, _ = _as_inputs(inputs)
        if raw:
            return self._infer_raw(arrays)
        codec = self._codec or self._describe()
        for attempt in (1, 2):
            sent = codec.encode(arrays)
            try:
                reply = self._infer_raw(sent)
            except InferenceError as exc:
                # Refused by a model swapped in since it was described: describe it, retry once.
                if attempt == 2 or exc.model_sha256 in (None, codec.model_sha256):
                    raise
                codec = self._describe()
                continue
            if reply.model_sha256 != codec.model_sha256:
                codec = self._describe()
                if attempt == 1 and any(
                    a is not b for a, b in zip(codec.encode(arrays), sent, strict=False)
                ):
                    continue  # the new model takes these inputs differently: ask it again
            return replace(reply, outputs=codec.decode(reply.outputs))
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _describe(self) -> ModelCodec:
        """Fetch the active model's quantization and keep it until a reply names another."""
        self._codec = ModelCodec.from_info(self.model_info())
        return self._codec

    def _infer_raw(self, arrays: list[np.ndarray]) -> InferenceReply:
        """One inference with the tensors exactly as given."""
        with self._lock:
            if self.socket_path is not None:
                header, payload = self._socket_call({"op": "infer"}, arrays)
                return InferenceReply(
                    decode_tensors(header, payload),
                    str(header["model_sha256"]),
                    float(header["latency_ms"]),
                    bool(header.get("cache_hit", False)),
                )
            body = {"inputs": [a.tolist() for a in arrays]}
            reply = self._http_call("POST", "/v1/infer", body)
            outputs = [
                np.asarray(value, dtype=dtype)
                for value, dtype in zip(reply["outputs"], reply["dtypes"], strict=True)
            ]
            return InferenceReply(
                outputs,
                str(reply["model_sha256"]),
                float(reply["latency_ms"]),
                bool(reply.get("cache_hit", False)),
            )

    def model_info(self) -> dict[str, Any]:
        """The active model: model_sha256, init_ms, inputs and outputs (name, shape, dtype, ...)."""
        with self._lock:
            if self.socket_path is not None:
                header, _ = self._socket_call({"op": "model"}, [])
                return dict(header["model"])
            info: dict[str, Any] = self._http_call("GET", "/v1/model", None)
            return info

    # ------------------------------------------------------------------ transports

    def _disconnect(self) -> None:
        """Drop the socket / HTTP connection; called with the lock held."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._http is not None:
            self._http.close()
            self._http = None

    def _socket_call(
        self, header: dict[str, Any], arrays: list[np.ndarray]
    ) -> tuple[dict[str, Any], bytes]:
        """Send one request frame and read the reply; InferenceError carries the server's text."""
        buffers = encode_frame(header, arrays)
        if self._sock is None:
            assert self.socket_path is not None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(os.fspath(self.socket_path))
            except OSError as exc:
                sock.close()
                raise InferenceError(
                    f"cannot connect to the inference service at {self.socket_path}: {exc}"
                ) from exc
            self._sock = sock
            self._reader = sock.makefile("rb")
        assert self._reader is not None
        try:
            send_frame(self._sock, buffers)
            frame = read_frame(self._reader, max_payload=2**32 - 1)
        except (OSError, FrameError) as exc:
            self._disconnect()
            raise InferenceError(f"inference service connection failed: {exc}") from exc
        if frame is None:
            self._disconnect()
            raise InferenceError("the inference service closed the connection")
        reply, payload = frame
        if not reply.get("ok"):
            if reply.get("fatal"):
                self._disconnect()  # the server closed its side after a framing error
            raise InferenceError(
                str(reply.get("error", "unknown error")), model_sha256=reply.get("model_sha256")
            )
        return reply, payload

    def _http_call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        """One HTTP request on the persistent connection; error bodies become InferenceError."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (1, 2):
            if self._http is None:
                self._http = http.client.HTTPConnection(
                    self._host, self._port, timeout=self.timeout
                )
            try:
                self._http.request(method, path, body=data, headers=headers)
                if self._http.sock is not None:
                    self._http.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                response = self._http.getresponse()
                raw = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                # The server closed an idle keep-alive connection: reconnect and retry once.
                self._disconnect()
                if attempt == 2:
                    raise InferenceError(f"inference service at {self.url} failed: {exc}") from exc
            except OSError as exc:
                self._disconnect()
                raise InferenceError(f"inference service at {self.url} failed: {exc}") from exc
        try:
            reply = json.loads(raw)
        except json.JSONDecodeError:
            reply = {"error": raw[:200].decode(errors="replace")}
        if response.status != 200:
            raise InferenceError(
                f"HTTP {response.status}: {reply.get('error', reply)}",
                model_sha256=reply.get("model_sha256") if isinstance(reply, dict) else None,
            )
        return reply


def infer(
    array: np.ndarray | Sequence[Any],
    *,
    socket_path: str | os.PathLike[str] | None = None,
    url: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT_S,
) -> np.ndarray | list[np.ndarray]:
    """One-shot call on a fresh connection (a loop should keep an InferenceClient instead)."""
    with InferenceClient(socket_path, url=url, timeout=timeout) as client:
        return client.infer(array)


def wait_for_service(socket_path: str | os.PathLike[str], timeout: float = 10.0) -> None:
    """Block until the service answers on socket_path (e.g. right after the agent starts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(os.fspath(socket_path))
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise InferenceError(
                    f"no inference service at {socket_path} after {timeout:.0f} s: {exc}"
                ) from exc
            time.sleep(0.05)

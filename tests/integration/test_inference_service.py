"""The inference service end to end: real Unix socket and HTTP, real models, swaps under load."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.client import MAX_PAYLOAD_BYTES, InferenceClient, infer
from agent.inference_server import InferenceServer
from agent.runtime import Interpreter, load_interpreter, run_once
from agent.serving import InferenceError, ServingModel
from tests.serving_helpers import (
    FP32,
    INT8,
    CountingObserver,
    batch_model,
    loaded,
    run_once_resized,
    sha256_of,
)

pytestmark = pytest.mark.agent

THREADS, REQUESTS = 8, 200  # 8 concurrent clients × 200 requests each over the socket


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory under /tmp short enough for AF_UNIX paths (pytest's tmp_path can be long)."""
    path = Path(tempfile.mkdtemp(prefix="efi-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fp32_server(short_dir: Path) -> Iterator[InferenceServer]:
    """A server for tiny_fp32 on a socket and on HTTP port 0, with an observer."""
    server = InferenceServer(
        loaded(FP32),
        socket_path=short_dir / "infer.sock",
        http="127.0.0.1:0",
        observer=CountingObserver(),
    )
    server.start()
    yield server
    server.stop()


class Swapper(threading.Thread):
    """Alternates the served model between two files (loaded afresh each time) until stopped."""

    def __init__(self, serving: ServingModel, paths: list[Path]) -> None:
        """Swap between `paths`."""
        super().__init__(daemon=True)
        self.serving, self.paths = serving, paths
        self.stopped = threading.Event()
        self.swaps = 0

    def run(self) -> None:
        """Swap as fast as models load, yielding briefly so requests get the lock too."""
        while not self.stopped.wait(0.002):
            path = self.paths[(self.swaps + 1) % len(self.paths)]
            self.serving.swap(load_interpreter(path, 1), sha256_of(path), 1.0)
            self.swaps += 1


def int_valued_input(rng: np.random.Generator) -> np.ndarray:
    """An (1, 8, 8, 1) input of whole numbers in int8 range: valid for both models."""
    return rng.integers(-128, 128, size=(1, 8, 8, 1)).astype(np.int64)


def references() -> dict[str, tuple[Interpreter, np.dtype[Any]]]:
    """Separate interpreters (not the served ones) for each model, keyed by sha256."""
    return {
        sha256_of(FP32): (load_interpreter(FP32, 1), np.dtype(np.float32)),
        sha256_of(INT8): (load_interpreter(INT8, 1), np.dtype(np.int8)),
    }


def test_concurrent_socket_clients_during_swaps_get_unmixed_answers(short_dir: Path) -> None:
    """8 threads × 200 requests while fp32/int8 models alternate: every request is answered,
    and each answer is exactly what the model it names computes (no mixing within a request).

    The two models take different input dtypes, so each client sends the dtype of the model it
    last heard from; a request that meets the other model is refused by that model, which the
    refusal names, and that is checked too.
    """
    observer = CountingObserver()
    serving = loaded(FP32)
    server = InferenceServer(serving, socket_path=short_dir / "s.sock", observer=observer)
    server.start()
    swapper = Swapper(serving, [FP32, INT8])
    refs = references()
    dtype_of = {sha: dtype for sha, (_, dtype) in refs.items()}
    answers: list[tuple[np.ndarray, str, np.ndarray]] = []
    refusals: list[tuple[np.dtype[Any], InferenceError]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        """One connection, 200 requests, dtype following the last model seen."""
        rng = np.random.default_rng(seed)
        dtype = np.dtype(np.float32)
        try:
            with InferenceClient(short_dir / "s.sock") as conn:
                for _ in range(REQUESTS):
                    array = int_valued_input(rng).astype(dtype)
                    try:
                        # raw: this test checks the wire protocol's own answers and refusals
                        reply = conn.infer_detailed(array, raw=True)
                    except InferenceError as exc:
                        with lock:
                            refusals.append((dtype, exc))
                        dtype = dtype_of.get(exc.model_sha256 or "", dtype)
                        continue
                    with lock:
                        answers.append((array, reply.model_sha256, reply.outputs[0]))
                    dtype = dtype_of[reply.model_sha256]
        except BaseException as exc:  # surfaced below: a thread's failure must fail the test
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(THREADS)]
    swapper.start()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        swapper.stopped.set()
        swapper.join(10)
        server.stop()
    assert not failures, failures
    assert len(answers) + len(refusals) == THREADS * REQUESTS
    assert observer.requests == len(answers) and observer.errors == len(refusals)
    for sent_dtype, exc in refusals:
        # Refused only by the model whose input dtype differs from what was sent.
        assert exc.model_sha256 in dtype_of, str(exc)
        assert dtype_of[exc.model_sha256] != sent_dtype
        assert f"expected {dtype_of[exc.model_sha256].name} (1, 8, 8, 1)" in str(exc)
    for array, sha, output in answers:
        interpreter, dtype = refs[sha]
        assert array.dtype == dtype
        np.testing.assert_array_equal(output, run_once(interpreter, [array])[0])
    per_model = Counter(sha for _, sha, _ in answers)
    # Enough answers from each model for the comparison above to mean something.
    assert len(per_model) == 2 and min(per_model.values()) >= 50, per_model
    assert swapper.swaps >= 10, f"only {swapper.swaps} swaps happened during the requests"


def test_concurrent_http_clients_during_swaps_get_unmixed_answers(short_dir: Path) -> None:
    """4 HTTP clients × 100 requests during swaps: JSON numbers suit both models, so all succeed."""
    serving = loaded(FP32)
    server = InferenceServer(serving, socket_path=None, http="127.0.0.1:0")
    server.start()
    swapper = Swapper(serving, [FP32, INT8])
    refs = references()
    answers: list[tuple[np.ndarray, str, np.ndarray]] = []
    failures: list[BaseException] = []

    def client(seed: int) -> None:
        """One keep-alive connection, 100 requests."""
        rng = np.random.default_rng(seed)
        try:
            with InferenceClient(url=server.http_url) as conn:
                for _ in range(100):
                    array = int_valued_input(rng)
                    reply = conn.infer_detailed(array, raw=True)  # the wire's own answers
                    answers.append((array, reply.model_sha256, reply.outputs[0]))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    swapper.start()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        swapper.stopped.set()
        swapper.join(10)
        server.stop()
    assert not failures, failures
    assert len(answers) == 400
    for array, sha, output in answers:
        interpreter, dtype = refs[sha]
        assert output.dtype == interpreter.get_output_details()[0]["dtype"]
        np.testing.assert_array_equal(output, run_once(interpreter, [array.astype(dtype)])[0])
    assert len(Counter(sha for _, sha, _ in answers)) == 2


def test_batched_socket_service_during_swaps(short_dir: Path, cache_dir: Path) -> None:
    """Micro-batching on (2 ms window) with two dynamic-batch models swapping: exact answers."""
    model_a, model_b = batch_model(cache_dir, seed=1), batch_model(cache_dir, seed=2)
    observer = CountingObserver()
    serving = loaded(model_a)
    server = InferenceServer(
        serving,
        socket_path=short_dir / "b.sock",
        batch_window_ms=2.0,
        max_batch=8,
        observer=observer,
    )
    server.start()
    swapper = Swapper(serving, [model_a, model_b])
    refs = {sha256_of(p): load_interpreter(p, 1) for p in (model_a, model_b)}
    answers: list[tuple[np.ndarray, str, np.ndarray]] = []
    failures: list[BaseException] = []

    def client(seed: int) -> None:
        """100 requests of 1-3 rows each."""
        rng = np.random.default_rng(seed)
        try:
            with InferenceClient(short_dir / "b.sock") as conn:
                for _ in range(100):
                    rows = int(rng.integers(1, 4))
                    array = rng.standard_normal((rows, 16)).astype(np.float32)
                    reply = conn.infer_detailed(array)
                    answers.append((array, reply.model_sha256, reply.outputs[0]))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(THREADS)]
    swapper.start()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        swapper.stopped.set()
        swapper.join(10)
        server.stop()
    assert not failures, failures
    assert len(answers) == THREADS * 100 and observer.requests == THREADS * 100
    for array, sha, output in answers:
        np.testing.assert_array_equal(output, run_once_resized(refs[sha], array))
    assert sum(observer.batch_sizes) == THREADS * 100
    assert max(observer.batch_sizes) > 1, "8 concurrent clients never shared an invoke"
    assert len(Counter(sha for _, sha, _ in answers)) == 2


def raw_exchange(path: Path, data: bytes) -> tuple[dict[str, Any], socket.socket]:
    """Send raw bytes on a fresh connection and read one response header (connection kept)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(os.fspath(path))
    sock.sendall(data)
    return read_header(sock), sock


def read_header(sock: socket.socket) -> dict[str, Any]:
    """Read one response frame from a raw socket and return its header."""
    prefix = recv_exactly(sock, 12)
    magic, header_len, payload_len = struct.unpack("<4sII", prefix)
    assert magic == b"EFI1"
    header = json.loads(recv_exactly(sock, header_len))
    recv_exactly(sock, payload_len)
    return header  # type: ignore[no-any-return]


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes from the socket."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "server closed the connection"
        data += chunk
    return data


def frame(header: dict[str, Any] | bytes, payload: bytes = b"") -> bytes:
    """A request frame with an arbitrary header (dict or raw bytes) and payload."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<4sII", b"EFI1", len(raw), len(payload)) + raw + payload


def test_bad_socket_requests_get_clear_errors_and_service_continues(
    fp32_server: InferenceServer,
) -> None:
    """Bad frames, shapes and dtypes are answered with messages; the connection or server lives."""
    path = fp32_server.socket_path
    assert path is not None
    good = np.zeros((1, 8, 8, 1), np.float32)
    with InferenceClient(path) as client:
        with pytest.raises(InferenceError, match=r"expected float32 \(1, 8, 8, 1\), got int8"):
            client.infer(good.astype(np.int8))
        with pytest.raises(InferenceError, match=r"got float32 \(8, 8\)"):
            client.infer(good.reshape(8, 8))
        with pytest.raises(InferenceError, match=r"model has 1 input\(s\), got 2"):
            client.infer([good, good])
        assert client.infer(good).shape == (1, 10)  # same connection still serves

    # A bad header keeps the connection in step: answered, then the next frame is served.
    header, sock = raw_exchange(path, frame(b"{not json"))
    with sock:
        assert not header["ok"] and "header is not UTF-8 JSON" in header["error"]
        sock.sendall(frame({"op": "teleport"}))
        assert "unknown op 'teleport'" in read_header(sock)["error"]
        tensors = [{"dtype": "float32", "shape": [1, 8, 8, 1]}]
        sock.sendall(frame({"op": "infer", "tensors": tensors}, b"\0" * 100))
        assert "needs 256 bytes but the payload has 100 left" in read_header(sock)["error"]
        sock.sendall(frame({"op": "infer", "tensors": [{"dtype": "complex64", "shape": [1]}]}))
        assert "tensor 0 must be" in read_header(sock)["error"]
        sock.sendall(frame({"op": "infer", "tensors": tensors}, good.tobytes()))
        assert read_header(sock)["ok"]

    # Wrong magic or an oversized request: answered, then that connection is closed.
    header, sock = raw_exchange(path, b"GET / HTTP/1.1\r\n\r\n")
    with sock:
        assert "bad frame: expected magic" in header["error"] and header["fatal"]
        assert sock.recv(1) == b""
    oversized = struct.pack("<4sII", b"EFI1", 2, MAX_PAYLOAD_BYTES + 1) + b"{}"
    header, sock = raw_exchange(path, oversized)
    with sock:
        assert f"exceeds the {MAX_PAYLOAD_BYTES}-byte limit" in header["error"]
        assert sock.recv(1) == b""

    assert infer(good, socket_path=path).shape == (1, 10)  # the server is still up
    observer = fp32_server.dispatcher.observer
    assert isinstance(observer, CountingObserver)
    assert observer.errors == 9 and observer.requests == 3


def http_call(
    server: InferenceServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One raw HTTP request; (status, JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port or 0, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_bad_http_requests_get_clear_errors_and_service_continues(
    fp32_server: InferenceServer,
) -> None:
    """Bad JSON, ragged lists, wrong shapes, oversized bodies, unknown paths: all answered."""
    status, body = http_call(fp32_server, "POST", "/v1/infer", b"{nope")
    assert status == 400 and "body is not JSON" in body["error"]
    status, body = http_call(fp32_server, "POST", "/v1/infer", b'{"inputs": [[[1, 2], [3]]]}')
    assert status == 400 and "not a rectangular nested list" in body["error"]
    status, body = http_call(fp32_server, "POST", "/v1/infer", b'{"inputs": [["a"]]}')
    assert status == 400 and "nested list of numbers" in body["error"]
    status, body = http_call(fp32_server, "POST", "/v1/infer", b'{"inputs": [[1, 2]]}')
    assert status == 400 and "expected float32 (1, 8, 8, 1), got float32 (2,)" in body["error"]
    status, body = http_call(fp32_server, "POST", "/v1/infer", b'{"x": 1}')
    assert status == 400 and '{"inputs":' in body["error"]
    too_big = {"Content-Length": str(MAX_PAYLOAD_BYTES + 1)}
    status, body = http_call(fp32_server, "POST", "/v1/infer", None, too_big)
    assert status == 413 and "exceeds" in body["error"]
    status, body = http_call(fp32_server, "GET", "/v2/nothing")
    assert status == 404 and "no such endpoint" in body["error"]

    with InferenceClient(url=fp32_server.http_url) as client:
        with pytest.raises(InferenceError, match=r"HTTP 400: input 0 .*got float32 \(8, 8\)"):
            client.infer(np.zeros((8, 8), np.float32))
        reference = run_once(load_interpreter(FP32, 1), [np.ones((1, 8, 8, 1), np.float32)])[0]
        np.testing.assert_array_equal(client.infer(np.ones((1, 8, 8, 1), np.float32)), reference)
        info = client.model_info()
    assert info["model_sha256"] == sha256_of(FP32)
    assert info["inputs"][0]["dtype"] == "float32" and info["inputs"][0]["shape"] == [1, 8, 8, 1]
    assert info["outputs"][0]["shape"] == [1, 10]
    status, body = http_call(fp32_server, "GET", "/healthz")
    assert status == 200 and body["model_loaded"] and body["model_sha256"] == sha256_of(FP32)


def test_no_model_is_a_clear_error_on_both_transports(fp32_server: InferenceServer) -> None:
    """After clear(): socket and HTTP say no model is loaded; healthz reports it; a swap heals."""
    fp32_server.serving.clear()
    assert fp32_server.socket_path is not None
    array = np.zeros((1, 8, 8, 1), np.float32)
    with InferenceClient(fp32_server.socket_path) as client:
        with pytest.raises(InferenceError, match="no model loaded"):
            client.infer(array)
        with pytest.raises(InferenceError, match="no model loaded"):
            client.model_info()
        status, body = http_call(fp32_server, "POST", "/v1/infer", b'{"inputs": [[0]]}')
        assert status == 503 and "no model loaded" in body["error"]
        assert http_call(fp32_server, "GET", "/healthz")[1]["model_loaded"] is False
        assert http_call(fp32_server, "GET", "/v1/model")[0] == 503
        fp32_server.serving.swap(load_interpreter(INT8, 1), sha256_of(INT8), 1.0)
        assert client.infer_detailed(array.astype(np.int8)).model_sha256 == sha256_of(INT8)


def test_result_cache_over_the_socket(short_dir: Path) -> None:
    """Repeated input hits the cache (flagged in the reply) until a swap changes the model."""
    serving = loaded(FP32)
    server = InferenceServer(serving, socket_path=short_dir / "c.sock", result_cache_entries=8)
    with server, InferenceClient(short_dir / "c.sock") as client:
        array = np.full((1, 8, 8, 1), 0.25, np.float32)
        first, second = client.infer_detailed(array), client.infer_detailed(array)
        assert (first.cache_hit, second.cache_hit) == (False, True)
        np.testing.assert_array_equal(first.outputs[0], second.outputs[0])
        serving.swap(load_interpreter(INT8, 1), sha256_of(INT8), 1.0)
        third = client.infer_detailed(array.astype(np.int8))
        assert not third.cache_hit and third.model_sha256 == sha256_of(INT8)


def test_socket_file_mode_stale_file_and_length_limit(short_dir: Path) -> None:
    """0o660 socket; a stale socket file is replaced; a live one, a regular file or a long path
    is refused with a message naming the path; the file is removed on stop."""
    path = short_dir / "m.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))  # bound, never listening, then closed: a stale socket file
    stale.close()
    server = InferenceServer(loaded(FP32), socket_path=path)
    server.start()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        with pytest.raises(OSError, match="already listening"):
            InferenceServer(loaded(FP32), socket_path=path).start()
        assert infer(np.zeros((1, 8, 8, 1), np.float32), socket_path=path).shape == (1, 10)
    finally:
        server.stop()
    assert not path.exists()

    regular = short_dir / "not-a-socket"
    regular.write_text("keep me")
    with pytest.raises(ValueError, match="is not a socket"):
        InferenceServer(ServingModel(), socket_path=regular).start()
    assert regular.read_text() == "keep me"
    long_path = short_dir / ("x" * 120) / "infer.sock"
    with pytest.raises(ValueError, match=f"AF_UNIX allows at most 107: {long_path}"):
        InferenceServer(ServingModel(), socket_path=long_path)


def test_http_refuses_non_loopback_addresses_unless_allowed() -> None:
    """Binding HTTP to a non-loopback address needs allow_non_loopback=True."""
    with pytest.raises(ValueError, match="refusing to serve inference on non-loopback"):
        InferenceServer(ServingModel(), socket_path=None, http="0.0.0.0:0")
    with pytest.raises(ValueError, match="must be HOST:PORT"):
        InferenceServer(ServingModel(), socket_path=None, http="8080")
    server = InferenceServer(
        ServingModel(), socket_path=None, http="0.0.0.0:0", allow_non_loopback=True
    )
    with server:
        assert server.http_port
        assert http_call(server, "GET", "/healthz")[1] == {
            "status": "ok",
            "model_loaded": False,
            "model_sha256": None,
        }

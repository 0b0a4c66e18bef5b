"""InferenceClient's "numpy in, numpy out" on a real int8 model served over socket and HTTP:
float input quantized, output dequantized with the model's parameters; raw on request."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.inference_server import InferenceServer
from agent.quantization import TensorCodec
from agent.runtime import load_interpreter
from agent.serving import InferenceError
from tests.serving_helpers import FP32, INT8, loaded, sha256_of

pytestmark = pytest.mark.agent

SHAPE = (1, 8, 8, 1)


@pytest.fixture
def int8_server() -> Iterator[InferenceServer]:
    """tiny_int8 on a Unix socket (in a short /tmp dir) and on HTTP port 0."""
    short = Path(tempfile.mkdtemp(prefix="efq-", dir="/tmp"))
    server = InferenceServer(loaded(INT8), socket_path=short / "q.sock", http="127.0.0.1:0")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(short, ignore_errors=True)


def _clients(server: InferenceServer) -> list[InferenceClient]:
    """A client on each transport."""
    assert server.socket_path is not None and server.http_url is not None
    return [InferenceClient(server.socket_path), InferenceClient(url=server.http_url)]


def test_float_in_float_out_on_an_int8_model(int8_server: InferenceServer) -> None:
    x = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
    fp32_reference = loaded(FP32)
    expected_fp32 = np.asarray(fp32_reference.infer([x]).outputs[0])
    for client in _clients(int8_server):
        with client:
            info = client.model_info()
            qin, qout = (TensorCodec.from_spec(info[k][0]) for k in ("inputs", "outputs"))
            assert qin.quantized and qout.quantized and qin.dtype == np.int8
            # The raw path is the service's arithmetic on the model's own quantization: the
            # default path must equal it exactly.
            q = np.clip(np.round(x / qin.scale) + qin.zero_point, -128, 127).astype(np.int8)
            raw = client.infer(q, raw=True)
            assert isinstance(raw, np.ndarray) and raw.dtype == np.int8
            out = client.infer(x)
            assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (1, 10)
            dequantized = (raw.astype(np.float32) - qout.zero_point) * qout.scale
            np.testing.assert_array_equal(out, dequantized)
            # ... and close to the float model it was quantized from.
            assert np.abs(out - expected_fp32).max() < 20 * qout.scale
            assert int(np.argmax(out)) == int(np.argmax(expected_fp32))
            # Already-quantized input goes through as it is; only the output is dequantized.
            np.testing.assert_array_equal(client.infer(q), out)
            reply = client.infer_detailed(x)
            assert reply.model_sha256 == sha256_of(INT8) and reply.outputs[0].dtype == np.float32


def test_raw_keeps_the_service_strict_and_out_of_range_floats_clip(
    int8_server: InferenceServer,
) -> None:
    with _clients(int8_server)[0] as client:
        with pytest.raises(InferenceError, match=r"expected int8 \(1, 8, 8, 1\), got float32"):
            client.infer(np.zeros(SHAPE, np.float32), raw=True)
        huge = np.full(SHAPE, 1e9, np.float32)
        info = client.model_info()["inputs"][0]
        saturated = np.full(SHAPE, 127, np.int8)
        np.testing.assert_array_equal(client.infer(huge), client.infer(saturated))
        assert TensorCodec.from_spec(info).quantize(-huge).min() == -128
    # A float model's tensors are untouched: the default equals raw.
    int8_server.serving.swap(load_interpreter(FP32, 1), sha256_of(FP32), 1.0)
    assert int8_server.http_url is not None
    with InferenceClient(url=int8_server.http_url) as client:
        x = np.full(SHAPE, 0.5, np.float32)
        np.testing.assert_array_equal(client.infer(x), client.infer(x, raw=True))


def test_a_model_swap_is_followed(int8_server: InferenceServer) -> None:
    x = np.random.default_rng(2).random(SHAPE, dtype=np.float32)
    assert int8_server.socket_path is not None
    with InferenceClient(int8_server.socket_path) as client:
        int8_out = client.infer(x)  # describes and caches the int8 model's quantization
        # int8 -> fp32: the cached codec would quantize; the refusal names the new model, so
        # the client describes it and sends the floats as they are.
        int8_server.serving.swap(load_interpreter(FP32, 1), sha256_of(FP32), 1.0)
        reply = client.infer_detailed(x)
        assert reply.model_sha256 == sha256_of(FP32)
        np.testing.assert_array_equal(reply.outputs[0], loaded(FP32).infer([x]).outputs[0])
        # fp32 -> int8 again: float input is quantized for it once more.
        int8_server.serving.swap(load_interpreter(INT8, 1), sha256_of(INT8), 1.0)
        np.testing.assert_array_equal(client.infer(x), int8_out)

"""One-operator .tflite models that probe what a TF Lite runtime's op resolver knows.

scripts/gen_op_registry.py builds converters/data/op_registry.json with them; tests use the
realistic Convolution2DTransposeBias model as a custom-op fixture (litert's default XNNPACK
delegate runs it, tflite-runtime 2.14 does not).
"""

from __future__ import annotations

import struct

import numpy as np

# Custom ops whose support comes from a delegate (XNNPACK takes MediaPipe's transposed
# convolution) are only recognised with realistic tensors and options, so they get their own model.
REALISTIC_CUSTOM = frozenset({"Convolution2DTransposeBias"})


def probe_model(builtin: int | None, version: int, custom: str | None = None) -> bytes:
    """A .tflite with one operator (two float32 [1] inputs, one output) of the given op code."""
    if custom in REALISTIC_CUSTOM:
        return conv2d_transpose_bias_model()
    import flatbuffers  # type: ignore[import-untyped]
    from ai_edge_litert import schema_py_generated as s

    code = s.OperatorCodeT()
    if custom is not None:
        code.builtinCode = s.BuiltinOperator.CUSTOM
        code.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
        code.customCode = custom
    else:
        code.builtinCode = builtin
        code.deprecatedBuiltinCode = min(
            builtin, s.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES
        )
    code.version = version
    tensors = []
    for i in range(3):
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name = [1], s.TensorType.FLOAT32, 0, f"t{i}"
        tensors.append(t)
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    graph = s.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0, 1], [2], [op]
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [graph]
    model.buffers = [s.BufferT()]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def conv2d_transpose_bias_model() -> bytes:
    """MediaPipe's Convolution2DTransposeBias: [1,4,4,2] → [1,8,8,2], stride 2, SAME padding.

    Its custom options are TfLiteTransposeConvParams (padding, stride_w, stride_h, activation).
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.CUSTOM
    code.customCode, code.version = "Convolution2DTransposeBias", 1
    buffers = [s.BufferT(), s.BufferT(), s.BufferT()]
    weights = np.linspace(-1.0, 1.0, 36, dtype=np.float32).reshape(2, 3, 3, 2)
    buffers[1].data = list(weights.tobytes())
    buffers[2].data = list(np.array([0.1, -0.2], np.float32).tobytes())
    tensors = []
    for shape, buffer, name in (
        ([1, 4, 4, 2], 0, "input"),
        ([2, 3, 3, 2], 1, "weights"),
        ([2], 2, "bias"),
        ([1, 8, 8, 2], 0, "output"),
    ):
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name = shape, s.TensorType.FLOAT32, buffer, name
        tensors.append(t)
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.customOptions = list(struct.pack("<4i", 1, 2, 2, 0))  # SAME, stride 2x2, no activation
    graph = s.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0], [3], [op]
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [graph], buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())

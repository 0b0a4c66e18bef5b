"""Tests for converters.tflite_rewrite on committed fp16/sparse/signature-less .tflite files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.errors import ConversionError
from converters.interpreter import interpreter_class, load_host_model
from converters.tflite_inspect import inspect_bytes, schema
from converters.tflite_rewrite import (
    BUFFER_ALIGNMENT,
    SIGNATURE_KEY,
    fingerprint,
    integer_io,
    normalize_tflite,
    read_model,
    signature_input_names,
    write_model,
)
from tests.paths import TEST_DATA
from tests.pretrained_models import detector_scenes

DATA = TEST_DATA
DETECTOR = DATA / "pretrained" / "detector_fp16.tflite"
SPARSE = DATA / "pretrained" / "sparse.tflite"


def all_outputs(data: bytes, x: np.ndarray) -> list[np.ndarray]:
    """Every output of a float model for each sample of `x` (stacked per output)."""
    interp = interpreter_class()(model_content=data)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    outs: list[list[np.ndarray]] = [[] for _ in interp.get_output_details()]
    for sample in x:
        interp.set_tensor(inp, sample[None].astype(np.float32))
        interp.invoke()
        for k, det in enumerate(interp.get_output_details()):
            outs[k].append(np.array(interp.get_tensor(det["index"])))
    return [np.concatenate(o) for o in outs]


def test_fixtures_are_what_they_claim() -> None:
    """The detector has fp16 constants, two outputs and no signature; the sparse one DENSIFY."""
    det = inspect_bytes(DETECTOR.read_bytes())
    assert "DEQUANTIZE" in det.op_versions and det.tensor_dtypes.get("float16", 0) >= 10
    assert len(det.outputs) == 2
    assert not read_model(DETECTOR.read_bytes()).signatureDefs
    assert "DENSIFY" in inspect_bytes(SPARSE.read_bytes()).op_versions


def test_fp16_detector_normalizes_to_an_equal_fp32_model_with_a_signature() -> None:
    """fp16 constants fold into fp32 (bit-exact upcast): both outputs are unchanged."""
    original = DETECTOR.read_bytes()
    data, notes = normalize_tflite(original)
    info = inspect_bytes(data)
    assert "DEQUANTIZE" not in info.op_versions and "float16" not in info.tensor_dtypes
    assert notes.folded == {"DEQUANTIZE": 12} and notes.signature_added
    assert any("SignatureDef" in line for line in notes.lines())
    sig = read_model(data).signatureDefs[0]
    assert sig.signatureKey.decode() == SIGNATURE_KEY and len(sig.outputs) == 2
    assert signature_input_names(data) == ["serving_default_image:0"]
    x = detector_scenes(4, seed=7)[0]
    for got, want in zip(all_outputs(data, x), all_outputs(original, x), strict=True):
        np.testing.assert_array_equal(got, want)
    runner = interpreter_class()(model_content=data).get_signature_runner(SIGNATURE_KEY)
    assert len(runner(**{"serving_default_image:0": x[:1]})) == 2


def test_sparse_constants_densify_exactly() -> None:
    """DENSIFY'd constants become dense fp32 weights; the outputs are identical."""
    original = SPARSE.read_bytes()
    data, notes = normalize_tflite(original)
    assert notes.folded == {"DENSIFY": 2}
    model = read_model(data)
    assert "DENSIFY" not in inspect_bytes(data).op_versions
    assert all(t.sparsity is None for t in model.subgraphs[0].tensors)
    x = np.random.default_rng(3).random((8, 64), dtype=np.float32)
    np.testing.assert_array_equal(
        load_host_model(data).predict(x), load_host_model(original).predict(x)
    )


def test_normalize_is_idempotent_and_fingerprint_ignores_signatures() -> None:
    """A plain fp32 file normalizes to the same model; a signature alone changes no fingerprint."""
    once, _ = normalize_tflite(DETECTOR.read_bytes())
    twice, notes = normalize_tflite(once)
    assert notes.lines() == []
    assert fingerprint(once) == fingerprint(twice)
    unsigned = read_model(once)
    unsigned.signatureDefs = []
    assert fingerprint(write_model(unsigned)) == fingerprint(once)
    assert fingerprint(once) != fingerprint(DETECTOR.read_bytes())  # fp16 vs fp32 weights


def test_fingerprint_sees_one_changed_weight() -> None:
    """Changing one constant byte changes the fingerprint (equal means equal in every tensor)."""
    data, _ = normalize_tflite(DETECTOR.read_bytes())
    model = read_model(data)
    weights = [model.buffers[t.buffer] for t in model.subgraphs[0].tensors if t.buffer]
    buf = next(b for b in weights if b.data is not None and len(b.data) > 16)
    buf.data = np.array(buf.data, dtype=np.uint8)
    buf.data[3] ^= 1
    assert fingerprint(write_model(model)) != fingerprint(data)


def test_constant_buffers_are_aligned() -> None:
    """Every constant buffer starts on a BUFFER_ALIGNMENT boundary in the rewritten file."""
    data, _ = normalize_tflite(DETECTOR.read_bytes())
    model = schema().Model.GetRootAs(data, 0)
    starts = []
    for i in range(model.BuffersLength()):
        buf = model.Buffers(i)
        if buf.DataLength() > 0:
            tab = buf._tab
            starts.append(tab.Vector(tab.Offset(4)))
    assert starts and all(s % BUFFER_ALIGNMENT == 0 for s in starts)


def test_integer_io_leaves_an_integer_model_alone(cache_dir: Path) -> None:
    """A model with int8 I/O already has nothing to cut: the bytes come back unchanged."""
    from converters.digits import digits_tflite

    data = digits_tflite(cache_dir, "int8").read_bytes()
    out, notes = integer_io(data)
    assert out == data and notes.io_changed == []


@pytest.mark.slow
def test_integer_io_cuts_the_float_boundary(cache_dir: Path) -> None:
    """TF's int8 conversion with float I/O (QUANTIZE in, DEQUANTIZE out) becomes int8 I/O that
    computes the same dequantized outputs."""
    import tensorflow as tf

    from converters.digits import digits_keras, load_digits_dataset
    from converters.recipes import representative_dataset

    ds = load_digits_dataset()
    conv = tf.lite.TFLiteConverter.from_keras_model(
        tf.keras.models.load_model(digits_keras(cache_dir))
    )
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative_dataset(ds.x_train)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    float_io = bytes(conv.convert())
    assert inspect_bytes(float_io).inputs[0].dtype == "float32"
    data, notes = integer_io(float_io)
    info = inspect_bytes(data)
    assert info.inputs[0].dtype == "int8" and info.outputs[0].dtype == "int8"
    assert "QUANTIZE" not in info.op_versions and notes.io_changed
    a = load_host_model(float_io).predict(ds.x_val[:50])
    b = load_host_model(data).predict(ds.x_val[:50])
    scale = info.outputs[0].quantization[0]
    assert float(np.abs(a - b).max()) <= 1.01 * scale  # one input-rounding step at most


def test_densify_failure_is_a_conversion_error() -> None:
    """A sparse file the runtime cannot run is refused with a ConversionError, not a crash."""
    model = read_model(SPARSE.read_bytes())
    sparse = next(t for t in model.subgraphs[0].tensors if t.sparsity is not None)
    sparse.type = schema().TensorType.INT32  # DENSIFY's input and output types now differ
    with pytest.raises(ConversionError, match="densify"):
        normalize_tflite(write_model(model))


def _with_external_buffer(data: bytes) -> bytes:
    """The same model with its largest constant stored after the flatbuffer (offset/size), as
    litert-quantizer writes bigger models."""
    model = read_model(data)
    sizes = [0 if b.data is None else len(b.data) for b in model.buffers]
    index = int(np.argmax(sizes))
    raw = np.asarray(model.buffers[index].data, dtype=np.uint8).tobytes()
    model.buffers[index].data = None
    model.buffers[index].offset, model.buffers[index].size = 2**40, len(raw)  # placeholder
    length = len(write_model(model))  # same layout whatever the (non-zero) offset value
    start = -(-length // BUFFER_ALIGNMENT) * BUFFER_ALIGNMENT
    model.buffers[index].offset = start
    packed = write_model(model)
    assert len(packed) == length
    return packed + b"\0" * (start - length) + raw


def test_constants_after_the_flatbuffer_are_kept() -> None:
    """Buffers stored after the flatbuffer are read in and written back inline: nothing lost."""
    plain, _ = normalize_tflite(DETECTOR.read_bytes())
    external = _with_external_buffer(plain)
    x = detector_scenes(4, seed=9)[0]
    for got, want in zip(all_outputs(external, x), all_outputs(plain, x), strict=True):
        np.testing.assert_array_equal(got, want)  # the runtime reads the external buffer too
    assert fingerprint(external) == fingerprint(plain)
    rewritten, _ = normalize_tflite(external)
    for got, want in zip(all_outputs(rewritten, x), all_outputs(plain, x), strict=True):
        np.testing.assert_array_equal(got, want)

"""Golden format v2: every input and output, per-output tolerance, the size cap, v1 still read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.golden import GoldenError, parse_golden
from agent.runtime import load_interpreter
from agent.selftest import load_golden, run_selftest
from tests.paths import TEST_DATA

DATA = TEST_DATA
TWO_HEAD = DATA / "two_head_fp32.tflite"
TWO_HEAD_GOLDEN = DATA / "two_head_fp32.golden.npz"


def _rewrite(source: Path, target: Path, **changes: object) -> Path:
    """A copy of a golden .npz with some arrays replaced (or removed with None)."""
    with np.load(source) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value  # type: ignore[assignment]
    np.savez(target, **arrays)  # type: ignore[arg-type]
    return target


@pytest.mark.agent
def test_selftest_checks_both_outputs_of_a_two_head_model() -> None:
    """The committed v2 golden: both outputs compared, each within its own tolerance."""
    result = run_selftest(TWO_HEAD, threads=1, timeout_s=120, golden=TWO_HEAD_GOLDEN)
    assert result.ok, result.reason
    assert "2 outputs" in result.detail and "output 1" in result.detail


@pytest.mark.agent
def test_a_wrong_second_output_fails_the_selftest(tmp_path: Path) -> None:
    """Output 0 matches, output 1 is off: refused, naming sample and output 1."""
    with np.load(TWO_HEAD_GOLDEN) as npz:
        second = npz["outputs_1"].copy()
    second[0] += 0.5
    golden = _rewrite(TWO_HEAD_GOLDEN, tmp_path / "g.npz", outputs_1=second)
    result = run_selftest(TWO_HEAD, threads=1, timeout_s=120, golden=golden)
    assert not result.ok
    assert result.reason.startswith("golden sample 0, output 1 '"), result.reason
    assert "max abs error 0.5" in result.reason


@pytest.mark.agent
def test_a_v1_golden_for_a_two_output_model_names_the_counts() -> None:
    """A one-output (v1) golden against the two-output model: a clear count mismatch."""
    interpreter = load_interpreter(TWO_HEAD, 1)
    with pytest.raises(GoldenError, match="carries 1 inputs and 1 outputs; the model has 1 inputs"):
        load_golden(DATA / "tiny_fp32.golden.npz", interpreter)


@pytest.mark.agent
def test_v2_file_lists_every_tensor_with_its_quantization() -> None:
    """Keys of the committed v2 file: counts, names, per-output atol and quantization."""
    golden = parse_golden(TWO_HEAD_GOLDEN)
    assert golden.version == 2 and len(golden.inputs) == 1 and len(golden.outputs) == 2
    assert all(a > 0 for a in golden.atol) and golden.stride == [1, 1]
    with np.load(TWO_HEAD_GOLDEN) as npz:
        assert {"input_quantization", "output_quantization", "output_quantization_1"} <= set(
            npz.files
        )


@pytest.mark.agent
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"outputs_1": None}, "golden file lacks outputs_1"),
        ({"atol_1": np.array(-1.0)}, "atol_1 must be finite and >= 0"),
        ({"golden_format": np.array(3)}, "golden format 3 is newer"),
        ({"output_stride": np.array([1])}, "does not fit 2 outputs"),
    ],
)
def test_malformed_v2_files_are_refused(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    """Each broken v2 field gives its own one-line reason."""
    golden = _rewrite(TWO_HEAD_GOLDEN, tmp_path / "g.npz", **changes)
    with pytest.raises(GoldenError, match=message):
        load_golden(golden, load_interpreter(TWO_HEAD, 1))


def _images(n: int) -> np.ndarray:
    """Seeded inputs of the two-head model."""
    return np.random.default_rng(3).random((n, 16, 16, 3), dtype=np.float32)


def test_writer_keeps_every_output_and_verifies(tmp_path: Path) -> None:
    """write_golden → both outputs stored; the host verify and the agent self-test agree."""
    from converters.golden import GOLDEN_SAMPLES, build_golden, verify_golden

    written = build_golden(TWO_HEAD, _images(6), tmp_path / "g.npz")
    assert written.path is not None and written.samples == GOLDEN_SAMPLES and not written.note
    golden = parse_golden(written.path)
    # The converter orders the outputs scores (output_1), then boxes (output_0).
    assert [o.shape for o in golden.outputs] == [(4, 64, 1), (4, 64, 4)]
    assert golden.output_names == ["output_1", "output_0"]
    assert verify_golden(TWO_HEAD, written.path) < 1e-5


def test_cap_takes_fewer_samples_first_then_strides_then_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size rule: fewer samples, then every k-th element of big outputs, else no golden."""
    import converters.golden as g

    full = g.build_golden(TWO_HEAD, _images(4), tmp_path / "full.npz", max_bytes=10**7)
    one = g.build_golden(TWO_HEAD, _images(4), tmp_path / "one.npz", max_bytes=full.size_bytes // 2)
    assert one.path is not None and one.samples < full.samples and "samples" in one.note
    assert one.size_bytes <= full.size_bytes // 2
    # Make the 256-element boxes output "big" so striding applies to it (not to the 64 scores).
    monkeypatch.setattr(g, "STRIDE_MIN_ELEMENTS", 100)
    single = g.build_golden(TWO_HEAD, _images(1), tmp_path / "s.npz", max_bytes=10**7)
    strided = g.build_golden(
        TWO_HEAD, _images(1), tmp_path / "st.npz", max_bytes=single.size_bytes - 300
    )
    assert strided.path is not None and strided.stride[0] == 1 and strided.stride[1] > 1
    assert "output 1 every" in strided.note
    assert g.verify_golden(TWO_HEAD, strided.path) < 1e-5
    result = run_selftest(TWO_HEAD, threads=1, timeout_s=120, golden=strided.path)
    assert result.ok, result.reason
    none = g.build_golden(TWO_HEAD, _images(1), tmp_path / "no.npz", max_bytes=1000)
    assert none.path is None and "no golden" in none.note and not (tmp_path / "no.npz").exists()


def test_cap_is_a_quarter_of_the_model_or_256_kib() -> None:
    """max(256 KiB, 25 % of the artifact)."""
    from converters.golden import golden_cap

    assert golden_cap(100_000) == 256 * 1024
    assert golden_cap(8_000_000) == 2_000_000

"""The child-process self-test: golden inputs, finiteness, tolerances, budgets, clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.runtime import load_interpreter
from agent.selftest import GoldenError, load_golden, run_selftest, tighter_budget
from tests.paths import TEST_DATA

pytestmark = pytest.mark.agent

DATA = TEST_DATA


def _selftest(model: str, golden: str | Path | None = None, **kw: float) -> object:
    """Run the real child-process self-test on a fixture."""
    path = golden if isinstance(golden, Path) else (DATA / golden if golden else None)
    return run_selftest(DATA / model, threads=1, timeout_s=120, golden=path, **kw)


def _rewrite(source: Path, target: Path, **changes: object) -> Path:
    """A copy of a golden .npz with some arrays replaced (or removed with None)."""
    with np.load(source) as npz:
        arrays = {k: npz[k] for k in npz.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value  # type: ignore[assignment]
    with target.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return target


@pytest.mark.parametrize("model", ["tiny_fp32", "tiny_int8"])
def test_golden_inputs_pass_within_tolerance(model: str) -> None:
    result = _selftest(f"{model}.tflite", f"{model}.golden.npz")
    assert result.ok, result.reason  # type: ignore[attr-defined]
    assert result.detail.startswith("golden: 4 samples, max abs error")  # type: ignore[attr-defined]
    assert result.latency_ms > 0 and result.peak_rss_mb > 0  # type: ignore[attr-defined]


def test_without_golden_the_detail_says_random_inputs() -> None:
    result = _selftest("tiny_fp32.tflite")
    assert result.ok  # type: ignore[attr-defined]
    assert "no golden inputs shipped" in result.detail  # type: ignore[attr-defined]


@pytest.mark.parametrize("golden", [None, "tiny_nan.golden.npz"])
def test_nan_outputs_fail(golden: str | None) -> None:
    result = _selftest("tiny_nan.tflite", golden)
    assert not result.ok  # type: ignore[attr-defined]
    assert "not finite (NaN or Inf)" in result.reason  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("model", "golden", "message"),
    [
        ("tiny_fp32.tflite", "tiny_int8.golden.npz", "golden inputs are int8 (4, 8, 8, 1)"),
        ("tiny_int8.tflite", "tiny_fp32.golden.npz", "the model's input is int8 (1, 8, 8, 1)"),
        ("tiny_nan.tflite", "tiny_fp32.golden.npz", "the golden was made for another model"),
    ],
)
def test_golden_of_another_model_is_a_clear_failure(model: str, golden: str, message: str) -> None:
    result = _selftest(model, golden)
    assert not result.ok and message in result.reason  # type: ignore[attr-defined]


def test_outputs_beyond_atol_fail(tmp_path: Path) -> None:
    with np.load(DATA / "tiny_fp32.golden.npz") as npz:
        outputs = npz["outputs"].copy()
    outputs[2, 3] += 1.0
    golden = _rewrite(DATA / "tiny_fp32.golden.npz", tmp_path / "g.npz", outputs=outputs)
    result = _selftest("tiny_fp32.tflite", golden)
    assert not result.ok  # type: ignore[attr-defined]
    assert result.reason.startswith("golden sample 2: max abs error 1")  # type: ignore[attr-defined]


def test_quantization_mismatch_is_named(tmp_path: Path) -> None:
    golden = _rewrite(
        DATA / "tiny_int8.golden.npz",
        tmp_path / "g.npz",
        input_quantization=np.array([0.5, 3.0]),
    )
    result = _selftest("tiny_int8.tflite", golden)
    assert not result.ok and "quantized with (scale, zero point)" in result.reason  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"atol": None}, "golden file lacks atol"),
        ({"atol": np.array(np.nan)}, "atol must be finite"),
        ({"outputs": np.zeros((3, 10), np.float32)}, "expected one row per sample"),
    ],
)
def test_malformed_golden_files_are_refused(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    golden = _rewrite(DATA / "tiny_fp32.golden.npz", tmp_path / "g.npz", **changes)
    interpreter = load_interpreter(DATA / "tiny_fp32.tflite", 1)
    with pytest.raises(GoldenError, match=message):
        load_golden(golden, interpreter)


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    golden = _rewrite(
        DATA / "tiny_fp32.golden.npz",
        tmp_path / "g.npz",
        inputs=np.array([{"evil": 1}], dtype=object),
    )
    interpreter = load_interpreter(DATA / "tiny_fp32.tflite", 1)
    with pytest.raises(GoldenError, match="refused"):
        load_golden(golden, interpreter)


def test_not_an_npz_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "g.npz"
    bogus.write_bytes(b"PK\x03\x04 not really a zip")
    interpreter = load_interpreter(DATA / "tiny_fp32.tflite", 1)
    with pytest.raises(GoldenError):
        load_golden(bogus, interpreter)


def test_latency_budget_is_applied() -> None:
    result = _selftest("tiny_fp32.tflite", "tiny_fp32.golden.npz", latency_budget_ms=1e-6)
    assert not result.ok and "over budget" in result.reason  # type: ignore[attr-defined]
    assert result.detail.startswith("golden:")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("budgets", "expected"),
    [((0.0, 0.0), 0.0), ((5.0, 0.0), 5.0), ((0.0, 7.0), 7.0), ((5.0, 2.0), 2.0)],
)
def test_tighter_budget_is_the_smallest_non_zero(
    budgets: tuple[float, float], expected: float
) -> None:
    assert tighter_budget(*budgets) == expected

"""Tests for agent.runtime: runtime choice, model loading errors, random inputs, run_once."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import runtime
from agent.runtime import ModelLoadError, load_interpreter, random_inputs, run_once, runtime_info
from tests.paths import REPO_ROOT, TEST_DATA

pytestmark = pytest.mark.agent

DATA = TEST_DATA
REPO = REPO_ROOT
INSTALLED = "ai-edge-litert" if importlib.util.find_spec("ai_edge_litert") else "tflite-runtime"


def _version_tuple(version: str) -> tuple[int, ...]:
    """'2.14.0' -> (2, 14, 0), ignoring any suffix."""
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


@pytest.fixture(autouse=True)
def fresh_runtime_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts and ends with no forced runtime and an empty runtime_info cache."""
    monkeypatch.delenv(runtime.RUNTIME_ENV_VAR, raising=False)
    runtime_info.cache_clear()
    yield
    runtime_info.cache_clear()


def _fake_runtime_module(name: str, version: str) -> types.ModuleType:
    """A stand-in for a runtime's interpreter module."""
    module = types.ModuleType(name)
    module.Interpreter = type("Interpreter", (), {})  # type: ignore[attr-defined]
    module.__version__ = version  # type: ignore[attr-defined]
    return module


# --- runtime choice ---------------------------------------------------------------------------


def test_runtime_info_reports_the_installed_runtime() -> None:
    """Each venv has exactly one runtime; runtime_info names it with its pip version."""
    info = runtime_info()
    assert info.name == INSTALLED
    assert info.version == importlib.metadata.version(INSTALLED)
    modules = {
        "ai-edge-litert": "ai_edge_litert.interpreter",
        "tflite-runtime": "tflite_runtime.interpreter",
    }
    assert info.module == modules[INSTALLED]
    assert runtime_info() is info  # cached


@pytest.mark.parametrize(
    ("forced", "dist", "module"),
    [
        ("litert", "ai-edge-litert", "ai_edge_litert"),
        ("tflite-runtime", "tflite-runtime", "tflite_runtime"),
        ("tflite_runtime", "tflite-runtime", "tflite_runtime"),
    ],
)
def test_forced_runtime_is_used_or_fails_clearly(
    monkeypatch: pytest.MonkeyPatch, forced: str, dist: str, module: str
) -> None:
    """A forced runtime is used when installed, else RuntimeError names the env var and pip."""
    monkeypatch.setenv(runtime.RUNTIME_ENV_VAR, forced)
    if importlib.util.find_spec(module):
        assert runtime_info().name == dist
    else:
        with pytest.raises(RuntimeError) as excinfo:
            runtime_info()
        assert runtime.RUNTIME_ENV_VAR in str(excinfo.value)
        assert f"pip install {dist}" in str(excinfo.value)


def test_unknown_forced_runtime_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in the env var is an error, not a silent fallback."""
    monkeypatch.setenv(runtime.RUNTIME_ENV_VAR, "tensorflow")
    with pytest.raises(RuntimeError, match="'litert' or 'tflite-runtime'"):
        runtime_info()


def test_litert_is_preferred_and_tflite_runtime_is_the_fallback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With both importable litert wins; forcing or removing litert selects tflite-runtime."""
    litert = _fake_runtime_module("ai_edge_litert.interpreter", "9.1.0")
    tflite = _fake_runtime_module("tflite_runtime.interpreter", "9.2.0")
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", litert)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", tflite)
    assert runtime_info().name == "ai-edge-litert"

    runtime_info.cache_clear()
    monkeypatch.setenv(runtime.RUNTIME_ENV_VAR, "tflite-runtime")
    assert runtime_info().module == "tflite_runtime.interpreter"

    runtime_info.cache_clear()
    monkeypatch.delenv(runtime.RUNTIME_ENV_VAR)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import -> ImportError
    info = runtime_info()
    assert (info.name, info.module) == ("tflite-runtime", "tflite_runtime.interpreter")


def test_no_runtime_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither runtime importable: RuntimeError tells how to install both."""
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(RuntimeError) as excinfo:
        runtime_info()
    message = str(excinfo.value)
    assert "pip install ai-edge-litert" in message
    assert "pip install tflite-runtime" in message


# --- loading ----------------------------------------------------------------------------------

# What each runtime itself says about each broken file (the message must carry it).
RUNTIME_TEXT = {
    "ai-edge-litert": {
        "garbage.tflite": "not a valid Flatbuffer buffer",
        "empty.tflite": "mmap of size 0",
        "truncated.tflite": "not a valid Flatbuffer buffer",
    },
    "tflite-runtime": {
        "garbage.tflite": "should be 'TFL3'",
        "empty.tflite": "Mmap of",
        # tflite-runtime 2.14 segfaults on this file; our bounds check speaks first.
        "truncated.tflite": "malformed TFLite flatbuffer",
    },
}


@pytest.mark.parametrize("name", ["garbage.tflite", "empty.tflite", "truncated.tflite"])
def test_broken_files_raise_model_load_error_with_runtime_text(name: str) -> None:
    """Garbage, empty and truncated files fail with ModelLoadError naming file and cause."""
    path = DATA / name
    with pytest.raises(ModelLoadError) as excinfo:
        load_interpreter(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: ")
    assert RUNTIME_TEXT[INSTALLED][name] in message
    if name == "empty.tflite":
        assert "(the file is empty)" in message


def test_missing_file_raises_model_load_error(tmp_path: Path) -> None:
    """A path that does not exist is a load error too, not an OSError."""
    with pytest.raises(ModelLoadError, match=r"missing\.tflite"):
        load_interpreter(tmp_path / "missing.tflite")


def test_truncations_never_crash_the_process() -> None:
    """Every truncation length (strided) gives ModelLoadError, never a segfault (subprocess)."""
    script = textwrap.dedent(
        """
        import sys, tempfile, pathlib
        from agent.runtime import ModelLoadError, load_interpreter
        tmp = pathlib.Path(tempfile.mkdtemp()) / "cut.tflite"
        for name in ("tiny_fp32.tflite", "tiny_int8.tflite"):
            data = (pathlib.Path(sys.argv[1]) / name).read_bytes()
            lengths = set(range(1, len(data), 23)) | set(range(len(data) - 48, len(data)))
            for n in sorted(lengths):
                tmp.write_bytes(data[:n])
                try:
                    load_interpreter(tmp)
                except ModelLoadError:
                    continue
                sys.exit(f"{name} cut to {n} bytes loaded")
        print("all rejected")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(DATA)],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"rc={done.returncode} stderr={done.stderr[-2000:]}"
    assert "all rejected" in done.stdout


@pytest.mark.skipif(
    INSTALLED != "tflite-runtime"
    or _version_tuple(importlib.metadata.version("tflite-runtime")) >= (2, 17),
    reason="needs tflite-runtime < 2.17 (no FULLY_CONNECTED v12 kernel)",
)
def test_tf221_dynamic_range_model_fails_on_old_tflite_runtime() -> None:
    """TF 2.21's dynamic-range int8 FULLY_CONNECTED v12 does not load on tflite-runtime 2.14."""
    with pytest.raises(ModelLoadError) as excinfo:
        load_interpreter(DATA / "tiny_dynamic_tf221.tflite")
    assert "FULLY_CONNECTED" in str(excinfo.value)
    assert "version '12'" in str(excinfo.value)


@pytest.mark.skipif(INSTALLED != "ai-edge-litert", reason="needs ai-edge-litert")
def test_tf221_dynamic_range_model_loads_on_litert() -> None:
    """The same file is fine on litert, so the failure above is about op versions."""
    interpreter = load_interpreter(DATA / "tiny_dynamic_tf221.tflite")
    (output,) = run_once(interpreter, random_inputs(interpreter))
    assert output.shape == (1, 10)


def test_num_threads_must_be_positive() -> None:
    """0 threads is a caller bug, reported before touching the runtime."""
    with pytest.raises(ValueError, match="num_threads"):
        load_interpreter(DATA / "tiny_fp32.tflite", num_threads=0)
    assert load_interpreter(DATA / "tiny_fp32.tflite", num_threads=2) is not None


# --- inputs and invoke ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("tiny_fp32.tflite", np.float32),
        ("tiny_int8.tflite", np.int8),
        ("tiny_uint8.tflite", np.uint8),
        ("tiny_int16x8.tflite", np.int16),
    ],
)
def test_random_inputs_match_model_and_run(name: str, dtype: type[np.generic]) -> None:
    """Inputs have the model's shape and dtype, are seeded, and run_once returns outputs."""
    interpreter = load_interpreter(DATA / name, num_threads=1)
    (array,) = random_inputs(interpreter, seed=3)
    assert array.dtype == dtype
    assert array.shape == (1, 8, 8, 1)
    assert np.array_equal(array, random_inputs(interpreter, seed=3)[0])
    assert not np.array_equal(array, random_inputs(interpreter, seed=4)[0])
    if np.issubdtype(dtype, np.integer):  # quantized inputs cover the whole range
        info = np.iinfo(array.dtype)
        assert array.min() < info.min + (int(info.max) - info.min) // 4
        assert array.max() > info.max - (int(info.max) - info.min) // 4
    (output,) = run_once(interpreter, [array])
    assert output.shape == (1, 10)
    assert output.dtype == dtype


def test_run_once_outputs_are_independent_copies() -> None:
    """An output returned earlier is not overwritten by the next invoke."""
    interpreter = load_interpreter(DATA / "tiny_fp32.tflite")
    first = run_once(interpreter, random_inputs(interpreter, seed=1))[0]
    kept = first.copy()
    second = run_once(interpreter, random_inputs(interpreter, seed=2))[0]
    assert np.array_equal(first, kept)
    assert not np.array_equal(first, second)


def test_run_once_checks_input_count() -> None:
    """Too few arrays is a ValueError, not a half-fed model."""
    interpreter = load_interpreter(DATA / "tiny_fp32.tflite")
    with pytest.raises(ValueError, match="1 inputs, got 0"):
        run_once(interpreter, [])


class _DetailsOnly:
    """An interpreter stand-in that only describes its inputs."""

    def __init__(self, details: list[dict[str, Any]]) -> None:
        """Keep the input details to report."""
        self.details = details

    def get_input_details(self) -> list[dict[str, Any]]:
        """The configured input details."""
        return self.details


def test_random_inputs_for_other_dtypes() -> None:
    """bool, int32/int64 (index-like, small), float16 and uint16 get sensible data."""
    specs = [(np.bool_, (2, 3)), (np.int32, (4,)), (np.int64, (1, 5)), (np.float16, (3,))]
    specs.append((np.uint16, (2, 2)))
    details = [
        {"name": f"in{i}", "index": i, "dtype": dtype, "shape": np.array(shape, dtype=np.int32)}
        for i, (dtype, shape) in enumerate(specs)
    ]
    arrays = random_inputs(_DetailsOnly(details))  # type: ignore[arg-type]
    for array, (dtype, shape) in zip(arrays, specs, strict=True):
        assert array.dtype == dtype
        assert array.shape == shape
    assert arrays[1].min() >= 0 and arrays[1].max() < 10
    assert arrays[2].min() >= 0 and arrays[2].max() < 10
    assert float(arrays[3].min()) >= -1.0 and float(arrays[3].max()) <= 1.0


def test_random_inputs_refuses_strings() -> None:
    """String inputs cannot be made up; say which input."""
    details = [{"name": "text", "index": 0, "dtype": np.object_, "shape": np.array([1])}]
    with pytest.raises(ValueError, match="'text'"):
        random_inputs(_DetailsOnly(details))  # type: ignore[arg-type]


# --- bounds check -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "tiny_fp32.tflite",
        "tiny_int8.tflite",
        "tiny_uint8.tflite",
        "tiny_int16x8.tflite",
        "tiny_dynamic_tf221.tflite",
    ],
)
def test_bounds_check_accepts_valid_models(name: str) -> None:
    """Real converter output passes the bounds check (no false alarms)."""
    assert runtime.flatbuffer_bounds_problem((DATA / name).read_bytes()) is None


def test_bounds_check_names_the_field_that_points_outside() -> None:
    """A cut file is reported with the first out-of-file field; foreign files go to the runtime."""
    data = (DATA / "tiny_fp32.tflite").read_bytes()
    problem = runtime.flatbuffer_bounds_problem(data[: len(data) // 2])
    assert problem is not None and "model." in problem and "outside" in problem
    assert runtime.flatbuffer_bounds_problem(data[:6]) is not None
    assert runtime.flatbuffer_bounds_problem(b"") is None
    assert runtime.flatbuffer_bounds_problem((DATA / "garbage.tflite").read_bytes()) is None

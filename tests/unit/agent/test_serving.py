"""Tests for agent.serving and agent.batching: errors, exclusive(), cache, batching, observer."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from agent.batching import InferenceDispatcher, ResultCache, input_digest
from agent.runtime import Interpreter, load_interpreter, random_inputs, run_once
from agent.serving import InferenceError, InferenceResult, ServingModel
from tests.serving_helpers import FP32, INT8, CountingObserver, batch_model, run_once_resized

pytestmark = pytest.mark.agent

SHA_FP32 = "f" * 64  # stand-in digests: ServingModel only uses the sha as a label
SHA_INT8 = "8" * 64


def serving_with(path: Path, sha: str) -> tuple[ServingModel, Interpreter]:
    """A ServingModel holding a freshly loaded `path`, and a separate reference interpreter."""
    serving = ServingModel()
    serving.swap(load_interpreter(path, 1), sha, 1.5)
    return serving, load_interpreter(path, 1)


@pytest.fixture(scope="module")
def dense_a(cache_dir: Path) -> Path:
    """Dynamic-batch model A."""
    return batch_model(cache_dir, seed=1)


@pytest.fixture(scope="module")
def dense_b(cache_dir: Path) -> Path:
    """Dynamic-batch model B: same signature as A, other weights."""
    return batch_model(cache_dir, seed=2)


# ------------------------------------------------------------------ ServingModel


def test_infer_matches_a_separate_interpreter_and_names_the_model() -> None:
    """Outputs equal a direct run of the same file; the result carries the sha256 given to swap."""
    serving, reference = serving_with(FP32, SHA_FP32)
    inputs = random_inputs(reference, seed=3)
    result = serving.infer(inputs)
    assert result.sha256 == SHA_FP32
    assert result.latency_ms > 0
    np.testing.assert_array_equal(result.outputs[0], run_once(reference, inputs)[0])
    assert serving.loaded and serving.sha256 == SHA_FP32 and serving.init_ms == 1.5
    assert serving.input_details()[0]["shape"].tolist() == [1, 8, 8, 1]
    assert serving.output_details()[0]["shape"].tolist() == [1, 10]


def test_no_model_loaded_is_a_clear_error() -> None:
    """Before swap and after clear, infer, details and exclusive() say no model is loaded."""
    serving = ServingModel()
    assert not serving.loaded and serving.sha256 is None and serving.init_ms is None
    for call in (
        lambda: serving.infer([np.zeros((1, 8, 8, 1), np.float32)]),
        serving.input_details,
        serving.output_details,
    ):
        with pytest.raises(InferenceError, match="no model loaded"):
            call()
    with pytest.raises(InferenceError, match="no model loaded"), serving.exclusive():
        pass
    serving.swap(load_interpreter(FP32, 1), SHA_FP32, 1.0)
    serving.clear()
    with pytest.raises(InferenceError, match="no model loaded"):
        serving.infer([np.zeros((1, 8, 8, 1), np.float32)])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([], r"model has 1 input\(s\), got 0 array\(s\)"),
        ([np.zeros((1, 8, 8, 1), np.float32)] * 2, r"model has 1 input\(s\), got 2 array\(s\)"),
        (
            [np.zeros((1, 8, 8, 1), np.float64)],
            r"input 0 \('serving_default_image:0'\): expected float32 \(1, 8, 8, 1\), "
            r"got float64 \(1, 8, 8, 1\)",
        ),
        (
            [np.zeros((2, 8, 8, 1), np.float32)],
            r"input 0 .*: expected float32 \(1, 8, 8, 1\), got float32 \(2, 8, 8, 1\)",
        ),
        ([[[0.0]]], r"input 0 .* must be a numpy array, got list"),
        (np.zeros((1, 8, 8, 1), np.float32), "must be a list of arrays"),
    ],
)
def test_bad_inputs_name_the_input_expected_and_got(inputs: list, message: str) -> None:
    """Wrong count, dtype or shape: InferenceError naming input index, expectation and value."""
    serving, _ = serving_with(FP32, SHA_FP32)
    with pytest.raises(InferenceError, match=message) as caught:
        serving.infer(inputs)
    if not isinstance(inputs, np.ndarray):
        assert caught.value.model_sha256 == SHA_FP32
    # The model keeps serving after a refused request.
    assert serving.infer([np.zeros((1, 8, 8, 1), np.float32)]).sha256 == SHA_FP32


def test_coerce_converts_json_numbers_without_changing_values() -> None:
    """coerce=True: whole numbers in range go to int8; fractions or out-of-range are refused."""
    serving, reference = serving_with(INT8, SHA_INT8)
    values = np.arange(-32, 32, dtype=np.int64).reshape(1, 8, 8, 1)
    result = serving.infer([values], coerce=True)
    expected = run_once(reference, [values.astype(np.int8)])[0]
    np.testing.assert_array_equal(result.outputs[0], expected)
    with pytest.raises(InferenceError, match=r"values must lie in \[-128, 127\] for int8"):
        serving.infer([values * 10], coerce=True)
    with pytest.raises(InferenceError, match="must hold whole numbers for int8"):
        serving.infer([values + 0.5], coerce=True)
    with pytest.raises(InferenceError, match="expected int8"):
        serving.infer([values])  # without coerce the dtype must match exactly


def test_exclusive_blocks_served_requests_until_released() -> None:
    """A request started while exclusive() is held runs only after it is released."""
    serving, reference = serving_with(FP32, SHA_FP32)
    inputs = random_inputs(reference, seed=1)
    finished: list[InferenceResult] = []
    worker = threading.Thread(target=lambda: finished.append(serving.infer(inputs)))
    with serving.exclusive() as (interpreter, sha):
        assert sha == SHA_FP32
        worker.start()
        # The benchmark owns the interpreter: run it here while the request must wait.
        run_once(interpreter, inputs)
        worker.join(0.5)
        assert worker.is_alive(), "a served request ran while exclusive() was held"
        assert not finished
    worker.join(10)
    assert len(finished) == 1
    np.testing.assert_array_equal(finished[0].outputs[0], run_once(reference, inputs)[0])


def test_swap_waits_for_exclusive_and_then_serves_the_new_model() -> None:
    """swap() cannot happen in the middle of an exclusive() block; afterwards the new model runs."""
    serving, _ = serving_with(FP32, SHA_FP32)
    new_interpreter = load_interpreter(INT8, 1)
    swapper = threading.Thread(target=serving.swap, args=(new_interpreter, SHA_INT8, 2.0))
    with serving.exclusive() as (_, sha):
        swapper.start()
        swapper.join(0.5)
        assert swapper.is_alive() and serving.sha256 == SHA_FP32 == sha
    swapper.join(10)
    assert serving.sha256 == SHA_INT8 and serving.init_ms == 2.0
    result = serving.infer([np.zeros((1, 8, 8, 1), np.int8)])
    assert result.sha256 == SHA_INT8 and result.outputs[0].dtype == np.int8


def test_fixed_batch_model_runs_batches_one_by_one() -> None:
    """infer_batch on a fixed-batch model: one invoke per request, each equal to a single run."""
    serving, reference = serving_with(FP32, SHA_FP32)
    assert not serving.batchable
    requests = [random_inputs(reference, seed=i) for i in range(3)]
    requests.append([np.zeros((1, 8, 8, 1), np.int8)])
    results, invocations = serving.infer_batch(requests)
    assert invocations == [1, 1, 1]
    for request, result in zip(requests[:3], results[:3], strict=True):
        assert not isinstance(result, InferenceError)
        np.testing.assert_array_equal(result.outputs[0], run_once(reference, request)[0])
    assert isinstance(results[3], InferenceError) and "expected float32" in str(results[3])


# ------------------------------------------------------------------ micro-batching


def test_batch_merges_compatible_requests_and_splits_outputs_exactly(dense_a: Path) -> None:
    """Requests of 1, 3 and 2 rows run in one invoke; outputs equal unbatched runs bit for bit."""
    serving, reference = serving_with(dense_a, SHA_FP32)
    assert serving.batchable
    rng = np.random.default_rng(7)
    requests = [[rng.standard_normal((rows, 16)).astype(np.float32)] for rows in (1, 3, 2)]
    requests.append([np.zeros((1, 16), np.float64)])  # wrong dtype: refused, not merged
    requests.append([np.zeros((1, 15), np.float32)])  # wrong feature size: refused
    results, invocations = serving.infer_batch(requests)
    assert invocations == [3]
    for request, result in zip(requests[:3], results[:3], strict=True):
        assert not isinstance(result, InferenceError)
        unbatched = run_once_resized(reference, request[0])
        assert result.outputs[0].shape == (request[0].shape[0], 4)
        np.testing.assert_array_equal(result.outputs[0], unbatched)
    assert "expected float32 (N, 16), got float64 (1, 16)" in str(results[3])
    assert "expected float32 (N, 16), got float32 (1, 15)" in str(results[4])
    # Back to a single request of one row: the interpreter is resized down again.
    single = requests[0][0]
    np.testing.assert_array_equal(serving.infer([single]).outputs[0], results[0].outputs[0])


def test_smaller_batch_is_padded_when_resizing_costs_more(dense_a: Path) -> None:
    """With a resize estimated dearer than padding, a 1-row request runs padded to the 3-row
    allocation (no resize) and still gets exactly its unbatched outputs; cheap resizes resize."""
    serving, reference = serving_with(dense_a, SHA_FP32)
    rng = np.random.default_rng(17)
    three = rng.standard_normal((3, 16)).astype(np.float32)
    one = rng.standard_normal((1, 16)).astype(np.float32)
    serving.infer([three])  # allocates 3 rows and measures a resize and a per-row time
    active = serving._active
    assert active is not None and active.current_shapes == [(3, 16)]
    assert active.resize_ms > 0 and active.row_ms > 0
    active.resize_ms = 1e9  # as on tflite-runtime 2.14, where an MLP resize takes ~7 ms
    result = serving.infer([one])
    assert active.current_shapes == [(3, 16)], "resized although padding was cheaper"
    assert result.outputs[0].shape == (1, 4)
    np.testing.assert_array_equal(result.outputs[0], run_once_resized(reference, one))
    active.resize_ms = 1e-9  # resizing is now the cheap option
    np.testing.assert_array_equal(serving.infer([one]).outputs[0], result.outputs[0])
    assert active.current_shapes == [(1, 16)]


def test_dispatcher_batches_concurrent_requests(dense_a: Path) -> None:
    """Eight threads at once, a wide window: merged invokes, every answer right, all observed."""
    serving, reference = serving_with(dense_a, SHA_FP32)
    observer = CountingObserver()
    # 200 ms: far longer than it takes eight started threads to queue, so they share batches.
    dispatcher = InferenceDispatcher(serving, batch_window_ms=200, max_batch=8, observer=observer)
    dispatcher.start()
    rng = np.random.default_rng(11)
    inputs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(8)]
    answers: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(8)

    def client(i: int) -> None:
        """Wait for the others, then send one request."""
        barrier.wait()
        answers[i] = dispatcher.serve([inputs[i]]).outputs[0]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        dispatcher.stop()
    assert sorted(answers) == list(range(8))
    for i, array in enumerate(inputs):
        np.testing.assert_array_equal(answers[i], run_once_resized(reference, array))
    assert observer.requests == 8 and observer.errors == 0
    assert sum(observer.batch_sizes) == 8
    assert max(observer.batch_sizes) > 1, f"no request was merged: {observer.batch_sizes}"


def test_dispatcher_passes_fixed_batch_models_through_without_waiting() -> None:
    """With batching on, a fixed-batch model is served directly: one invoke per request."""
    serving, reference = serving_with(FP32, SHA_FP32)
    observer = CountingObserver()
    # A 10 s window would make every request wait 10 s if it were not bypassed.
    dispatcher = InferenceDispatcher(serving, batch_window_ms=10_000, observer=observer)
    dispatcher.start()
    try:
        inputs = random_inputs(reference, seed=4)
        result = dispatcher.serve(inputs)
    finally:
        dispatcher.stop()
    np.testing.assert_array_equal(result.outputs[0], run_once(reference, inputs)[0])
    assert result.latency_ms < 5_000
    assert observer.batch_sizes == [1] and observer.requests == 1


# ------------------------------------------------------------------ result cache


def test_input_digest_covers_dtype_shape_and_bytes() -> None:
    """Same bytes under another shape or dtype, or another order of inputs, give another digest."""
    a = np.arange(8, dtype=np.int8)
    digests = {
        input_digest([a]),
        input_digest([a.reshape(2, 4)]),
        input_digest([a.view(np.uint8)]),
        input_digest([a, a[::-1].copy()]),
        input_digest([a[::-1].copy(), a]),
    }
    assert len(digests) == 5
    assert input_digest([a.reshape(2, 4)]) == input_digest(
        [np.arange(8, dtype=np.int8).reshape(2, 4)]
    )
    assert input_digest([a[::2]]) == input_digest([np.ascontiguousarray(a[::2])])


def test_result_cache_evicts_the_least_recently_used() -> None:
    """Capacity 2: touching `a` then adding `c` evicts `b`."""
    cache = ResultCache(2)
    out = {k: [np.full(2, i)] for i, k in enumerate("abc")}
    cache.put("m", b"a", out["a"])
    cache.put("m", b"b", out["b"])
    assert cache.get("m", b"a") is out["a"]
    cache.put("m", b"c", out["c"])
    assert len(cache) == 2
    assert cache.get("m", b"b") is None
    assert cache.get("m", b"a") is out["a"] and cache.get("m", b"c") is out["c"]
    assert cache.get("other-model", b"a") is None
    assert not out["a"][0].flags.writeable  # shared between hits, so frozen
    with pytest.raises(ValueError, match="at least 1 entry"):
        ResultCache(0)


def test_cache_hits_are_observed_and_a_swap_invalidates_them() -> None:
    """Second identical request hits; after a swap the same input is computed by the new model."""
    serving, reference = serving_with(FP32, SHA_FP32)
    observer = CountingObserver()
    dispatcher = InferenceDispatcher(serving, result_cache_entries=4, observer=observer)
    inputs = random_inputs(reference, seed=5)
    first = dispatcher.serve(inputs)
    second = dispatcher.serve([inputs[0].copy()])
    assert (first.cache_hit, second.cache_hit) == (False, True)
    np.testing.assert_array_equal(second.outputs[0], run_once(reference, inputs)[0])
    assert observer.requests == 2 and observer.cache_hits == 1
    assert observer.batch_sizes == [1]  # the hit did not invoke

    other = load_interpreter(FP32, 1)
    serving.swap(other, "e" * 64, 1.0)  # same file, other sha: the cache must not answer
    third = dispatcher.serve(inputs)
    assert not third.cache_hit and third.sha256 == "e" * 64
    assert observer.batch_sizes == [1, 1]


def test_errors_are_observed_and_not_cached() -> None:
    """A refused request counts as an error, not as a request, and is refused again next time."""
    serving, _ = serving_with(FP32, SHA_FP32)
    observer = CountingObserver()
    dispatcher = InferenceDispatcher(serving, result_cache_entries=4, observer=observer)
    bad = [np.zeros((1, 8, 8, 1), np.float64)]
    for _ in range(2):
        with pytest.raises(InferenceError, match="expected float32"):
            dispatcher.serve(bad)
    assert observer.errors == 2 and observer.requests == 0 and observer.batch_sizes == []


def test_batcher_answers_every_request_across_swaps(dense_a: Path, dense_b: Path) -> None:
    """Concurrent batched requests while A and B alternate: each answer is exactly its model's."""
    serving, ref_a = serving_with(dense_a, "a" * 64)
    ref_b = load_interpreter(dense_b, 1)
    observer = CountingObserver()
    dispatcher = InferenceDispatcher(serving, batch_window_ms=1, max_batch=8, observer=observer)
    dispatcher.start()
    rng = np.random.default_rng(13)
    inputs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(4 * 50)]
    answers: list[tuple[int, str, np.ndarray]] = []
    done = threading.Event()

    def client(offset: int) -> None:
        """Send 50 requests."""
        for i in range(offset, offset + 50):
            result = dispatcher.serve([inputs[i]])
            answers.append((i, result.sha256, result.outputs[0]))

    def swapper() -> None:
        """Swap A and B (freshly loaded each time) until the clients are done."""
        paths = {"a" * 64: dense_a, "b" * 64: dense_b}
        while not done.is_set():
            sha = "b" * 64 if serving.sha256 == "a" * 64 else "a" * 64
            serving.swap(load_interpreter(paths[sha], 1), sha, 1.0)

    swap_thread = threading.Thread(target=swapper)
    clients = [threading.Thread(target=client, args=(k * 50,)) for k in range(4)]
    swap_thread.start()
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(60)
    done.set()
    swap_thread.join(10)
    dispatcher.stop()
    assert len(answers) == 200 and observer.requests == 200 and observer.errors == 0
    seen = Counter(sha for _, sha, _ in answers)
    for i, sha, output in answers:
        reference = ref_a if sha == "a" * 64 else ref_b
        np.testing.assert_array_equal(output, run_once_resized(reference, inputs[i]))
    assert set(seen) == {"a" * 64, "b" * 64}, f"swaps did not interleave with requests: {seen}"

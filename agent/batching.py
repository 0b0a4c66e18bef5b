"""Request dispatch for the inference service: result cache, dynamic micro-batching, observer calls.

Both transports (Unix socket and HTTP) hand every decoded request to one `InferenceDispatcher`,
so caching, batching and the per-request metrics behave the same whichever way a request came.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from agent.serving import InferenceError, InferenceObserver, InferenceResult, ServingModel

# How long stop() waits for the batch worker to finish the batch in progress before giving up;
# a batch is one invoke, which for any model the agent serves takes far less than this.
_WORKER_JOIN_TIMEOUT_S = 10.0


class ServedResult(NamedTuple):
    """What a transport sends back: outputs, the model that made them, latency, cache hit."""

    outputs: list[np.ndarray]
    sha256: str
    latency_ms: float
    cache_hit: bool


def input_digest(inputs: Sequence[np.ndarray]) -> bytes:
    """sha256 over every input's dtype, shape and bytes, in order (the cache key's input part)."""
    digest = hashlib.sha256()
    digest.update(len(inputs).to_bytes(4, "little"))
    for array in inputs:
        array = np.ascontiguousarray(array)
        # dtype.str includes byte order; the shape is fixed-width so no two inputs collide.
        header = f"{array.dtype.str}|{','.join(str(d) for d in array.shape)}|"
        digest.update(header.encode())
        digest.update(array.reshape(-1).view(np.uint8).data)
    return digest.digest()


class ResultCache:
    """Bounded LRU of outputs keyed by (model sha256, input digest); thread-safe.

    The model's sha256 is part of the key, so a swap invalidates every entry without any
    bookkeeping: entries of the old model are never looked up again and age out.
    """

    def __init__(self, entries: int) -> None:
        """An empty cache holding at most `entries` results."""
        if entries < 1:
            raise ValueError(f"result cache needs at least 1 entry, got {entries}")
        self.capacity = entries
        self._entries: OrderedDict[tuple[str, bytes], list[np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Number of cached results."""
        return len(self._entries)

    def get(self, sha256: str, digest: bytes) -> list[np.ndarray] | None:
        """Cached outputs for this model and input, marking them most recently used."""
        key = (sha256, digest)
        with self._lock:
            outputs = self._entries.get(key)
            if outputs is not None:
                self._entries.move_to_end(key)
            return outputs

    def put(self, sha256: str, digest: bytes, outputs: list[np.ndarray]) -> None:
        """Store outputs (made read-only: hits share them), evicting the least recently used."""
        # Batched outputs are views of the whole merged output: copy, so an entry pins only
        # its own rows.
        if any(a.base is not None for a in outputs):
            outputs = [a.copy() if a.base is not None else a for a in outputs]
        for array in outputs:
            array.setflags(write=False)
        key = (sha256, digest)
        with self._lock:
            self._entries[key] = outputs
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)


class _Pending:
    """One request waiting in the batch queue, and the slot its answer comes back in."""

    __slots__ = ("coerce", "done", "inputs", "result")

    def __init__(self, inputs: Sequence[np.ndarray], coerce: bool) -> None:
        """Queue `inputs`; `result` is filled and `done` set by the worker."""
        self.inputs = inputs
        self.coerce = coerce
        self.done = threading.Event()
        self.result: InferenceResult | InferenceError | None = None


class MicroBatcher:
    """Collects requests for up to `window_ms` (at most `max_batch`) and runs them in one invoke.

    Only for batchable models (free axis 0 on every input); `ServingModel.infer_batch` merges
    compatible requests and runs the rest one by one, so a batch may take several invokes.
    """

    def __init__(
        self,
        serving: ServingModel,
        window_ms: float,
        max_batch: int,
        on_invocation: Callable[[int], None],
    ) -> None:
        """Configure; call start() before submit()."""
        if window_ms <= 0 or max_batch < 1:
            raise ValueError(f"need window_ms > 0 and max_batch >= 1, got {window_ms}, {max_batch}")
        self.serving = serving
        self.window_s = window_ms / 1000.0
        self.max_batch = max_batch
        self._on_invocation = on_invocation
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Makes "not stopping, so enqueue" atomic with stop()'s "stopping, then the sentinel",
        # so no request is queued behind the sentinel and waits forever.
        self._gate = threading.Lock()

    def start(self) -> None:
        """Start the worker thread."""
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="inference-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish queued requests, then stop the worker; later submits fail clearly."""
        with self._gate:
            self._stopping = True
            self._queue.put(None)
        if self._thread is not None:
            self._thread.join(_WORKER_JOIN_TIMEOUT_S)
            self._thread = None

    def submit(self, inputs: Sequence[np.ndarray], coerce: bool = False) -> InferenceResult:
        """Queue one request and wait for its result; InferenceError when it failed."""
        pending = _Pending(inputs, coerce)
        with self._gate:
            if self._stopping or self._thread is None:
                raise InferenceError("the inference service is stopping")
            self._queue.put(pending)
        pending.done.wait()
        result = pending.result
        if isinstance(result, InferenceError):
            raise result
        assert result is not None  # the worker sets result before done
        return result

    def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """The first request plus whatever arrives within the window; True when told to stop."""
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:  # the stop sentinel: run what we have, then stop
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        """Worker: take a batch, run it, hand every request its result; never dies."""
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            try:
                results, invocations = self.serving.infer_batch(
                    [p.inputs for p in batch], [p.coerce for p in batch]
                )
            except Exception as exc:  # a bug must not strand the waiting connections
                error = InferenceError(f"inference failed: {exc}")
                results, invocations = [error] * len(batch), []
            for size in invocations:
                self._on_invocation(size)
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
                pending.done.set()
        self._fail_queued()

    def _fail_queued(self) -> None:
        """Answer requests still queued after stop with an error instead of leaving them hanging."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.result = InferenceError("the inference service is stopping")
                item.done.set()


class _NullObserver:
    """Observer that records nothing (the service runs without metrics)."""

    def observe_request(self, latency_ms: float, *, cache_hit: bool = False) -> None:
        """Ignore."""

    def observe_invocation(self, batch_size: int) -> None:
        """Ignore."""

    def observe_error(self) -> None:
        """Ignore."""


class InferenceDispatcher:
    """Serves decoded requests: cache lookup, then batched or direct inference, observed."""

    def __init__(
        self,
        serving: ServingModel,
        *,
        batch_window_ms: float = 0.0,
        max_batch: int = 8,
        result_cache_entries: int = 0,
        observer: InferenceObserver | None = None,
    ) -> None:
        """Configure; batching is on when batch_window_ms > 0, the cache when entries > 0."""
        if batch_window_ms < 0 or max_batch < 1 or result_cache_entries < 0:
            raise ValueError(
                "need batch_window_ms >= 0, max_batch >= 1, result_cache_entries >= 0; got "
                f"{batch_window_ms}, {max_batch}, {result_cache_entries}"
            )
        self.serving = serving
        self.observer: InferenceObserver = observer or _NullObserver()
        self.cache = ResultCache(result_cache_entries) if result_cache_entries else None
        self.batcher = (
            MicroBatcher(serving, batch_window_ms, max_batch, self.observer.observe_invocation)
            if batch_window_ms > 0
            else None
        )

    def start(self) -> None:
        """Start the batch worker, if batching is on."""
        if self.batcher is not None:
            self.batcher.start()

    def stop(self) -> None:
        """Stop the batch worker; queued requests are answered first."""
        if self.batcher is not None:
            self.batcher.stop()

    def serve(
        self,
        inputs: Sequence[np.ndarray],
        started_ns: int | None = None,
        *,
        coerce: bool = False,
    ) -> ServedResult:
        """Answer one request; `started_ns` (perf_counter_ns) is when the transport received it.

        Observes exactly one request (with its end-to-end latency) or one error. `coerce`
        converts dtypes to the model's (HTTP's JSON numbers; see ServingModel.infer).
        """
        start = time.perf_counter_ns() if started_ns is None else started_ns
        try:
            digest = None
            if self.cache is not None:
                sha = self.serving.sha256
                if sha is not None:
                    digest = input_digest(inputs)
                    cached = self.cache.get(sha, digest)
                    if cached is not None:
                        return self._observed(cached, sha, start, cache_hit=True)
            if self.batcher is not None and self.serving.batchable:
                result = self.batcher.submit(inputs, coerce)
            else:
                # Batching off, or a fixed-batch model: nothing to merge, so no window to wait.
                result = self.serving.infer(inputs, coerce=coerce)
                self.observer.observe_invocation(1)
            if self.cache is not None and digest is not None:
                self.cache.put(result.sha256, digest, result.outputs)
            return self._observed(result.outputs, result.sha256, start, cache_hit=False)
        except InferenceError:
            self.observer.observe_error()
            raise

    def error(self) -> None:
        """Observe a request that failed before it reached serve() (bad frame, oversized)."""
        self.observer.observe_error()

    def _observed(
        self, outputs: list[np.ndarray], sha256: str, start_ns: int, *, cache_hit: bool
    ) -> ServedResult:
        """The result with its end-to-end latency, reported to the observer."""
        latency_ms = (time.perf_counter_ns() - start_ns) / 1e6
        self.observer.observe_request(latency_ms, cache_hit=cache_hit)
        return ServedResult(outputs, sha256, latency_ms, cache_hit)

"""The active model as a service: one thread-safe holder of the interpreter that requests run on.

TFLite interpreters are not thread-safe, so every invoke (served request, micro-batch or the
daemon's benchmark via `exclusive()`) holds one lock, and outputs are copied out before it is
released. `swap()` takes the same lock, so a request runs wholly on the old or wholly on the new
model, and once `swap()` returns nothing runs on the old interpreter any more.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np

from agent.failpoint import InjectedLatency
from agent.runtime import Interpreter


class InferenceError(Exception):
    """A request the service cannot answer (no model, bad inputs, runtime failure); says why.

    `model_sha256` names the model that refused the request, when one was loaded, so a client
    can tell a refusal by the new model after a swap from a mistake of its own.
    """

    def __init__(self, message: str, *, model_sha256: str | None = None) -> None:
        """Keep the message and the refusing model's sha256."""
        super().__init__(message)
        self.model_sha256 = model_sha256


class InferenceObserver(Protocol):
    """What the inference service reports per request and per invoke (agent/metrics.py)."""

    def observe_request(self, latency_ms: float, *, cache_hit: bool = False) -> None:
        """One served request and its end-to-end service latency, queueing included."""

    def observe_invocation(self, batch_size: int) -> None:
        """One interpreter invoke that served `batch_size` requests."""

    def observe_error(self) -> None:
        """One request answered with an error."""


class InferenceResult(NamedTuple):
    """Outputs of one request, the sha256 of the model that computed them, and the latency."""

    outputs: list[np.ndarray]
    sha256: str
    latency_ms: float


@dataclass(frozen=True)
class _TensorSpec:
    """One input or output: tensor index, name, dtype and shapes, read once at swap time."""

    index: int
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    signature: tuple[int, ...]  # shape_signature: -1 marks a dimension the caller may choose
    detail: dict[str, Any]

    @classmethod
    def from_detail(cls, detail: dict[str, Any]) -> _TensorSpec:
        """Build from an interpreter's input/output detail dict."""
        shape = tuple(int(d) for d in detail["shape"])
        signature = detail.get("shape_signature")
        sig = tuple(int(d) for d in signature) if signature is not None else shape
        if len(sig) != len(shape):  # unranked tensors report an empty signature
            sig = shape
        return cls(
            int(detail["index"]), str(detail["name"]), np.dtype(detail["dtype"]), shape, sig, detail
        )

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """Whether `shape` fits: same rank, every fixed dimension equal, free ones >= 1."""
        if len(shape) != len(self.signature):
            return False
        return all(
            (want == -1 and got >= 1) or want == got
            for want, got in zip(self.signature, shape, strict=True)
        )

    def expected(self) -> str:
        """The dtype and shape this input takes, as an error message shows them (-1 = any)."""
        dims = ", ".join("N" if d == -1 else str(d) for d in self.signature)
        trailing = "," if len(self.signature) == 1 else ""
        return f"{self.dtype.name} ({dims}{trailing})"


@dataclass
class _ActiveModel:
    """The loaded interpreter with its sha256, load time and cached tensor specs."""

    interpreter: Interpreter
    sha256: str
    init_ms: float
    inputs: tuple[_TensorSpec, ...]
    outputs: tuple[_TensorSpec, ...]
    batchable: bool  # every input's axis 0 is free: requests can be stacked along it
    current_shapes: list[tuple[int, ...]]  # input shapes the interpreter is allocated for
    resize_ms: float = 0.0  # running estimate of one resize + allocate_tensors (0 = unknown)
    row_ms: float = 0.0  # running estimate of invoke time per batch row
    delay_s: float = 0.0  # injected slowdown per invoke (tests: EDGEFLEET_INJECT_LATENCY_MS)


def _describe(array: np.ndarray) -> str:
    """An array's dtype and shape, as error messages show them."""
    return f"{array.dtype.name} {tuple(array.shape)}"


def _coerce(spec: _TensorSpec, position: int, value: np.ndarray, sha256: str) -> np.ndarray:
    """Convert parsed numbers to the input's dtype when no value changes (floats may round)."""
    target = spec.dtype
    problem = None
    if value.dtype.kind not in "biuf":
        problem = f"must hold numbers, got {value.dtype.name} values"
    elif target.kind == "f":
        return value.astype(target)
    elif target.kind in "iu":
        if value.dtype.kind == "f" and not (
            np.all(np.isfinite(value)) and np.all(value == np.round(value))
        ):
            problem = f"must hold whole numbers for {target.name}"
        else:
            info = np.iinfo(target)
            if value.size and (value.min() < info.min or value.max() > info.max):
                problem = f"values must lie in [{info.min}, {info.max}] for {target.name}"
    elif target.kind == "b" and value.size and not np.all((value == 0) | (value == 1)):
        problem = "must hold booleans (0/1) for bool"
    if problem is not None:
        raise InferenceError(f"input {position} ({spec.name!r}) {problem}", model_sha256=sha256)
    return value.astype(target)


# Weight of the newest sample in the running estimates of resize and per-row invoke time: adapts
# within a few batches when load changes, yet one outlier moves the estimate only part way.
_ESTIMATE_WEIGHT = 0.25


def _running_mean(previous: float, started_ns: int, divisor: int = 1) -> float:
    """Update a running estimate (ms) with the time since started_ns, divided by divisor."""
    sample = (time.perf_counter_ns() - started_ns) / 1e6 / divisor
    if previous <= 0:
        return sample
    return previous + _ESTIMATE_WEIGHT * (sample - previous)


def _padding_target(active: _ActiveModel, shapes: list[tuple[int, ...]]) -> int | None:
    """Rows to pad a smaller batch up to, when that is cheaper than resizing; else None.

    A resize + allocate_tensors costs from 8 µs (litert, MLP) to 7 ms (tflite-runtime 2.14
    re-packs an MLP's weights for XNNPACK on every resize). Padding costs the invoke time of
    the padded rows. So a batch smaller than the allocation is padded up to it when the
    estimated padding cost is below the measured resize cost, and the allocation is kept.
    """
    if not active.batchable or active.resize_ms <= 0 or active.row_ms <= 0:
        return None
    current = active.current_shapes
    rows = {shape[0] for shape in shapes}
    allocated = {shape[0] for shape in current}
    if len(rows) != 1 or len(allocated) != 1 or len(current) != len(shapes):
        return None
    n, m = rows.pop(), allocated.pop()
    if m <= n or any(a[1:] != b[1:] for a, b in zip(current, shapes, strict=True)):
        return None
    return m if (m - n) * active.row_ms < active.resize_ms else None


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """The array with zero rows appended along axis 0 up to `rows`."""
    padding = np.zeros((rows - array.shape[0], *array.shape[1:]), dtype=array.dtype)
    return np.concatenate([array, padding], axis=0)


class ServingModel:
    """Thread-safe holder of the active interpreter: swap, infer, and exclusive benchmark access."""

    def __init__(self, injected: InjectedLatency | None = None) -> None:
        """Start with no model loaded; `injected` slows matching models' invokes (tests)."""
        self._lock = threading.Lock()
        self._active: _ActiveModel | None = None
        self._injected = injected

    # ------------------------------------------------------------------ model lifecycle

    def swap(
        self,
        interpreter: Interpreter,
        sha256: str,
        init_ms: float,
        before_switch: Callable[[], object] | None = None,
    ) -> None:
        """Make an already loaded and allocated interpreter the active model, atomically.

        Waits for the request (or benchmark) in progress; when it returns, no request runs on
        the previous interpreter any more, so the caller may drop it. `before_switch` runs under
        the lock just before the switch (the agent closes the old model's telemetry interval).
        """
        inputs = tuple(_TensorSpec.from_detail(d) for d in interpreter.get_input_details())
        outputs = tuple(_TensorSpec.from_detail(d) for d in interpreter.get_output_details())
        batchable = bool(inputs) and all(s.signature and s.signature[0] == -1 for s in inputs)
        active = _ActiveModel(
            interpreter,
            sha256,
            float(init_ms),
            inputs,
            outputs,
            batchable,
            [spec.shape for spec in inputs],
        )
        if self._injected is not None:
            active.delay_s = self._injected.delay_s(sha256)
        with self._lock:
            if before_switch is not None:
                # Under the lock: no request of the old model can complete after it (the
                # telemetry interval of the old model closes here).
                before_switch()
            self._active = active

    def clear(self) -> None:
        """Unload the model (waiting for the request in progress); requests then fail clearly."""
        with self._lock:
            self._active = None

    @property
    def loaded(self) -> bool:
        """Whether a model is active."""
        return self._active is not None

    @property
    def sha256(self) -> str | None:
        """sha256 of the active model, None when none is loaded."""
        active = self._active
        return active.sha256 if active else None

    @property
    def init_ms(self) -> float | None:
        """How long loading the active model took (as the caller measured it), or None."""
        active = self._active
        return active.init_ms if active else None

    @property
    def batchable(self) -> bool:
        """Whether the active model takes a free batch dimension (axis 0) on every input."""
        active = self._active
        return bool(active and active.batchable)

    def input_details(self) -> list[dict[str, Any]]:
        """The active model's input details as loaded (shape_signature shows free dims)."""
        return [dict(s.detail) for s in self._require().inputs]

    def output_details(self) -> list[dict[str, Any]]:
        """The active model's output details as loaded."""
        return [dict(s.detail) for s in self._require().outputs]

    def _require(self) -> _ActiveModel:
        """The active model, or InferenceError when none is loaded."""
        active = self._active
        if active is None:
            raise InferenceError("no model loaded: the agent has no active model yet")
        return active

    @contextmanager
    def exclusive(self) -> Iterator[tuple[Interpreter, str]]:
        """Hold the invoke lock and yield (interpreter, sha256), e.g. for a benchmark run.

        Served requests wait meanwhile, so they never interleave with the benchmark on the
        interpreter. Input shapes the caller sets are restored afterwards for resizable models
        by the next request (it resizes when its shapes differ from the recorded ones).
        """
        with self._lock:
            active = self._require()
            try:
                yield active.interpreter, active.sha256
            finally:
                # The caller may have resized inputs; forget what we think is allocated.
                active.current_shapes = [(-1,)] * len(active.inputs)

    # ------------------------------------------------------------------ inference

    def infer(self, inputs: Sequence[np.ndarray], *, coerce: bool = False) -> InferenceResult:
        """Run one request on the active model and return copies of its outputs.

        Input dtypes must match exactly, unless `coerce`: then values (e.g. parsed from JSON
        as float64/int64) are converted to the model's dtype when that loses nothing but float
        precision (integers must be whole and in range), under the same lock as the run, so a
        swap to a model with other dtypes cannot slip in between.
        """
        start = time.perf_counter_ns()
        with self._lock:
            active = self._require()
            arrays = self._check(active, inputs, coerce)
            outputs = self._invoke(active, arrays)
        latency_ms = (time.perf_counter_ns() - start) / 1e6
        return InferenceResult(outputs, active.sha256, latency_ms)

    def infer_batch(
        self,
        requests: Sequence[Sequence[np.ndarray]],
        coerce: Sequence[bool] | None = None,
    ) -> tuple[list[InferenceResult | InferenceError], list[int]]:
        """Run several requests, merging compatible ones along axis 0 into one invoke each.

        Returns one result or error per request (in order) and the number of requests each
        invoke served. Requests merge only when the model is batchable and their dtypes and
        non-batch dimensions agree; a fixed-batch model runs them one by one (pass-through).
        `coerce[i]` converts request i's dtypes as in `infer`.
        """
        start = time.perf_counter_ns()
        results: list[InferenceResult | InferenceError | None] = [None] * len(requests)
        invocations: list[int] = []
        with self._lock:
            active = self._active
            if active is None:
                error = InferenceError("no model loaded: the agent has no active model yet")
                return [error] * len(requests), []
            groups: dict[tuple[Any, ...], list[tuple[int, list[np.ndarray]]]] = {}
            for position, request in enumerate(requests):
                try:
                    arrays = self._check(active, request, bool(coerce and coerce[position]))
                except InferenceError as exc:
                    results[position] = exc
                    continue
                if active.batchable and len({a.shape[0] for a in arrays}) == 1:
                    # Rows are split back by input 0: every input must have as many rows.
                    key: tuple[Any, ...] = tuple((a.dtype.str, a.shape[1:]) for a in arrays)
                else:
                    key = (position,)  # fixed batch: every request is its own group
                groups.setdefault(key, []).append((position, arrays))
            for members in groups.values():
                outcome = self._run_group(active, members)
                invocations.extend(outcome[1])
                for (position, _), result in zip(members, outcome[0], strict=True):
                    results[position] = result
        latency_ms = (time.perf_counter_ns() - start) / 1e6
        final: list[InferenceResult | InferenceError] = []
        for item in results:
            assert item is not None  # every position was filled above
            if isinstance(item, InferenceResult):
                item = InferenceResult(item.outputs, item.sha256, latency_ms)
            final.append(item)
        return final, invocations

    def _run_group(
        self, active: _ActiveModel, members: list[tuple[int, list[np.ndarray]]]
    ) -> tuple[list[InferenceResult | InferenceError], list[int]]:
        """Run compatible requests in one invoke (or singly); called with the lock held."""
        if len(members) == 1:
            try:
                outputs = self._invoke(active, members[0][1])
            except InferenceError as exc:
                return [exc], [1]
            return [InferenceResult(outputs, active.sha256, 0.0)], [1]
        rows = [arrays[0].shape[0] for _, arrays in members]
        total = sum(rows)
        merged = [
            np.concatenate([arrays[i] for _, arrays in members], axis=0)
            for i in range(len(active.inputs))
        ]
        try:
            outputs = self._invoke(active, merged)
        except InferenceError:
            # One member may be what fails the merged run: the others must not fail with it.
            singles = [self._run_group(active, [member]) for member in members]
            return [r for res, _ in singles for r in res], [1] * len(members)
        if any(out.ndim == 0 or out.shape[0] != total for out in outputs):
            # The model's outputs do not follow the batch (e.g. it reduces over axis 0): the
            # merged run is meaningless, so run every request on its own instead.
            singles = [self._run_group(active, [member]) for member in members]
            return [r for res, _ in singles for r in res], [1] * len(members)
        bounds = np.cumsum(rows)[:-1]
        split = [np.split(out, bounds, axis=0) for out in outputs]
        results: list[InferenceResult | InferenceError] = [
            InferenceResult([parts[i] for parts in split], active.sha256, 0.0)
            for i in range(len(members))
        ]
        return results, [len(members)]

    def _check(
        self, active: _ActiveModel, inputs: Sequence[np.ndarray], coerce: bool = False
    ) -> list[np.ndarray]:
        """Inputs as C-contiguous arrays matching the model's count, dtypes and shapes."""
        if isinstance(inputs, np.ndarray):
            raise InferenceError("inputs must be a list of arrays (one per model input)")
        if len(inputs) != len(active.inputs):
            raise InferenceError(
                f"model has {len(active.inputs)} input(s), got {len(inputs)} array(s)",
                model_sha256=active.sha256,
            )
        arrays = []
        # The hot path of every request: plain attribute reads and comparisons only.
        for position, (spec, value) in enumerate(zip(active.inputs, inputs, strict=True)):
            if not isinstance(value, np.ndarray):
                raise InferenceError(
                    f"input {position} ({spec.name!r}) must be a numpy array, "
                    f"got {type(value).__name__}",
                    model_sha256=active.sha256,
                )
            if coerce and value.dtype != spec.dtype:
                value = _coerce(spec, position, value, active.sha256)
            if value.dtype != spec.dtype or (
                value.shape != spec.shape and not spec.accepts_shape(value.shape)
            ):
                raise InferenceError(
                    f"input {position} ({spec.name!r}): expected {spec.expected()}, "
                    f"got {_describe(value)}",
                    model_sha256=active.sha256,
                )
            if not value.flags.c_contiguous:
                value = np.ascontiguousarray(value)
            arrays.append(value)
        return arrays

    def _invoke(self, active: _ActiveModel, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Fit the allocation (resize or pad), set inputs, invoke, copy outputs; lock held."""
        shapes = [a.shape for a in arrays]
        try:
            if shapes == active.current_shapes:
                return self._run(active, arrays, shapes[0][0] if active.batchable else 0)
            rows = _padding_target(active, shapes)
            if rows is not None:
                outputs = self._run(active, [_pad_rows(a, rows) for a in arrays], rows)
                if all(out.ndim and out.shape[0] == rows for out in outputs):
                    return [out[: shapes[0][0]] for out in outputs]
                # Outputs do not follow the batch, so padding is not safe: resize instead.
            started = time.perf_counter_ns()
            self._resize(active, shapes)
            active.resize_ms = _running_mean(active.resize_ms, started)
            return self._run(active, arrays, shapes[0][0] if active.batchable else 0)
        except InferenceError:
            raise
        except Exception as exc:  # the runtimes raise ValueError or RuntimeError
            raise InferenceError(
                f"the runtime failed to run model {active.sha256[:12]}: {exc}",
                model_sha256=active.sha256,
            ) from exc

    def _run(self, active: _ActiveModel, arrays: list[np.ndarray], rows: int) -> list[np.ndarray]:
        """set_tensor, invoke, get_tensor; `rows` > 0 updates the per-row time estimate."""
        interpreter = active.interpreter
        for spec, array in zip(active.inputs, arrays, strict=True):
            interpreter.set_tensor(spec.index, array)
        started = time.perf_counter_ns()
        if active.delay_s:
            time.sleep(active.delay_s)
        interpreter.invoke()
        if rows > 0:
            active.row_ms = _running_mean(active.row_ms, started, rows)
        # get_tensor returns a copy in both runtimes: outputs survive the next invoke.
        return [interpreter.get_tensor(spec.index) for spec in active.outputs]

    def _resize(self, active: _ActiveModel, shapes: list[tuple[int, ...]]) -> None:
        """Resize the inputs to `shapes` and re-allocate (µs to ms: see _padding_target)."""
        interpreter: Any = active.interpreter
        try:
            for spec, shape in zip(active.inputs, shapes, strict=True):
                interpreter.resize_tensor_input(spec.index, list(shape), strict=True)
            interpreter.allocate_tensors()
        except Exception as exc:
            # Put the loaded shapes back so the interpreter keeps serving normal requests; until
            # that succeeds, nothing is known about what is allocated.
            active.current_shapes = [(-1,)] * len(active.inputs)
            for spec in active.inputs:
                interpreter.resize_tensor_input(spec.index, list(spec.shape), strict=True)
            interpreter.allocate_tensors()
            active.current_shapes = [spec.shape for spec in active.inputs]
            raise InferenceError(
                f"model {active.sha256[:12]} cannot run inputs of shapes {shapes}: {exc}",
                model_sha256=active.sha256,
            ) from exc
        active.current_shapes = shapes

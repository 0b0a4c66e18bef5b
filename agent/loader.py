"""Which stored model serves: load one into the inference service, or fall back to `previous`."""

from __future__ import annotations

import logging
import time

from agent.local_services import LocalServices
from agent.runtime import ModelLoadError, load_interpreter
from agent.store import ModelStore
from agent.update.record import UpdateStateFile

log = logging.getLogger(__name__)


class ModelLoader:
    """Loads stored models into the serving interpreter, timing each load (init_ms)."""

    def __init__(
        self,
        store: ModelStore,
        local: LocalServices,
        state: UpdateStateFile,
        default_threads: int | None,
    ) -> None:
        """Wire the store to the inference service; `default_threads` is agent.toml's."""
        self.store = store
        self.local = local
        self.state = state
        self.default_threads = default_threads

    def serve(self, sha: str, threads: int | None) -> None:
        """Load a stored model into the serving interpreter; ModelLoadError if it does not load."""
        started = time.perf_counter()
        interpreter = load_interpreter(self.store.path(sha), threads)
        self.local.swap(interpreter, sha, (time.perf_counter() - started) * 1000.0, threads)

    def load_current(self) -> None:
        """Serve the store's `current`, falling back to `previous` (then nothing) if it fails."""
        pointers = self.store.pointers()
        record = self.state.record
        for sha in (pointers.current, pointers.previous):
            if sha is None or not self.store.has(sha):
                continue
            # The threads it was activated with; a model not recorded gets the agent's setting.
            same = sha == record.serving_sha256
            try:
                self.serve(sha, record.serving_threads if same else self.default_threads)
                if sha != pointers.current:
                    self.store.rollback()
                    log.warning("current model failed to load; rolled back to %s", sha[:12])
                return
            except ModelLoadError as exc:
                log.error("stored model %s does not load: %s", sha[:12], exc)
        self.local.clear()

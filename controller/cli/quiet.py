"""Silence TensorFlow's logging (absl, oneDNN, MLIR `fully_quantize`, XNNPACK) in our commands.

TensorFlow logs from Python (the `tensorflow` logger, absl) and from C++ straight to file
descriptor 2, where no Python setting reaches; `edgefleet --debug` keeps all of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

# Lines TensorFlow, TFLite and absl print to fd 2 that say nothing an operator can act on.
NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog|^[IWE]\d{4} [\d:. ]+\d+ \S+\.cc:\d+\]"
    r"|oneDNN custom operations|TF_ENABLE_ONEDNN_OPTS|INFO: Created TensorFlow Lite"
    r"|fully_quantize|Estimated count of arithmetic ops|Ignored output_format|Ignored drop_control"
    r"|^\s*$"
)


def debug() -> bool:
    """True under `edgefleet --debug` (or EDGEFLEET_DEBUG=1)."""
    return bool(os.environ.get("EDGEFLEET_DEBUG"))


def quiet_tensorflow() -> None:
    """Before TensorFlow is imported: its C++ log level, absl verbosity and Python logger."""
    if debug():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # C++: errors only (read at import)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # Python warnings raised inside TensorFlow/Keras (`Statistics for quantized inputs were
    # expected…`): about TF's internals, not about anything the operator passed.
    warnings.filterwarnings("ignore", module=r"(tensorflow|keras|tf_keras|absl)(\.|$)")
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Run a block with fd 2 captured; afterwards print its lines that are not TF noise.

    Python's own stderr (our progress lines) keeps going to the terminal as it happens.
    """
    if debug():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    on_fd2 = _on_fd2(python_stderr)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        if on_fd2:  # our own lines go to the real stderr at once, not into the capture
            sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8")
        try:
            yield
        finally:
            if on_fd2:
                sys.stderr.close()
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line
                for line in captured.read().decode("utf-8", "replace").splitlines()
                if not NOISE.search(line)
            ]
            for line in kept:
                print(line, file=sys.stderr)


def _on_fd2(stream: object) -> bool:
    """Whether a Python stream writes to fd 2 (not so under a test runner's capture)."""
    try:
        return bool(stream.fileno() == 2)  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False

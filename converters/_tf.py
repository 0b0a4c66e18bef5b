"""Lazy TensorFlow import so that importing converters stays fast (the CLI must start quickly)."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from types import ModuleType


def tensorflow() -> ModuleType:
    """Import TensorFlow on first use, with its C++ info logs silenced unless asked for."""
    # Level 2 hides TF's INFO/WARNING start-up banner (CPU feature guard etc.); errors still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


@contextlib.contextmanager
def quiet_stdout() -> Iterator[io.StringIO]:
    """Capture what Keras/TF print on stdout (e.g. "Saved artifact at ...") during conversion."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf

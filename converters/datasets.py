"""Load calibration and validation arrays from .npy, .npz or a directory of them."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.errors import ModelInputError

INPUT_KEYS = ("x", "inputs", "images", "data", "calib")
LABEL_KEYS = ("y", "labels", "targets")


@dataclass(frozen=True)
class Samples:
    """Model inputs `x` (N, ...) as float32 and optional integer labels `y` (N,)."""

    x: np.ndarray
    y: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Reject empty input arrays and labels whose count differs from the inputs'."""
        if self.x.ndim < 1 or self.x.shape[0] == 0:
            raise ModelInputError(f"Sample array is empty (shape {self.x.shape})")
        if self.y is not None and self.y.shape[0] != self.x.shape[0]:
            raise ModelInputError(
                f"{self.y.shape[0]} labels for {self.x.shape[0]} inputs: counts must match"
            )


def _from_npz(path: Path) -> Samples:
    """Read inputs (and labels, if present) from an .npz by conventional key names."""
    with np.load(path, allow_pickle=False) as npz:
        keys = list(npz.keys())
        x_key = next((k for k in INPUT_KEYS if k in keys), None)
        if x_key is None:
            others = [k for k in keys if k not in LABEL_KEYS]
            if len(others) != 1:
                raise ModelInputError(
                    f"{path}: cannot tell the inputs among keys {keys}; name them one of "
                    f"{', '.join(INPUT_KEYS)}"
                )
            x_key = others[0]
        y_key = next((k for k in LABEL_KEYS if k in keys), None)
        x = np.asarray(npz[x_key], dtype=np.float32)
        y = np.asarray(npz[y_key]).astype(np.int64) if y_key else None
    return Samples(x, y)


def load_samples(path: Path) -> Samples:
    """Load .npy (inputs only), .npz (x / y keys) or a directory of those, concatenated."""
    p = Path(path)
    if not p.exists():
        raise ModelInputError(f"Data file not found: {p}")
    try:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix in (".npy", ".npz"))
            if not files:
                raise ModelInputError(f"No .npy/.npz files in directory {p}")
            parts = [load_samples(f) for f in files]
            labelled = all(s.y is not None for s in parts)
            x = np.concatenate([s.x for s in parts])
            y = np.concatenate([s.y for s in parts if s.y is not None]) if labelled else None
            return Samples(x, y)
        if p.suffix == ".npy":
            return Samples(np.asarray(np.load(p, allow_pickle=False), dtype=np.float32))
        if p.suffix == ".npz":
            return _from_npz(p)
    except ModelInputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # np.load's failures
        raise ModelInputError(f"Cannot read data file {p}: {exc}") from exc
    raise ModelInputError(f"Unsupported data file {p}: expected .npy, .npz or a directory")

"""Fixtures shared by the converters' unit tests."""

from __future__ import annotations

import numpy as np
import pytest

from converters.datasets import Samples
from converters.digits import load_digits_dataset


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, Samples]:
    """The digits dataset as calibration inputs and labelled validation samples."""
    data = load_digits_dataset()
    return data.x_train, Samples(data.x_val, data.y_val)

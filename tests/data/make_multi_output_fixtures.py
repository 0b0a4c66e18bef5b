"""Regenerate the multi-output and custom-op fixtures that agent-side tests use (no TF there).

Run with the full venv (TensorFlow builds the two-head model):

    .venv/bin/python tests/data/make_multi_output_fixtures.py

Writes, next to this script:

- `two_head_fp32.tflite`: tests/model_fixtures.py's detector shape (16x16x3 image → boxes
  (1, 64, 4) and sigmoid scores (1, 64, 1)), seeded random weights, plain fp32 conversion.
- `two_head_fp32.golden.npz`: a golden file in format v2 (agent/golden.py) with both outputs.
- `conv2d_transpose_bias.tflite`: one MediaPipe Convolution2DTransposeBias custom op
  (converters/op_probe.py): ai-edge-litert runs it through XNNPACK, tflite-runtime 2.14 refuses
  it with "Encountered unresolved custom op".
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep the converter's C++ chatter out

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from converters.golden import write_golden
from tests import model_fixtures

DATA_DIR = Path(__file__).resolve().parent
# Golden inputs: seeded uniform images, the kind of data the detector shape takes.
GOLDEN_SEED = 7


def main() -> int:
    """Write the fixtures and print name, size and sha256 of each."""
    with tempfile.TemporaryDirectory() as cache:
        keras_path = model_fixtures.two_head_keras(Path(cache))
        model = model_fixtures.tflite_of(Path(cache), keras_path, "fp32")
        target = DATA_DIR / "two_head_fp32.tflite"
        target.write_bytes(model.read_bytes())
    images = model_fixtures.calibration_images(8, seed=GOLDEN_SEED)
    write_golden(target, images, DATA_DIR / "two_head_fp32.golden.npz")
    model_fixtures.custom_op_tflite(DATA_DIR)
    for name in (
        "two_head_fp32.tflite",
        "two_head_fp32.golden.npz",
        "conv2d_transpose_bias.tflite",
    ):
        data = (DATA_DIR / name).read_bytes()
        print(f"| `{name}` | {len(data)} | {hashlib.sha256(data).hexdigest()} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

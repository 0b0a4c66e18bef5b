"""Regenerate tests/data/pretrained/*.tflite with TensorFlow (see tests/pretrained_models.py).

    cd <repo> && PYTHONPATH=. .venv/bin/python tests/data/pretrained/make_pretrained_fixtures.py

Writes the fp16-weight two-output detector without a SignatureDef and the sparse (DENSIFY)
model, and prints each file's size and sha256 for README.md. Calibration data is not
committed: tests make it with tests.pretrained_models.detector_scenes (numpy only).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from tests.pretrained_models import write_pretrained_fixtures

HERE = Path(__file__).resolve().parent
# The committed fixtures; the fp32 detector and the calibration files stay out (size).
KEEP = ("detector_fp16", "sparse")


def main() -> None:
    """Build every fixture in a scratch directory and copy the kept ones here."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_pretrained_fixtures(Path(tmp))
        for name in KEEP:
            dest = HERE / f"{name}.tflite"
            shutil.copyfile(paths[name], dest)
            digest = hashlib.sha256(dest.read_bytes()).hexdigest()
            print(f"{dest.name}\t{dest.stat().st_size}\t{digest}")


if __name__ == "__main__":
    main()

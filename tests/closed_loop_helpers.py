"""An `optimize --candidates` output tree built from the real test models (tests/data)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data"
# Recipe -> a real .tflite of that recipe, made by the TF Lite converter (tests/data/README.md).
MODELS = {
    "int8": DATA / "tiny_int8.tflite",
    "fp32": DATA / "tiny_fp32.tflite",
    "int16x8": DATA / "tiny_int16x8.tflite",
}


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_candidates_dir(
    root: Path,
    profile: str,
    ranks: list[tuple[str, int | None]],
    *,
    accuracy_drop: dict[str, float] | None = None,
) -> Path:
    """Write `<root>/<profile>/` as `edgefleet optimize --candidates` does; return root.

    `ranks` lists (recipe, threads) from rank 1 down; the host numbers are the rank's (0.1 ms ×
    rank) and the recipe's accuracy drop (`accuracy_drop`, default 0.1 × rank).
    """
    pdir = root / profile
    (pdir / "candidates").mkdir(parents=True, exist_ok=True)
    entries = []
    for rank, (recipe, threads) in enumerate(ranks, start=1):
        where = (
            pdir if rank == 1 or (pdir / f"tiny-{recipe}.tflite").exists() else pdir / "candidates"
        )
        file = where / f"tiny-{recipe}.tflite"
        if not file.exists():
            shutil.copyfile(MODELS[recipe], file)
            golden_src = MODELS[recipe].with_suffix(".golden.npz")
            golden = None
            if golden_src.exists():
                shutil.copyfile(golden_src, file.with_suffix(".golden.npz"))
                golden = {"file": file.with_suffix(".golden.npz").name}
            manifest = {
                "schema": "edgefleet.artifact-manifest/v1", "file": file.name,
                "sha256": sha256(file), "recipe": recipe, "profile": profile, "golden": golden,
            }  # fmt: skip
            file.with_suffix(".manifest.json").write_text(json.dumps(manifest))
        drop = (accuracy_drop or {}).get(recipe, 0.1 * rank)
        entries.append(
            {
                "rank": rank,
                "variant": recipe,
                "recipe": recipe,
                "threads": threads,
                "manifest": str(file.with_suffix(".manifest.json").relative_to(pdir)),
                "host": {
                    "latency_ms": 0.1 * rank,
                    "accuracy_drop_points": drop,
                    "snr_db": 40.0 - rank,
                    "outputs": [_output(rank)],
                },
            }
        )
    doc = {"schema": "edgefleet.candidates/v1", "profile": profile, "candidates": entries}
    (pdir / "candidates.json").write_text(json.dumps(doc))
    return root


def _output(rank: int) -> dict[str, Any]:
    """The host fidelity of the tiny model's one output, as optimize writes it (SNR 40 - rank)."""
    return {
        "index": 0,
        "name": "logits",
        "shape": [10],
        "kind": "tensor",
        "snr_db": 40.0 - rank,
        "cosine": 0.9999,
        "max_abs_error": 0.01 * rank,
        "top1_agreement": None,
        "flat": False,
        "reference_range": 12.5,
    }

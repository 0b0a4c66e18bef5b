"""The JSON manifest beside each published artifact, and the candidates.json index per profile."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters._files import atomic_write_bytes, sha256_file

MANIFEST_SCHEMA = "edgefleet.artifact-manifest/v1"
CANDIDATES_SCHEMA = "edgefleet.candidates/v1"
CANDIDATES_FILE = "candidates.json"
CANDIDATES_DIR = "candidates"


@dataclass(frozen=True)
class ArtifactManifest:
    """Identity, provenance and measured metrics of one artifact built for one profile."""

    artifact: Path
    recipe: str
    profile: str
    source_model: str
    source_sha256: str
    metrics: dict[str, Any]
    checks: list[dict[str, Any]]
    compiler: dict[str, Any]
    io: dict[str, Any]
    golden: Path | None = None
    golden_model: str | None = None
    tools: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The manifest document: sha256 and size are read from the files themselves."""
        golden = None
        if self.golden is not None:
            golden = {
                "file": self.golden.name,
                "sha256": sha256_file(self.golden),
                "size_bytes": self.golden.stat().st_size,
                # The host cannot run a compiled (ethos-u / edgetpu) op: goldens then come from
                # the integer model before compilation, which the NPU is designed to match.
                "computed_with": self.golden_model or self.artifact.name,
            }
        return {
            "schema": MANIFEST_SCHEMA,
            "file": self.artifact.name,
            "sha256": sha256_file(self.artifact),
            "size_bytes": self.artifact.stat().st_size,
            "recipe": self.recipe,
            "profile": self.profile,
            "source": {"model": self.source_model, "sha256": self.source_sha256},
            "io": self.io,
            "compiler": self.compiler,
            "metrics": self.metrics,
            "checks": self.checks,
            "golden": golden,
            "tools": dict(self.tools or {}),
        }

    def write(self, path: Path | None = None) -> Path:
        """Write the manifest as `<artifact>.manifest.json` (or `path`), atomically."""
        target = Path(path) if path else self.artifact.with_suffix(".manifest.json")
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        return atomic_write_bytes(target, text.encode())


def write_candidates(profile_dir: Path, profile: str, candidates: list[dict[str, Any]]) -> Path:
    """Write `<profile_dir>/candidates.json` atomically: the ranked artifacts a rollout may try."""
    doc = {"schema": CANDIDATES_SCHEMA, "profile": profile, "candidates": candidates}
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(Path(profile_dir) / CANDIDATES_FILE, text.encode())


def source_sha256(model_path: Path) -> str:
    """sha256 of a model file, or of a SavedModel directory's files (sorted by relative path)."""
    path = Path(model_path)
    if path.is_file():
        return sha256_file(path)
    import hashlib

    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode() + b"\0")
        digest.update(sha256_file(f).encode())
    return digest.hexdigest()

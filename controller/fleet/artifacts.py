"""Content-addressed artifact files on the controller, and the manifests that describe them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.protocol import DEFAULT_CHUNK_SIZE, Manifest, validate_sha256
from controller.errors import FleetError
from converters.manifest import MANIFEST_SCHEMA, ManifestDoc
from firmware_profiles.validation import one_line


class ArtifactStore:
    """`<root>/<sha256>` blobs (models and their golden data), written once, read by chunk."""

    def __init__(self, root: Path) -> None:
        """Create the store directory if needed (and rename blobs of the old `.tflite` layout)."""
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        for old in self.root.glob("*.tflite"):
            os.replace(old, self.root / old.stem)

    def path(self, sha256: str) -> Path:
        """Path of a blob by digest."""
        return self.root / validate_sha256(sha256)

    def add_file(self, source: Path) -> str:
        """Copy a file into the store (atomically) and return its sha256."""
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(prefix=".incoming.", dir=self.root)
        try:
            with source.open("rb") as src, os.fdopen(fd, "wb") as dst:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())
            sha = digest.hexdigest()
            os.replace(tmp, self.path(sha))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha

    def read_chunk(self, sha256: str, index: int, chunk_size: int) -> bytes:
        """Bytes of chunk `index`."""
        with self.path(sha256).open("rb") as fh:
            fh.seek(index * chunk_size)
            return fh.read(chunk_size)

    def copy_out(self, sha256: str, target: Path) -> None:
        """Copy an artifact out of the store."""
        shutil.copyfile(self.path(sha256), target)


GOLDEN_KEYS = ("inputs", "outputs", "atol")


def check_golden(path: Path) -> None:
    """Refuse a golden file the agent's self-test could not use (not an .npz, keys missing)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: golden data must be an .npz file (numpy.savez)")
    with zipfile.ZipFile(path) as zf:
        names = {n.removesuffix(".npy") for n in zf.namelist()}
    missing = [k for k in GOLDEN_KEYS if k not in names]
    if missing:
        raise ValueError(f"{path}: golden .npz lacks {', '.join(missing)} (needs {GOLDEN_KEYS})")


def build_manifest(
    path: Path,
    *,
    name: str,
    version: str,
    recipe: str,
    profile: str | None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Manifest:
    """Hash a file whole and per chunk into a Manifest."""
    digest = hashlib.sha256()
    chunks: list[str] = []
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
            chunks.append(hashlib.sha256(block).hexdigest())
            size += len(block)
    if size == 0:
        raise ValueError(f"{path}: empty file is not a model")
    return Manifest(
        sha256=digest.hexdigest(),
        size=size,
        chunk_size=chunk_size,
        chunk_sha256=tuple(chunks),
        name=name,
        version=version,
        recipe=recipe,
        profile=profile,
    )


# What `edgefleet optimize` writes beside each selected artifact (converters/manifest.py).
CONVERTER_MANIFEST_SCHEMA = MANIFEST_SCHEMA


def read_json_doc(path: Path, schema: str, what: str) -> dict[str, Any]:
    """A JSON object from `path` whose `schema` is `schema`, else a FleetError saying so."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FleetError(f"{path}: unreadable ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise FleetError(f"{path}: not an edgefleet {what} ({schema})")
    return doc


def read_converter_manifest(path: Path) -> dict[str, Any]:
    """A converters manifest.json, validated by its model (ManifestDoc), as a plain dict."""
    doc = read_json_doc(path, MANIFEST_SCHEMA, "artifact manifest")
    try:
        manifest = ManifestDoc.model_validate(doc)
    except ValidationError as exc:
        raise FleetError(f"{path}: {one_line(exc)}") from None
    return manifest.model_dump(by_alias=True)

"""The converters' manifests as pydantic models: round trips, older files, one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from controller.errors import FleetError
from controller.fleet.artifacts import read_converter_manifest
from controller.fleet.candidates import read_candidates
from converters.manifest import (
    ArtifactManifest,
    CandidatesDoc,
    ManifestDoc,
    write_candidates,
)
from scripts.gen_schemas import SCHEMA_DIR, SCHEMAS, render
from tests.paths import REPO_ROOT

REPO = REPO_ROOT
# Written by `edgefleet optimize` before the manifests were models: they must keep loading.
SHIPPED_MANIFESTS = sorted((REPO / "artifacts").glob("*/*.manifest.json"))
SHIPPED_CANDIDATES = sorted((REPO / "artifacts").glob("*/candidates.json"))


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_files_are_current(name: str) -> None:
    """docs/schemas/ is generated from the models: regenerate, don't edit."""
    assert (SCHEMA_DIR / name).read_text(encoding="utf-8") == render(SCHEMAS[name]), (
        f"docs/schemas/{name} is stale: run .venv/bin/python scripts/gen_schemas.py"
    )


def test_manifests_written_before_the_models_load_unchanged() -> None:
    """The committed optimize output loads, and writing it back gives the same bytes."""
    assert SHIPPED_MANIFESTS and SHIPPED_CANDIDATES
    for path in SHIPPED_MANIFESTS:
        assert ManifestDoc.model_validate_json(path.read_bytes()).to_json() == path.read_text()
        assert read_converter_manifest(path) == json.loads(path.read_text())
    for path in SHIPPED_CANDIDATES:
        assert CandidatesDoc.model_validate_json(path.read_bytes()).to_json() == path.read_text()
        assert read_candidates(path) == json.loads(path.read_text())


def _written(tmp_path: Path) -> tuple[ArtifactManifest, Path]:
    """A manifest the converters write for a small artifact with goldens."""
    artifact = tmp_path / "m-int8.tflite"
    artifact.write_bytes(b"TFL3" + bytes(60))
    golden = tmp_path / "m-int8.golden.npz"
    golden.write_bytes(b"PK" + bytes(30))
    manifest = ArtifactManifest(
        artifact=artifact,
        recipe="int8",
        profile="rpi4",
        source_model="m.keras",
        source_sha256="ab" * 32,
        metrics={"snr_db": float("inf"), "latency_ms": 0.5, "outputs": [{"index": 0}]},
        checks=[{"name": "fits_ram_budget", "ok": True, "blocking": True}],
        compiler={"kind": "none", "options": {}},
        io={"inputs": [{"name": "x", "dtype": "int8", "shape": [1, 4]}], "outputs": []},
        golden=golden,
        golden_model="m-int8-prequant.tflite",
        tools={"tensorflow-cpu": "2.21.0"},
    )
    return manifest, manifest.write()


def test_a_written_manifest_round_trips_through_the_model(tmp_path: Path) -> None:
    """What the converters write is what the controller reads, field for field."""
    manifest, path = _written(tmp_path)
    raw = json.loads(path.read_text())
    assert raw["sha256"] == hashlib.sha256((tmp_path / "m-int8.tflite").read_bytes()).hexdigest()
    assert raw["golden"]["computed_with"] == "m-int8-prequant.tflite"
    assert raw["metrics"]["snr_db"] == float("inf")  # free-form values written as json writes them
    doc = ManifestDoc.model_validate_json(path.read_text())
    assert doc == manifest.doc() and doc.to_json() == path.read_text()
    assert read_converter_manifest(path) == manifest.to_dict() == raw


def test_written_candidates_round_trip(tmp_path: Path) -> None:
    """candidates.json goes through its model on the way out and back."""
    entry = {"rank": 1, "variant": "int8", "recipe": "int8", "threads": 4,
             "manifest": "m-int8.manifest.json", "host": {"latency_ms": 0.5}}  # fmt: skip
    path = write_candidates(tmp_path, "rpi4", [entry])
    assert read_candidates(path)["candidates"] == [entry]
    with pytest.raises(ValueError, match=r"candidates\.0\.rank"):
        write_candidates(tmp_path, "rpi4", [{**entry, "rank": 0}])


def _manifest_error(tmp_path: Path, **change: Any) -> str:
    """The FleetError of reading a written manifest with `change` applied."""
    _, path = _written(tmp_path)
    doc = {**json.loads(path.read_text()), **change}
    path.write_text(json.dumps(doc))
    with pytest.raises(FleetError) as info:
        read_converter_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


def test_manifest_unknown_key_is_named(tmp_path: Path) -> None:
    """A key the format does not have is refused by name (a newer format is a new schema)."""
    assert "unknown key 'colour'" in _manifest_error(tmp_path, colour="red")
    golden = {"file": "g.npz", "sha": "x"}
    assert "unknown key 'golden.sha'" in _manifest_error(tmp_path, golden=golden)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"recipe": 8}, "'recipe' must be a non-empty string, got 8"),
        ({"size_bytes": "big"}, "'size_bytes' must be an integer, got 'big'"),
        ({"source": {"model": "m", "sha256": "xyz"}}, "'source.sha256' must match"),
        ({"golden": {"file": 3}}, "'golden.file' must be a non-empty string, got 3"),
        ({"tools": {"vela": 4}}, "'tools.vela' must be a non-empty string, got 4"),
        ({"file": "../../etc/passwd"}, "'file' must match"),
        ({"file": ".."}, "'file' must be a file name, got '..'"),
        ({"sha256": None}, "'sha256' must be a non-empty string, got None"),
        ({"schema": "edgefleet.artifact-manifest/v2"}, "not an edgefleet artifact manifest"),
    ],
)
def test_manifest_wrong_value_names_the_path(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    """A wrong type or value names the dotted key, on one line."""
    assert expected in _manifest_error(tmp_path, **change)


def test_candidates_errors_name_the_entry(tmp_path: Path) -> None:
    """Errors inside a candidate name the entry, then the key, as before the models."""
    entry = {"rank": 1, "recipe": "int8", "threads": 1, "manifest": "m.manifest.json"}
    path = tmp_path / "candidates.json"
    for change, expected in [
        ({"threads": 65}, "candidates[1]: 'threads' must be null or 1..64"),
        ({"rank": 1}, "candidates[1]: 'rank' must be unique, got 1 twice"),
        ({"rank": True}, "candidates[1]: 'rank' must be an integer, got True"),
        ({"hosts": {}}, "candidates[1]: unknown key 'hosts'"),
    ]:
        doc = {"schema": "edgefleet.candidates/v1", "profile": "rpi4",
               "candidates": [entry, {**entry, "rank": 2, **change}]}  # fmt: skip
        path.write_text(json.dumps(doc))
        with pytest.raises(FleetError) as info:
            read_candidates(path)
        assert str(info.value) == f"{path}: {expected}"

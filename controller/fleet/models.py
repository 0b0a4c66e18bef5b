"""Models and their artifacts: add, version checks, manifests; the registry's model half."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from agent.protocol import (
    GoldenRef,
    Manifest,
    ProtocolError,
    dump,
    parse,
    validate_name,
)
from agent.protocol.schema import encode
from controller.errors import FleetError
from controller.fleet.artifacts import build_manifest, check_golden, read_converter_manifest
from controller.fleet.candidates import register_candidates
from controller.fleet.core import FleetCore
from controller.fleet.opcheck import refuse_missing_custom_ops
from controller.storage.db import now, to_json
from controller.storage.queries import models as q

if TYPE_CHECKING:
    from controller.fleet.registry import Fleet

# Offset 4 of every TFLite flatbuffer holds this file identifier (schema.fbs: file_identifier).
TFLITE_IDENTIFIER = b"TFL3"


def _check_names(*, name: str, version: str | None, recipe: str | None = None) -> None:
    """Refuse a model name, version or recipe that could not travel as a safe name."""
    if ":" in name:
        # A model is referred to as NAME:VERSION (split at the first ':'): 'a:b' version 1
        # would read back as model 'a' version 'b:1' and collide with model 'a'.
        raise FleetError(
            f"Invalid model name: {name!r} contains ':' (models are referred to as NAME:VERSION)"
        )
    try:
        validate_name("model name", name)
        if version:
            validate_name("model version", version)
        if recipe is not None:
            validate_name("recipe name", recipe)
    except ProtocolError as exc:
        raise FleetError(str(exc)) from None


class ModelCatalog(FleetCore):
    """Adds and reads models and artifacts (mixed into Fleet; uses self.db, self.artifacts)."""

    # ------------------------------------------------------------------ models & deployments
    def add_artifact(
        self,
        model_path: Path,
        *,
        name: str,
        version: str | None = None,
        recipe: str = "as-is",
        profile: str | None = None,
        golden: Path | None = None,
        check: bool = True,
        expected_sha256: str | None = None,
        link: bool = True,
    ) -> Manifest:
        """Store a .tflite file (and its golden .npz) as an artifact of model name:version.

        Without a version, the first 12 hex digits of the file's sha256 are used. The golden
        file travels as its own content-addressed blob that the manifest points to. With
        `expected_sha256`, a file that hashes differently is refused before anything is written.
        `link=False` stores the blob without making it the version's artifact for the profile
        (a ranked candidate that only a selection phase may promote).
        """
        _check_names(name=name, version=version, recipe=recipe)
        if not model_path.is_file():
            raise FleetError(f"{model_path}: no such file")
        if check:
            with model_path.open("rb") as fh:
                head = fh.read(8)
            if head[4:8] != TFLITE_IDENTIFIER:
                raise FleetError(f"{model_path}: not a TFLite model (no 'TFL3' identifier)")
        if profile is not None:
            self._check_profile_ops(model_path, profile, check)
        golden_manifest = None
        try:
            if golden is not None:
                check_golden(golden)
                golden_manifest = build_manifest(
                    golden, name=name, version=version or "", recipe="golden", profile=profile
                )
            manifest = build_manifest(
                model_path, name=name, version=version or "", recipe=recipe, profile=profile
            )
        except ValueError as exc:
            raise FleetError(str(exc)) from None
        if expected_sha256 is not None and manifest.sha256 != expected_sha256:
            raise FleetError(f"{model_path}: sha256 {manifest.sha256} is not {expected_sha256}")
        if not version:
            version = manifest.sha256[:12]
        manifest = dataclasses.replace(
            manifest,
            version=version,
            golden=GoldenRef(golden_manifest.sha256, golden_manifest.size)
            if golden_manifest
            else None,
        )
        if golden_manifest is not None:
            golden_manifest = dataclasses.replace(golden_manifest, version=version)
        try:
            dump(manifest)  # the manifest must fit the protocol's message cap to be published
        except ProtocolError as exc:
            raise FleetError(f"{model_path}: too large to distribute: {exc}") from None
        if link:
            self._check_version_free(name, version, profile, manifest.sha256)
        blobs = [(model_path, manifest, "model")]
        if golden is not None and golden_manifest is not None:
            blobs.append((golden, golden_manifest, "golden"))
        for path, blob_manifest, _ in blobs:
            if self.artifacts.add_file(path) != blob_manifest.sha256:
                raise FleetError(f"{path}: changed while it was being added; try again")
        with self.db.transaction() as tx:
            model_id = q.add_model(tx, name, version, str(model_path), now())
            for _, blob_manifest, kind in reversed(blobs):  # the golden row first
                q.add_artifact(tx, {
                    "sha256": blob_manifest.sha256, "model_id": model_id,
                    "recipe": blob_manifest.recipe, "profile": profile,
                    "size": blob_manifest.size, "chunk_size": blob_manifest.chunk_size,
                    "manifest": to_json(encode(blob_manifest)), "created": now(), "kind": kind,
                    "golden_sha256": manifest.golden.sha256
                    if kind == "model" and manifest.golden else None,
                })  # fmt: skip
            # The same file may serve several models (or profiles): the link is its own row,
            # one per model version and profile. A version never changes under a rollout.
            if link:
                q.link_artifact(tx, {
                    "model_id": model_id, "sha256": manifest.sha256, "profile": profile,
                    "recipe": recipe, "created": now(),
                })  # fmt: skip
        return manifest

    def _check_profile_ops(self, model_path: Path, profile: str, check: bool) -> None:
        """The profile must exist; with `check`, its runtime must resolve every custom op."""
        prof = self._profile(profile)
        if check:
            runtime = (prof.runtime.name, prof.runtime.version, prof.compiler.kind)
            refuse_missing_custom_ops(model_path, {f"profile {profile}": runtime})

    def _check_version_free(self, name: str, version: str, profile: str | None, sha: str) -> None:
        """Refuse a different file for a model version and profile that already has one."""
        linked = q.linked_sha(self.db.conn, name, version, profile)
        if linked is not None and linked != sha:
            where = f"profile {profile}" if profile else "every profile"
            raise FleetError(
                f"{name}:{version} already has a different artifact for {where} "
                f"({linked[:12]}); register the new file under a new version"
            )

    def add_model(
        self,
        path: Path,
        *,
        name: str,
        version: str,
        profile: str | None = None,
        golden: Path | None = None,
    ) -> dict[str, Any]:
        """Register model name:version from one .tflite or from an `optimize` output directory.

        A directory contributes one artifact per profile, read from the `*.manifest.json`
        files `edgefleet optimize` writes (each checked against its artifact's sha256).
        """
        _check_names(name=name, version=version)
        if path.is_dir():
            if golden is not None or profile is not None:
                raise FleetError("--golden/--profile apply to a single .tflite, not a directory")
            found = sorted(path.glob("*/*.manifest.json"))
            if not found:
                raise FleetError(f"{path}: no */*.manifest.json (run `edgefleet optimize` first)")
            for manifest_path in found:
                doc = read_converter_manifest(manifest_path)
                artifact = manifest_path.parent / doc["file"]
                golden_path = (
                    manifest_path.parent / doc["golden"]["file"] if doc.get("golden") else None
                )
                self.add_artifact(
                    artifact,
                    name=name,
                    version=version,
                    recipe=str(doc["recipe"]),
                    profile=str(doc["profile"]),
                    golden=golden_path,
                    expected_sha256=doc["sha256"],  # as recorded in manifest_path
                )
            register_candidates(cast("Fleet", self), path, name=name, version=version)
        else:
            self.add_artifact(path, name=name, version=version, profile=profile, golden=golden)
        return self.model(f"{name}:{version}")

    def model(self, ref: str) -> dict[str, Any]:
        """A model by `name:version` (or `name` = its newest version) with its artifacts."""
        name, _, version = ref.partition(":")
        row = q.model(self.db.conn, name, version or None)
        if row is None:
            raise FleetError(f"unknown model {ref!r} (see `edgefleet models list`)")
        row["artifacts"] = q.model_artifact_rows(self.db.conn, row["id"])
        return row

    def models(self) -> list[dict[str, Any]]:
        """Every model version with the profiles it has artifacts for."""
        rows = q.all_models(self.db.conn)
        for r in rows:
            r["profiles"] = [p or "*" for p in q.linked_profiles(self.db.conn, r["id"])]
        return rows

    def manifest(self, sha256: str) -> Manifest:
        """The stored manifest of an artifact."""
        text = q.manifest_text(self.db.conn, sha256)
        if text is None:
            raise FleetError(f"unknown artifact {sha256}")
        return parse(text, Manifest)

"""Ranked candidates of a model version per profile, read from `optimize --candidates` output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from agent.protocol import MAX_THREADS
from controller.errors import FleetError
from controller.fleet.artifacts import read_converter_manifest, read_json_doc
from controller.storage.db import to_json
from controller.storage.queries import candidates as q
from converters.manifest import CANDIDATES_SCHEMA, CandidatesDoc
from firmware_profiles.validation import one_line

if TYPE_CHECKING:
    from controller.fleet.registry import Fleet


def read_candidates(path: Path) -> dict[str, Any]:
    """A `candidates.json`, validated by its model (CandidatesDoc), as a plain dict."""
    doc = read_json_doc(path, CANDIDATES_SCHEMA, "candidates list")
    try:
        candidates = CandidatesDoc.model_validate(doc, context={"max_threads": MAX_THREADS})
    except ValidationError as exc:
        raise FleetError(f"{path}: {one_line(exc, items=True)}") from None
    return candidates.model_dump(by_alias=True)


def register_candidates(fleet: Fleet, directory: Path, *, name: str, version: str) -> int:
    """Store every `<profile>/candidates.json` entry of an optimize output; return how many."""

    count = 0
    for path in sorted(directory.glob("*/candidates.json")):
        doc = read_candidates(path)
        profile = str(doc["profile"])
        if not doc["candidates"]:
            continue  # no variant passed for this profile: nothing to register
        rows: list[tuple[int, str, str, int | None, str]] = []
        for entry in doc["candidates"]:
            manifest_path = (path.parent / entry["manifest"]).resolve()
            if path.parent.resolve() not in manifest_path.parents:
                raise FleetError(f"{path}: manifest {entry['manifest']!r} is outside {path.parent}")
            manifest = read_converter_manifest(manifest_path)
            golden = manifest.get("golden")
            added = fleet.add_artifact(
                manifest_path.parent / manifest["file"],
                name=name,
                version=version,
                recipe=str(manifest["recipe"]),
                profile=profile,
                golden=manifest_path.parent / golden["file"] if golden else None,
                expected_sha256=manifest["sha256"],
                link=entry["rank"] == 1,  # rank 1 is the profile's default artifact
            )
            host = entry.get("host", {})
            rows.append(
                (entry["rank"], added.sha256, entry["recipe"], entry["threads"], to_json(host))
            )
        model_id = fleet.model(f"{name}:{version}")["id"]
        with fleet.db.transaction() as tx:
            known = q.candidates(tx, model_id, profile)
            if known and [k[:4] for k in known] != [r[:4] for r in sorted(rows)]:
                # A selection may be measuring these: a version's candidates never change.
                raise FleetError(
                    f"{name}:{version} already has different candidates for profile {profile}; "
                    "register the new optimize output under a new version"
                )
            q.replace_candidates(tx, model_id, profile, rows)
        count += len(rows)
    return count


def model_candidates(fleet: Fleet, model_id: int) -> list[dict[str, Any]]:
    """The stored candidates of a model version, by profile and rank."""
    rows = q.model_candidate_rows(fleet.db.conn, model_id)
    for r in rows:
        r["host"] = json.loads(r["host"] or "{}")
    return rows


def explain(fleet: Fleet, model_ref: str, rollout_id: str | None = None) -> dict[str, Any]:
    """Registered candidates of a model, the newest (or given) selection and its consequences."""
    model = fleet.model(model_ref)
    rollouts = q.selections(fleet.db.conn, model["id"])
    chosen = None
    if rollout_id is not None:
        chosen = next((r for r in rollouts if r["id"] == rollout_id), None)
        if chosen is None:
            raise FleetError(
                f"rollout {rollout_id!r} measured no candidates of {model['name']}:"
                f"{model['version']} (rollouts that did: {', '.join(r['id'] for r in rollouts)})"
            )
    elif rollouts:
        chosen = rollouts[0]
    result: dict[str, Any] = {
        "model": f"{model['name']}:{model['version']}",
        "candidates": model_candidates(fleet, model["id"]),
        "rollout": chosen,
        "decisions": [],
        "trials": [],
        "fell_back": [],
        "outliers": [],
    }
    if chosen is None:
        return result
    selection = fleet.rollouts.selection
    result["decisions"] = selection.decisions(chosen["id"])
    result["trials"] = selection.trials(chosen["id"])
    result["fell_back"] = q.fell_back(fleet.db.conn, chosen["id"])
    result["outliers"] = q.outliers(fleet.db.conn, chosen["id"])
    return result

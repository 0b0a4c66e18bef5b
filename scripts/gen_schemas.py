"""Write docs/schemas/*.schema.json from the pydantic models of the controller side's files.

    .venv/bin/python scripts/gen_schemas.py

The files are generated, never edited: tests/unit/test_file_schemas.py fails when one is stale.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from converters.manifest import CandidatesDoc, ManifestDoc  # noqa: E402
from firmware_profiles.schema import json_schema as profile_schema  # noqa: E402

SCHEMA_DIR = REPO_ROOT / "docs" / "schemas"


def _model_schema(model: Any, title: str) -> Callable[[], dict[str, Any]]:
    """The JSON Schema of a pydantic model (file keys, as validated), titled for the docs."""

    def build() -> dict[str, Any]:
        """Generate it."""
        schema: dict[str, Any] = model.model_json_schema(by_alias=True, mode="validation")
        schema["title"] = title
        return schema

    return build


SCHEMAS: dict[str, Callable[[], dict[str, Any]]] = {
    "profile.schema.json": profile_schema,
    "artifact-manifest.schema.json": _model_schema(
        ManifestDoc, "edgefleet artifact manifest (<artifact>.manifest.json)"
    ),
    "candidates.schema.json": _model_schema(
        CandidatesDoc, "edgefleet ranked candidates (<profile>/candidates.json)"
    ),
}


def render(build: Callable[[], dict[str, Any]]) -> str:
    """A schema as the file holds it: sorted keys, two-space indent, a final newline."""
    return json.dumps(build(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> None:
    """Write every schema file."""
    SCHEMA_DIR.mkdir(parents=True, exist_ok=True)
    for name, build in SCHEMAS.items():
        (SCHEMA_DIR / name).write_text(render(build), encoding="utf-8")
        print(f"wrote {(SCHEMA_DIR / name).relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()

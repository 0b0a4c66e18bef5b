"""The JSON manifest beside each published artifact, and the candidates.json index per profile.

Both documents are pydantic models (`ManifestDoc`, `CandidatesDoc`): the converters build and
write them through the model, the controller reads them back through it (`models add`), and
docs/schemas/ holds their JSON Schema. A change of shape is a new `schema` version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from converters._files import atomic_write_bytes, sha256_file
from firmware_profiles.validation import rule_error

MANIFEST_SCHEMA = "edgefleet.artifact-manifest/v1"
CANDIDATES_SCHEMA = "edgefleet.candidates/v1"
CANDIDATES_FILE = "candidates.json"
CANDIDATES_DIR = "candidates"

# A file beside the manifest: a bare name, so a manifest cannot point outside its directory.
def _bare_name(value: str) -> str:
    """Refuse `.` and `..`: the pattern already refuses separators."""
    if value in (".", ".."):
        raise rule_error("", f"must be a file name, got {value!r}")
    return value


FileName = Annotated[
    str,
    Field(min_length=1, max_length=255, pattern=r"^[^/\\\x00]+$", strict=True),
    AfterValidator(_bare_name),
]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", strict=True)]
Text = Annotated[str, Field(min_length=1, strict=True)]


class _Doc(BaseModel):
    """Frozen, and refuses keys it does not know (a typo or a newer format is an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class GoldenRef(_Doc):
    """The golden data (.golden.npz) the device's self-test compares outputs with."""

    file: FileName = Field(description="The .golden.npz beside the manifest")
    sha256: Sha256 | None = Field(None, description="sha256 of the file (written by optimize)")
    size_bytes: int | None = Field(None, ge=0, description="Size of the file")
    computed_with: str | None = Field(
        None,
        description="The model the goldens were computed with: the artifact itself, or the "
        "integer model before compilation when the host cannot run the compiled ops",
    )


class SourceRef(_Doc):
    """The trained model an artifact was made from."""

    model: Text = Field(description="The source model's file or directory name")
    sha256: Sha256 = Field(description="sha256 of the file (of a SavedModel: of its files)")


class ManifestDoc(_Doc):
    """`<artifact>.manifest.json`: identity, provenance and measured metrics of one artifact.

    `models add` needs schema, file, sha256, recipe and profile (required); the rest is
    provenance that `optimize` always writes and hand-written manifests may leave out.
    """

    schema_: Literal["edgefleet.artifact-manifest/v1"] = Field(
        alias="schema", description="Format and version of this document"
    )
    file: FileName = Field(description="The .tflite artifact beside this manifest")
    sha256: Sha256 = Field(description="sha256 of the artifact; `models add` checks it")
    size_bytes: int | None = Field(None, ge=1, description="Size of the artifact")
    recipe: Text = Field(description="The quantization recipe that made it (int8, fp16, …)")
    profile: Text = Field(description="The device profile it was built and checked for")
    source: SourceRef | None = Field(None, description="The trained model it was made from")
    io: dict[str, Any] = Field(
        default_factory=dict,
        description="Input and output tensors: name, dtype, shape, quantization",
    )
    compiler: dict[str, Any] = Field(
        default_factory=dict,
        description="The compiler that ran (kind, options, NPU op share, estimates)",
    )
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Host measurements: fidelity, accuracy, size, latency"
    )
    checks: list[dict[str, Any]] = Field(
        default_factory=list, description="The profile checks and their outcome"
    )
    golden: GoldenRef | None = Field(None, description="The golden data, if any")
    tools: dict[str, str] = Field(
        default_factory=dict, description="Versions of the tools that made the artifact"
    )

    def to_json(self) -> str:
        """The document as written: sorted keys, two-space indent, a final newline."""
        # Python mode: free-form values (an infinite SNR) are written as json writes them.
        return json.dumps(self.model_dump(by_alias=True), indent=2, sort_keys=True) + "\n"


class CandidateEntry(_Doc):
    """One ranked (artifact, runtime options) pair a rollout may try on canaries."""

    rank: int = Field(ge=1, strict=True, description="1 = the profile's default artifact")
    variant: str | None = Field(None, description="The variant's name (recipe and options)")
    recipe: Text = Field(description="The quantization recipe")
    threads: int | None = Field(
        strict=True, description="CPU threads to run with; null when compiled for an NPU"
    )
    manifest: Text = Field(description="Its manifest, relative to the candidates.json")
    host: dict[str, Any] = Field(
        default_factory=dict, description="The host's numbers: latency, fidelity, size, why"
    )

    @field_validator("threads")
    @classmethod
    def _threads_in_range(cls, value: int | None, info: ValidationInfo) -> int | None:
        """1 or more; the reader passes the agent's limit as context (converters cannot know it)."""
        top = (info.context or {}).get("max_threads")
        if value is not None and (value < 1 or (top is not None and value > top)):
            raise rule_error("", f"must be null or 1..{top if top is not None else 'N'}")
        return value


class CandidatesDoc(_Doc):
    """`<profile>/candidates.json`: the ranked artifacts of one profile, rank 1 first."""

    schema_: Literal["edgefleet.candidates/v1"] = Field(
        alias="schema", description="Format and version of this document"
    )
    profile: Text = Field(description="The device profile")
    candidates: list[CandidateEntry] = Field(description="Ranked candidates; may be empty")

    @model_validator(mode="after")
    def _ranks_unique(self) -> CandidatesDoc:
        """Ranks are unique: each names one (artifact, threads) pair."""
        seen: set[int] = set()
        for i, entry in enumerate(self.candidates):
            if entry.rank in seen:
                raise rule_error(
                    f"candidates[{i}].rank", f"must be unique, got {entry.rank} twice"
                )
            seen.add(entry.rank)
        return self

    def to_json(self) -> str:
        """The document as written: sorted keys, two-space indent, a final newline."""
        # Python mode: free-form values (an infinite SNR) are written as json writes them.
        return json.dumps(self.model_dump(by_alias=True), indent=2, sort_keys=True) + "\n"


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
        """The manifest document, checked by its model: sha256 and sizes read from the files."""
        return self.doc().model_dump(by_alias=True)

    def doc(self) -> ManifestDoc:
        """The manifest as its model (validated): sha256 and size are read from the files."""
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
        return ManifestDoc.model_validate({
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
        })  # fmt: skip

    def write(self, path: Path | None = None) -> Path:
        """Write the manifest as `<artifact>.manifest.json` (or `path`), atomically."""
        target = Path(path) if path else self.artifact.with_suffix(".manifest.json")
        return atomic_write_bytes(target, self.doc().to_json().encode())


def write_candidates(profile_dir: Path, profile: str, candidates: list[dict[str, Any]]) -> Path:
    """Write `<profile_dir>/candidates.json` atomically: the ranked artifacts a rollout may try."""
    doc = CandidatesDoc.model_validate(
        {"schema": CANDIDATES_SCHEMA, "profile": profile, "candidates": candidates}
    )
    return atomic_write_bytes(Path(profile_dir) / CANDIDATES_FILE, doc.to_json().encode())


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

"""Publish stage: copy the selected variant (and ranked candidates) with goldens and manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from converters._files import atomic_write_bytes
from converters.golden import build_golden, golden_cap
from converters.manifest import CANDIDATES_DIR, ArtifactManifest, write_candidates
from converters.report import Candidate, VariantReport, candidate_threads, rank_candidates
from converters.stages.select import SelectStage
from converters.tflite_inspect import inspect_bytes

# CompileResult fields the manifest's compiler section leaves out (path; kind is already there).
_NOT_IN_MANIFEST = ("artifact", "compiler")


class PublishStage(SelectStage):
    """Writing artifacts, golden data, manifests and candidates.json for a profile."""

    source_sha: str
    max_candidates: int

    def clear_stale(self, dest_dir: Path) -> None:
        """Remove a previous run's published files for this model from `dest_dir`."""
        for stale in dest_dir.glob(f"{self.stem}-*"):
            if stale.is_file():
                stale.unlink()

    def publish(self, profile: Any, chosen: VariantReport, dest_dir: Path) -> None:
        """Copy a variant's artifact into `dest_dir`, with golden data and a manifest."""
        var = self.variants[chosen.variant]
        assert var.path is not None and chosen.compiled is not None and chosen.evaluation
        compiled = chosen.compiled
        suffix = "" if compiled.compiler == "none" else f"-{compiled.compiler}"
        artifact = dest_dir / f"{self.stem}-{chosen.variant}{suffix}.tflite"
        atomic_write_bytes(artifact, Path(compiled.artifact).read_bytes())
        assert self.val_x is not None
        written = build_golden(
            var.path,
            self.val_x,
            artifact.with_suffix(".golden.npz"),
            max_bytes=golden_cap(artifact.stat().st_size),
        )
        if written.note:
            self.notes.append(f"{profile.id} {chosen.variant}: {written.note}")
        golden = written.path
        info = inspect_bytes(var.path.read_bytes())
        manifest = ArtifactManifest(
            artifact=artifact,
            recipe=chosen.recipe,
            profile=profile.id,
            source_model=self.model_path.name,
            source_sha256=self.source_sha,
            metrics={
                **chosen.evaluation.to_dict(),
                **chosen.extra_metrics,
                "latency_ms": chosen.latency_ms,
                "latency_source": chosen.latency_source,
            },
            checks=[c.to_dict() for c in chosen.checks],
            compiler={
                "kind": compiled.compiler,
                "profile_kind": profile.compiler.kind,
                "options": dict(profile.compiler.options) if compiled.compiler != "none" else {},
                **{k: v for k, v in compiled.to_dict().items() if k not in _NOT_IN_MANIFEST},
            },
            io={
                "inputs": [t.to_dict() for t in info.inputs],
                "outputs": [t.to_dict() for t in info.outputs],
            },
            golden=golden,
            golden_model=var.path.name,
            tools=tool_versions(),
        )
        chosen.artifact, chosen.golden, chosen.manifest = artifact, golden, manifest.write()

    def publish_candidates(
        self, profile: Any, chosen: VariantReport | None, passing: list[VariantReport]
    ) -> list[Candidate]:
        """Publish the top-K candidates' other variants to candidates/ and write candidates.json.

        Each variant is published once, even when it is ranked with two thread counts.
        """
        profile_dir = self.out_dir / profile.id
        self.clear_stale(profile_dir / CANDIDATES_DIR)
        ranked: list[Candidate] = []
        if chosen is not None:
            kind = chosen.compiled.compiler if chosen.compiled else profile.compiler.kind
            threads = candidate_threads(kind, profile.cpu.cores)
            pairs = rank_candidates(chosen, passing, threads, self.max_candidates)
            for rank, (variant, n_threads) in enumerate(pairs, start=1):
                if variant.manifest is None:
                    self.publish(profile, variant, profile_dir / CANDIDATES_DIR)
                assert variant.manifest is not None
                relative = variant.manifest.relative_to(profile_dir).as_posix()
                ranked.append(Candidate(rank, variant, n_threads, relative))
        write_candidates(profile_dir, profile.id, [c.to_dict() for c in ranked])
        return ranked


def tool_versions() -> dict[str, str]:
    """Versions of the tools that made an artifact (recorded in its manifest)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in (
        "tensorflow-cpu",
        "tensorflow",
        "ai-edge-litert",
        "ethos-u-vela",
        "litert-quantizer",
    ):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out

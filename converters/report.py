"""What optimize() returns: per-profile and per-variant reports, and progress events."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.checks import CheckResult
from converters.compilers import CompileResult
from converters.evaluate import Evaluation


@dataclass(frozen=True)
class ProgressEvent:
    """One step of the run, for a live table: profile, stage, recipe and a short message."""

    profile: str
    stage: str
    recipe: str | None = None
    message: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class VariantReport:
    """One recipe tried for one profile: what happened to it and why."""

    recipe: str
    variant: str = ""  # the built variant: the recipe, or e.g. "dynamic-pt" for old runtimes
    status: str = "pending"  # selected | rejected | failed | dropped (duplicate of another)
    reason: str = ""
    latency_ms: float | None = None
    latency_source: str | None = None  # host | vela
    evaluation: Evaluation | None = None
    checks: list[CheckResult] = field(default_factory=list)
    compiled: CompileResult | None = None
    artifact: Path | None = None
    manifest: Path | None = None
    golden: Path | None = None
    extra_metrics: dict[str, Any] = field(default_factory=dict)  # e.g. the pruning behind it

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "recipe": self.recipe,
            "variant": self.variant or self.recipe,
            "status": self.status,
            "reason": self.reason,
            "latency_ms": self.latency_ms,
            "latency_source": self.latency_source,
            "evaluation": self.evaluation.to_dict() if self.evaluation else None,
            "checks": [c.to_dict() for c in self.checks],
            "compiler": self.compiled.to_dict() if self.compiled else None,
            "artifact": str(self.artifact) if self.artifact else None,
            "manifest": str(self.manifest) if self.manifest else None,
            "golden": str(self.golden) if self.golden else None,
            **self.extra_metrics,
        }


def candidate_threads(compiler_kind: str, cores: int) -> list[int | None]:
    """Thread options a candidate is tried with: 1 and all cores on CPU, None when compiled.

    A compiled graph (Vela, Edge TPU) runs on the NPU, so the CPU thread count is not a choice.
    """
    if compiler_kind != "none":
        return [None]
    return [1, cores] if cores > 1 else [1]


def rank_candidates(
    selected: VariantReport,
    passing: list[VariantReport],
    threads: list[int | None],
    limit: int,
) -> list[tuple[VariantReport, int | None]]:
    """The top `limit` (variant, threads) pairs: the selection first, then by latency.

    The other passing variants follow in ascending latency (a missing one last, ties in the
    order they were tried); each variant is paired with every thread option in turn.
    """
    others = sorted(
        (v for v in passing if v is not selected),
        key=lambda v: (v.latency_ms is None, v.latency_ms or 0.0, passing.index(v)),
    )
    pairs = [(v, t) for v in [selected, *others] for t in threads]
    return pairs[:limit]


@dataclass(frozen=True)
class Candidate:
    """One entry of candidates.json: a published artifact plus its runtime options."""

    rank: int
    variant: VariantReport
    threads: int | None
    manifest: str  # relative to <out>/<profile>/

    def to_dict(self) -> dict[str, Any]:
        """The candidates.json entry: identity, runtime options and the host's numbers."""
        v, ev = self.variant, self.variant.evaluation
        return {
            "rank": self.rank,
            "variant": v.variant or v.recipe,
            "recipe": v.recipe,
            "threads": self.threads,
            "manifest": self.manifest,
            "host": {
                "latency_ms": v.latency_ms,
                "latency_source": v.latency_source,
                "accuracy_drop_points": ev.accuracy_drop_points if ev else None,
                "top1_agreement": ev.top1_agreement if ev else None,
                "size_bytes": ev.size_bytes if ev else None,
                "compressed_bytes": ev.compressed_bytes if ev else None,
                "snr_db": ev.snr_db if ev else None,
                "outputs": [o.to_dict() for o in ev.outputs] if ev else [],
                "reason": v.reason,
            },
        }


@dataclass
class ProfileReport:
    """The outcome for one profile: the selected variant, or why there is none."""

    profile: str
    status: str = "pending"  # ok | no_variant | error
    error: str | None = None
    variants: list[VariantReport] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)  # ranked, rank 1 = selected
    warnings: list[str] = field(default_factory=list)  # e.g. a compiler that is not installed

    @property
    def selected(self) -> VariantReport | None:
        """The variant chosen for this profile, if any."""
        return next((v for v in self.variants if v.status == "selected"), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        chosen = self.selected
        return {
            "profile": self.profile,
            "status": self.status,
            "error": self.error,
            "selected": chosen.recipe if chosen else None,
            "variants": [v.to_dict() for v in self.variants],
            "candidates": [c.to_dict() for c in self.candidates],
            "warnings": list(self.warnings),
        }


@dataclass
class OptimizeReport:
    """Everything `edgefleet optimize` prints: one ProfileReport per profile."""

    model: Path
    out_dir: Path
    max_accuracy_drop: float
    profiles: list[ProfileReport] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    pruning: dict[str, Any] | None = None  # PruneResult.to_dict() when --train was given

    @property
    def ok(self) -> bool:
        """True when every profile got an artifact."""
        return all(p.status == "ok" for p in self.profiles)

    @property
    def warnings(self) -> list[str]:
        """Every profile's warnings, prefixed with the profile id."""
        return [f"{p.profile}: {w}" for p in self.profiles for w in p.warnings]

    def summary(self) -> str:
        """The closing line: how many profiles got an artifact, and which did not and why."""
        total = len(self.profiles)
        missing = [p for p in self.profiles if p.status != "ok"]
        if not missing:
            return f"all {total} profile(s) have an artifact"
        why = "; ".join(f"{p.profile}: {_short(p.error or p.status)}" for p in missing)
        return f"{len(missing)} of {total} profile(s) have no artifact — {why}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for `--json`."""
        return {
            "model": str(self.model),
            "out_dir": str(self.out_dir),
            "max_accuracy_drop": self.max_accuracy_drop,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
            "warnings": self.warnings,
            "summary": self.summary(),
            "pruning": self.pruning,
            "profiles": [p.to_dict() for p in self.profiles],
        }


# A closing line names every failed profile; each reason is cut to this many characters.
SUMMARY_REASON_CHARS = 240


def _short(text: str) -> str:
    """One line of at most SUMMARY_REASON_CHARS characters."""
    line = " ".join(text.split())
    return line if len(line) <= SUMMARY_REASON_CHARS else line[: SUMMARY_REASON_CHARS - 1] + "…"

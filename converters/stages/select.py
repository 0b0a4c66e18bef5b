"""Select stage: among a profile's passing variants, pick the fastest and say why others lost."""

from __future__ import annotations

from typing import Any

from converters.evaluate import interleaved_latency
from converters.report import VariantReport
from converters.stages.compile import CompileStage
from converters.stages.convert import base_recipe

# Latencies within 5 % of the fastest are a tie: repeated interleaved host timings of the same
# digits model on this 2-core machine vary by about 3 %.
LATENCY_TIE = 0.05


class SelectStage(CompileStage):
    """Re-timing of competing host variants and the per-profile selection."""

    latency_cache: dict[tuple[str, ...], dict[str, float]]

    def remeasure_host_latency(self, reports: list[VariantReport]) -> None:
        """Re-time competing host-latency variants interleaved (shared across profiles)."""
        keys = tuple(sorted({r.variant for r in reports}))
        if len(keys) < 2 or self.val_x is None:
            return
        if keys not in self.latency_cache:
            paths = {k: self.variants[k].path for k in keys}
            self.latency_cache[keys] = interleaved_latency(
                {k: p for k, p in paths.items() if p is not None}, self.val_x
            )
        for r in reports:
            r.latency_ms = self.latency_cache[keys].get(r.variant, r.latency_ms)

    def select(self, profile: Any, reports: list[VariantReport]) -> VariantReport | None:
        """Pick the fastest passing variant; say why each other passing variant lost.

        Variants with fewer advisory failures come first. Among those, latencies within
        LATENCY_TIE of the fastest count as a tie (host timing noise on a shared machine is
        about that large), settled by the profile's preferred recipe, then by size.
        """
        passing = [r for r in reports if r.status == "passed"]
        if not passing:
            return None
        self.remeasure_host_latency([r for r in passing if r.latency_source == "host"])

        def advisory(r: VariantReport) -> list[str]:
            """Names of the non-blocking checks this variant failed."""
            return [c.name for c in r.checks if not c.ok]

        fewest = min(len(advisory(r)) for r in passing)
        field = [r for r in passing if len(advisory(r)) == fewest]
        fastest = min(r.latency_ms or float("inf") for r in field)
        tied = [r for r in field if (r.latency_ms or float("inf")) <= fastest * (1 + LATENCY_TIE)]
        preferred = profile.quantization.preferred

        def size(r: VariantReport) -> int:
            """Artifact size in bytes."""
            return r.evaluation.size_bytes if r.evaluation else 0

        def compressed(r: VariantReport) -> int:
            """Artifact size after gzip -9."""
            return (r.evaluation.compressed_bytes or 0) if r.evaluation else 0

        # gzip size before raw size: across recipes both rank alike, but a pruned variant's raw
        # size equals its unpruned twin's (± alignment bytes) and only compression shows its gain.
        best = min(
            tied,
            key=lambda r: (
                base_recipe(r.recipe) != preferred,
                compressed(r),
                size(r),
                r.latency_ms or 0.0,
            ),
        )
        best.status = "selected"
        why = "fastest" if best.latency_ms == fastest else "preferred/smallest within the tie"
        best.reason = (
            f"{why} passing variant: {best.latency_ms:.4f} ms ({best.latency_source}), "
            f"{size(best)} bytes ({compressed(best)} gzip), {best.reason}"
        )
        for other in passing:
            if other is best:
                continue
            other.status = "rejected"
            if len(advisory(other)) > fewest:
                other.reason = f"passes but has advisory failures ({', '.join(advisory(other))})"
            elif other in tied:
                other.reason = (
                    f"tied on latency ({other.latency_ms:.4f} ms vs {best.latency_ms:.4f} ms) "
                    f"and {best.recipe} is preferred or smaller (gzip, then raw)"
                )
            else:
                other.reason = (
                    f"slower: {other.latency_ms:.4f} ms vs {best.latency_ms:.4f} ms "
                    f"({best.recipe}, {best.latency_source})"
                )
        return best

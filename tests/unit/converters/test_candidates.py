"""Ranked candidates per profile (docs/closed-loop.md): candidates.json, published artifacts."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import firmware_profiles
from converters._files import sha256_file
from converters.digits import digits_keras
from converters.evaluate import verify_golden
from converters.manifest import CANDIDATES_SCHEMA, MANIFEST_SCHEMA
from converters.pipeline import optimize
from converters.report import OptimizeReport, ProfileReport, rank_candidates


def narrowed(profile_id: str, *allowed: str) -> firmware_profiles.Profile:
    """A real profile with its allowed recipes narrowed (to keep a test fast)."""
    profile = firmware_profiles.load(profile_id)
    quant = firmware_profiles.Quantization(preferred=allowed[0], allowed=tuple(allowed))
    return dataclasses.replace(profile, quantization=quant)


# rpi4 has 4 cores: every passing variant is a candidate with 1 and with 4 threads.
RPI4 = ("rpi4", "int8", "fp32", "dynamic")
VELA = ("corstone-300-u55", "int8", "int16x8")
# How select() words the reason of a variant that passed but was not selected.
PASSED = ("slower", "tied", "passes but")


@pytest.fixture(scope="module")
def run(cache_dir: Path, digits: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One optimize() with K=3 over a 4-core CPU profile and a Vela MCU profile."""
    calib, val = digits
    out = tmp_path_factory.mktemp("candidates")
    rep = optimize(
        digits_keras(cache_dir),
        [narrowed(*RPI4), narrowed(*VELA)],
        calib=calib,
        val=val,
        out_dir=out,
        candidates=3,
    )
    return rep, out


def profile_of(rep: OptimizeReport, profile_id: str) -> ProfileReport:
    """The report of one profile."""
    return next(p for p in rep.profiles if p.profile == profile_id)


def read_candidates(out: Path, profile_id: str) -> dict:
    """The candidates.json document of one profile."""
    return json.loads((out / profile_id / "candidates.json").read_text())


def test_cpu_profile_ranks_selection_then_threads(run: tuple) -> None:
    """Rank 1 is the selection with 1 thread, rank 2 the same with 4, rank 3 the next variant."""
    rep, out = run
    prof = profile_of(rep, "rpi4")
    assert prof.status == "ok" and prof.selected is not None
    doc = read_candidates(out, "rpi4")
    assert doc["schema"] == CANDIDATES_SCHEMA and doc["profile"] == "rpi4"
    cands = doc["candidates"]
    assert [c["rank"] for c in cands] == [1, 2, 3]
    assert [c["threads"] for c in cands] == [1, 4, 1]
    assert cands[0]["variant"] == cands[1]["variant"] == prof.selected.variant
    assert cands[0]["recipe"] == prof.selected.recipe
    assert cands[0]["manifest"] == prof.selected.manifest.name  # beside the selected artifact
    # Rank 3 is the fastest passing variant that was not selected.
    losers = [v for v in prof.variants if v.status == "rejected" and v.evaluation]
    passed = [v for v in losers if v.reason.startswith(PASSED)]
    fastest = min(passed, key=lambda v: v.latency_ms or float("inf"))
    assert cands[2]["variant"] == fastest.variant != prof.selected.variant
    assert cands[2]["manifest"].startswith("candidates/")
    host = cands[2]["host"]
    assert host["latency_ms"] == fastest.latency_ms and host["latency_source"] == "host"
    assert host["size_bytes"] == fastest.evaluation.size_bytes
    assert host["compressed_bytes"] == fastest.evaluation.compressed_bytes
    assert host["accuracy_drop_points"] <= 1.0 and 0.0 < host["top1_agreement"] <= 1.0
    assert host["reason"] == fastest.reason


def test_candidate_manifests_match_their_files(run: tuple) -> None:
    """Every candidate's manifest exists, its sha256 is the artifact's, its golden verifies."""
    _, out = run
    for profile_id in ("rpi4", "corstone-300-u55"):
        for cand in read_candidates(out, profile_id)["candidates"]:
            manifest_path = out / profile_id / cand["manifest"]
            manifest = json.loads(manifest_path.read_text())
            assert manifest["schema"] == MANIFEST_SCHEMA
            assert manifest["recipe"] == cand["recipe"] and manifest["profile"] == profile_id
            artifact = manifest_path.parent / manifest["file"]
            assert manifest["sha256"] == sha256_file(artifact)
            assert manifest["size_bytes"] == artifact.stat().st_size
            golden = manifest_path.parent / manifest["golden"]["file"]
            assert manifest["golden"]["sha256"] == sha256_file(golden)
            reference = out / "variants" / manifest["golden"]["computed_with"]
            assert verify_golden(reference, golden) <= 1.0


def test_candidates_dir_holds_each_other_variant_once(run: tuple) -> None:
    """candidates/ has exactly the non-selected ranked variants: artifact, golden, manifest."""
    _, out = run
    cands = read_candidates(out, "rpi4")["candidates"]
    others = {c["manifest"] for c in cands if c["manifest"].startswith("candidates/")}
    assert len(others) == 1
    files = sorted(p.name for p in (out / "rpi4" / "candidates").iterdir())
    stem = Path(next(iter(others))).name.removesuffix(".manifest.json")
    assert files == sorted(f"{stem}{s}" for s in (".golden.npz", ".manifest.json", ".tflite"))


def test_vela_profile_has_no_thread_option(run: tuple) -> None:
    """A compiled profile's candidates have threads null, one per passing variant."""
    rep, out = run
    prof = profile_of(rep, "corstone-300-u55")
    cands = read_candidates(out, "corstone-300-u55")["candidates"]
    assert [(c["variant"], c["threads"]) for c in cands] == [("int8", None), ("int16x8", None)]
    assert cands[0]["variant"] == prof.selected.variant
    assert all(c["host"]["latency_source"] == "vela" for c in cands)
    latencies = [c["host"]["latency_ms"] for c in cands[1:]]
    assert latencies == sorted(latencies)


def test_report_json_carries_the_candidates(run: tuple) -> None:
    """to_dict() (the --json output) lists the same candidates as candidates.json."""
    rep, out = run
    d = json.loads(json.dumps(rep.to_dict()))
    for p in d["profiles"]:
        assert p["candidates"] == read_candidates(out, p["profile"])["candidates"]


def test_full_ranking_alternates_threads(run: tuple) -> None:
    """Uncut, the rpi4 list pairs every passing variant with 1 then 4 threads, by latency."""
    rep, _ = run
    prof = profile_of(rep, "rpi4")
    passing = [v for v in prof.variants if v.status == "selected" or v.reason.startswith(PASSED)]
    assert len(passing) >= 2
    pairs = rank_candidates(prof.selected, passing, [1, 4], limit=100)
    assert [t for _, t in pairs] == [1, 4] * len(passing)
    assert pairs[0][0] is pairs[1][0] is prof.selected
    later = [v.latency_ms for v, _ in pairs[2::2]]
    assert later == sorted(later)


def test_one_candidate_and_stale_removal(
    run: tuple, digits: tuple, cache_dir: Path, tmp_path: Path
) -> None:
    """Re-running with K=1 over a K=3 tree leaves one entry and an empty candidates/."""
    _, out = run
    calib, val = digits
    tree = tmp_path / "out"
    shutil.copytree(out, tree)
    assert any((tree / "rpi4" / "candidates").iterdir())
    rep = optimize(
        digits_keras(cache_dir),
        [narrowed("rpi4", "int8", "fp32")],
        calib=calib,
        val=val,
        out_dir=tree,
        candidates=1,
    )
    prof = rep.profiles[0]
    cands = read_candidates(tree, "rpi4")["candidates"]
    assert [(c["rank"], c["threads"]) for c in cands] == [(1, 1)]
    assert cands[0]["variant"] == prof.selected.variant
    assert (tree / "rpi4" / cands[0]["manifest"]).is_file()
    assert list((tree / "rpi4" / "candidates").iterdir()) == []
    assert [c.to_dict() for c in prof.candidates] == cands


def test_candidates_below_one_are_refused(cache_dir: Path, tmp_path: Path) -> None:
    """K=0 is a ValueError naming the option, raised before any work."""
    with pytest.raises(ValueError, match="candidates"):
        optimize(digits_keras(cache_dir), [narrowed(*RPI4)], out_dir=tmp_path, candidates=0)
    assert not any(tmp_path.iterdir())


def test_no_passing_variant_writes_an_empty_list(cache_dir: Path, tmp_path: Path) -> None:
    """Without --calib int8 fails on the U55: candidates.json is written with no entries."""
    rep = optimize(
        digits_keras(cache_dir), [narrowed("corstone-300-u55", "int8")], out_dir=tmp_path
    )
    assert rep.profiles[0].status == "no_variant" and rep.profiles[0].candidates == []
    doc = read_candidates(tmp_path, "corstone-300-u55")
    assert doc == {"schema": CANDIDATES_SCHEMA, "profile": "corstone-300-u55", "candidates": []}

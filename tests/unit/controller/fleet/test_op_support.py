"""Op support from the runtimes: the generated table, load checks, custom ops refused early."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import firmware_profiles
from agent.protocol import DeviceFacts, Hello
from controller.cli.main import app
from controller.fleet.registry import Fleet, FleetError
from converters import op_support
from converters.checks import custom_op_problem, run_checks
from tests.paths import REPO_ROOT, TEST_DATA

DATA = TEST_DATA
CUSTOM = DATA / "conv2d_transpose_bias.tflite"
OP = "Convolution2DTransposeBias"
ROOT = REPO_ROOT
SLIM_PYTHON = Path(os.environ.get("EDGEFLEET_SLIM_PYTHON", ROOT / ".venv-slim" / "bin" / "python"))
if not SLIM_PYTHON.exists():
    SLIM_PYTHON = Path("/work/main/.venv-slim/bin/python")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own load cache and no configured runtime interpreters."""
    monkeypatch.setenv(op_support.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(op_support.RUNTIME_PYTHONS_ENV, raising=False)


def _by_name(model: Path, profile: str) -> dict[str, object]:
    """Check results of `model` for `profile`, by check name."""
    return {c.name: c for c in run_checks(model, firmware_profiles.load(profile))}


def test_table_names_its_source_and_both_runtimes() -> None:
    """The committed table comes from the runtimes' resolvers, litert and tflite-runtime."""
    doc = json.loads(op_support.REGISTRY_PATH.read_text())
    assert "scripts/gen_op_registry.py" in doc["source"] and "OpResolver" in doc["source"]
    labels = {e.label for e in op_support.registry()}
    assert {"ai-edge-litert 2.3.0", "tflite-runtime 2.14.0"} <= labels
    old = op_support.registry_entry("tflite-runtime", "2.14.0")
    new = op_support.registry_entry("ai-edge-litert", "2.3.0")
    assert old is not None and new is not None
    assert OP in new.custom and OP not in old.custom
    assert old.builtin["PRELU"] >= 1 and old.builtin["FULLY_CONNECTED"] < 12


@pytest.mark.parametrize(
    ("runtime", "version", "table"),
    [
        ("tflite-runtime", "2.16.2", "tflite-runtime 2.14.0"),  # nearest older: support only grows
        ("android-litert", "2.3.0", "ai-edge-litert 2.3.0"),  # same numbering as the wheel
        ("tflite-runtime", "2.10.0", None),  # older than any table
    ],
)
def test_registry_entry_is_the_nearest_older_table(
    runtime: str, version: str, table: str | None
) -> None:
    entry = op_support.registry_entry(runtime, version)
    assert (entry.label if entry else None) == table


def test_custom_op_is_refused_where_the_runtime_lacks_it() -> None:
    """rpi4 (tflite-runtime 2.14) refuses, naming op and runtime; rpi5 (litert 2.3) loads it."""
    rpi4 = _by_name(CUSTOM, "rpi4")["custom_ops_registered"]
    assert not rpi4.ok and rpi4.blocking  # type: ignore[attr-defined]
    assert f"custom op {OP} is not in tflite-runtime 2.14.0" in rpi4.detail  # type: ignore[attr-defined]
    rpi5 = _by_name(CUSTOM, "rpi5")["custom_ops_registered"]
    assert rpi5.ok, rpi5.detail  # type: ignore[attr-defined]
    assert rpi5.detail == f"{OP} resolved: loads on ai-edge-litert 2.3.0"  # type: ignore[attr-defined]
    micro = _by_name(CUSTOM, "corstone-300-u55")["custom_ops_registered"]
    assert not micro.ok and "tflite-micro" in micro.detail  # type: ignore[attr-defined]


def test_delegate_ops_are_not_custom_op_failures() -> None:
    """A profile compiled for the Edge TPU runs edgetpu-custom-op through its delegate."""
    assert custom_op_problem(CUSTOM, "tflite-runtime", "2.14.0", "none")
    assert custom_op_problem(DATA / "tiny_int8.tflite", "tflite-runtime", "2.14.0") is None


@pytest.mark.skipif(not SLIM_PYTHON.exists(), reason="no tflite-runtime 2.14 venv (.venv-slim)")
def test_load_check_on_the_real_old_runtime_is_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With tflite-runtime 2.14 reachable, the check loads the model there and quotes it."""
    monkeypatch.setenv(op_support.RUNTIME_PYTHONS_ENV, f"tflite-runtime={SLIM_PYTHON}")
    check = _by_name(CUSTOM, "rpi4")["custom_ops_registered"]
    assert not check.ok  # type: ignore[attr-defined]
    assert "load check: Encountered unresolved custom op" in check.detail  # type: ignore[attr-defined]
    cache = json.loads((tmp_path / "cache" / "runtime-loads.json").read_text())
    assert any(k.endswith(":tflite:2.14.0") and not v["ok"] for k, v in cache.items())
    good = _by_name(DATA / "tiny_int8.tflite", "rpi4")["op_versions_supported"]
    assert good.ok and "loads on tflite-runtime 2.14.0 (load check)" in good.detail  # type: ignore[attr-defined]
    # Served from the cache: no interpreter needed any more.
    monkeypatch.setenv(op_support.RUNTIME_PYTHONS_ENV, "tflite-runtime=/nonexistent/python")
    again = _by_name(CUSTOM, "rpi4")["custom_ops_registered"]
    assert again.detail == check.detail  # type: ignore[attr-defined]


def test_optimize_check_refuses_the_custom_op_in_one_line() -> None:
    """`optimize --check` exits 1 and the rpi4 row names the op and the runtime."""
    result = CliRunner().invoke(
        app, ["optimize", str(CUSTOM), "--profile", "rpi4,rpi5", "--check", "--json"]
    )
    assert result.exit_code == 1, result.output
    checks = {p: {c["name"]: c for c in rs} for p, rs in json.loads(result.output).items()}
    assert OP in checks["rpi4"]["custom_ops_registered"]["detail"]
    assert checks["rpi5"]["custom_ops_registered"]["ok"] is True


def test_models_add_and_deploy_refuse_before_any_device_sees_it(fleet: Fleet) -> None:
    """models add --profile rpi4 and deploy to a tflite-runtime 2.14 device both refuse."""
    with pytest.raises(FleetError, match=f"cannot run on profile rpi4: custom op {OP}"):
        fleet.add_artifact(CUSTOM, name="ct", version="1", profile="rpi4")
    assert fleet.add_artifact(CUSTOM, name="ct", version="2", profile="rpi5").sha256
    facts = DeviceFacts("aarch64", "Linux", 4, 3792, "tflite-runtime", "2.14.0", "3.11.2")
    fleet.record_hello(Hello(device_id="old", agent_version="0.1.0", facts=facts))
    with pytest.raises(FleetError, match=f"cannot run on device old: custom op {OP} is not in"):
        fleet.deploy(CUSTOM, devices=["old"], name="ct", version="3")
    assert fleet.db.query("SELECT id FROM deployments") == []
    with pytest.raises(FleetError, match="unknown model"):
        fleet.model("ct:3")


@pytest.mark.slow
def test_prelu_without_metadata_passes_every_profile(cache_dir: Path) -> None:
    """PRELU v1 with no min_runtime_version: both runtimes resolve it, so no profile refuses."""
    from tests.model_fixtures import prelu_no_metadata_tflite

    model = prelu_no_metadata_tflite(cache_dir)
    for profile in firmware_profiles.load_all().values():
        check = _by_name(model, profile.id)["op_versions_supported"]
        assert check.ok, (profile.id, check.detail)  # type: ignore[attr-defined]


@pytest.mark.slow
def test_optimize_refuses_the_custom_op_only_where_the_runtime_lacks_it(tmp_path: Path) -> None:
    """optimize: rpi4 ends with no artifact and the reason names op and runtime; rpi5 ships it."""
    from converters.pipeline import optimize

    profiles = [firmware_profiles.load(p) for p in ("rpi4", "rpi5")]
    rep = optimize(CUSTOM, profiles, out_dir=tmp_path / "out")
    rpi4, rpi5 = rep.profiles
    assert rpi4.status == "no_variant"
    original = next(v for v in rpi4.variants if v.recipe == "original")
    assert original.status == "rejected"
    assert f"custom op {OP} is not in tflite-runtime 2.14.0" in original.reason
    assert rpi5.status == "ok" and rpi5.selected is not None

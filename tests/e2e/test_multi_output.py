"""A two-output fp16 .tflite with no signature, optimized, registered and rolled out to a real
agent whose golden self-test checks both outputs; a wrong second output keeps the old model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import firmware_profiles
from agent.golden import parse_golden
from controller.fleet.rollout.policy import Policy, parse_waves
from tests.e2e.conftest import AgentProcess, RunningController, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROFILE = "x86-64-gateway"  # a litert CPU profile: the agent here runs ai-edge-litert
TIMEOUT_S = 120  # optimize's artifacts are bigger than the tiny fixtures; first self-test is cold


def _sha(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The fp16 signature-less detector (tests/pretrained_models.py) through optimize --calib."""
    from converters.pipeline import optimize
    from tests.pretrained_models import write_pretrained_fixtures

    work = tmp_path_factory.mktemp("multi_output")
    fixtures = write_pretrained_fixtures(work / "fixtures")
    report = optimize(
        fixtures["detector_fp16"],
        [firmware_profiles.load(PROFILE)],
        calib=fixtures["calib"],
        out_dir=work / "out",
    )
    prof = report.profiles[0]
    assert prof.status == "ok", prof.to_dict()
    return {"out": work / "out", "selected": prof.selected, "report": report, "work": work}


def _events(ctl: RunningController, device_id: str) -> list[dict[str, Any]]:
    """The device's recent events."""
    return ctl.fleet.device_detail(device_id)["events"]


def test_two_output_model_rolls_out_with_goldens_checking_both(
    controller: RunningController,
    start_agent: Callable[..., AgentProcess],
    optimized: dict[str, Any],
) -> None:
    selected = optimized["selected"]
    golden = parse_golden(selected.golden)
    assert len(golden.outputs) == 2 and golden.version == 2
    assert len(selected.evaluation.outputs) == 2  # both outputs were judged on the host
    agent = start_agent("mo-a", profile=PROFILE)
    wait_until(
        lambda: any(
            d["id"] == "mo-a" and d["online"] and d["facts"] for d in controller.fleet.devices()
        ),
        30,
        "hello from mo-a",
    )
    controller.fleet.add_model(optimized["out"], name="det", version="1")
    policy = Policy(waves=parse_waves("100"), device_timeout_s=TIMEOUT_S)
    ro = controller.fleet.start_rollout("det:1", f"profile:{PROFILE}", policy)
    final = wait_until(
        lambda: (
            (r := controller.fleet.deployment(ro["id"]))["state"] in ("completed", "aborted") and r
        ),
        TIMEOUT_S,
        "the rollout of the two-output model",
    )
    assert final["counts"] == {"succeeded": 1}, (final, agent.log()[-3000:])
    device = controller.fleet.device("mo-a")
    assert device["model_sha256"] == _sha(selected.artifact)
    activated = [e["message"] for e in _events(controller, "mo-a") if "activated" in e["message"]]
    assert any("2 outputs" in m and "output 1" in m for m in activated), activated

    # Negative: another build of the model whose golden's second output is wrong.
    variants = sorted((optimized["out"] / "variants").glob("*.tflite"))
    other = next(v for v in variants if _sha(v) != _sha(selected.artifact))
    from converters.golden import write_golden

    bad = write_golden(other, golden_inputs(selected.golden), optimized["work"] / "bad.npz")
    assert bad is not None
    with np.load(bad) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["outputs_1"] = arrays["outputs_1"].copy()
    arrays["outputs_1"].flat[0] += 10 * float(arrays["atol_1"]) + 1.0
    np.savez(bad, **arrays)
    dep = controller.fleet.deploy(other, devices=["mo-a"], golden=bad, name="det", version="2")
    done = wait_until(
        lambda: (
            (d := controller.fleet.deployment(dep["id"]))["devices"][0]["state"]
            in ("succeeded", "failed")
            and d
        ),
        TIMEOUT_S,
        "the deployment with a wrong second output",
    )
    detail = done["devices"][0]
    assert detail["state"] == "failed", detail
    assert "output 1" in detail["detail"] and "max abs error" in detail["detail"], detail
    device = controller.fleet.device("mo-a")
    assert device["model_sha256"] == _sha(selected.artifact), "the previous model keeps serving"
    assert agent.alive
    manifest = json.loads(Path(selected.manifest).read_text())
    assert len(manifest["metrics"]["outputs"]) == 2


def golden_inputs(path: Path) -> np.ndarray:
    """The float images behind a golden's (float) inputs."""
    return parse_golden(path).inputs[0].astype(np.float32)

"""The agent on emulated Debian 12 ARM userlands against `edgefleet up` on the host, end to end.

Per architecture (arm64 with ai-edge-litert, armhf with tflite-runtime 2.14): the agent installed
as docs/packaging.md tells a user, onboarded with the bundle `edgefleet devices register` writes,
runs as a real process under qemu-user. It takes two signed rollouts whose goldens are checked on
the emulated CPU (fp32, then int8), benchmarks them, and refuses a model whose golden self-test
fails, keeping the previous one. Asserts function only: emulated latencies mean nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, load_config
from tests.arm.conftest import Controller
from tests.arm.userland import (
    AGENT_VENV,
    ARCHES,
    EXPECTED_ARCH,
    EXPECTED_RUNTIME,
    UserlandProcess,
)
from tests.polling import wait_until

pytestmark = [pytest.mark.arm, pytest.mark.e2e]

DATA = Path(__file__).resolve().parent.parent / "data"
# The profile a user picks for each board: a 64-bit Pi 4 and a Pi 3 B+ on 32-bit Raspberry Pi OS.
PROFILE = {"arm64": "rpi4", "armhf": "rpi3b-plus"}
# Where the bundle goes on the device (the path the register command's instructions use).
BUNDLE_ON_DEVICE = "/etc/edgefleet-agent"
# Emulated Python imports numpy and the runtime in ≈ 20-60 s: hello, then each self-test child.
ONLINE_TIMEOUT_S = 300
# One rollout: download, self-test child, activation, benchmark, all emulated.
ROLLOUT_TIMEOUT_S = 600
# Enough timed runs to produce percentiles; their values are not looked at (emulation).
BENCHMARK_RUNS = "10"


def _sha(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _onboard(ctl: Controller, device: str, profile: str, bundle: Path) -> AgentConfig:
    """Register the device and return its bundle's agent.toml.

    By hand until the register command writes a bundle that fits `up` (issue 19, part A).
    """
    from agent.config import dump_config

    ctl.cli("devices", "register", device, "--profile", profile, "--auth", "none")
    trusted = tuple(ctl.cli_json("keys", "show")["trusted"])
    config = AgentConfig(
        device_id=device,
        data_dir=Path("/var/lib/edgefleet-agent"),
        broker=ctl.broker_url,
        profile=profile,
        trusted_keys=trusted,
    )
    bundle.mkdir(mode=0o700)
    (bundle / "agent.toml").write_text(dump_config(config))
    return load_config(bundle / "agent.toml")


def _rollout(ctl: Controller, model: str, device: str, *, expect: str) -> dict[str, Any]:
    """Start a one-device rollout of `model` and return it once it reached `expect`."""
    started = ctl.cli_json(
        "rollout", "start", model, "--to", f"device:{device}", "--waves", "100",
        "--max-failures", "0", "--benchmark-runs", BENCHMARK_RUNS,
    )  # fmt: skip
    final = wait_until(
        lambda: (
            (r := ctl.cli_json("rollout", "status", started["id"]))["state"]
            in ("completed", "aborted")
            and r
        ),
        ROLLOUT_TIMEOUT_S,
        f"rollout of {model} to {device}",
        interval=2.0,
    )
    assert final["state"] == expect, final
    return final


def _serving(ctl: Controller, device: str, sha: str) -> dict[str, Any]:
    """The device once it reports `sha` as its model."""
    return wait_until(
        lambda: (d := ctl.cli_json("devices", "show", device))["model_sha256"] == sha and d,
        120,
        f"{device} to report {sha[:12]}",
        interval=1.0,
    )


@pytest.mark.parametrize("arch", ARCHES)
def test_onboarded_arm_agent_takes_signed_golden_rollouts_and_refuses_a_bad_model(
    arch: str, agent_userland: Any, controller_up: Controller, tmp_path: Path
) -> None:
    agent_userland(arch)
    ctl = controller_up
    device = f"pi-{arch}"
    bundle = tmp_path / "bundle"
    config = _onboard(ctl, device, PROFILE[arch], bundle)
    keys = ctl.cli_json("keys", "show")
    assert list(config.trusted_keys) == keys["trusted"], "the bundle must make the agent check sigs"
    data = tmp_path / "device-data"  # the device's data_dir, fresh for every run
    data.mkdir()
    agent = UserlandProcess(
        arch,
        [
            f"{AGENT_VENV}/bin/edgefleet-agent", "run",
            "--config", f"{BUNDLE_ON_DEVICE}/agent.toml", "--log-level", "DEBUG",
        ],
        tmp_path / "agent.log",
        binds=[f"{bundle}:{BUNDLE_ON_DEVICE}", f"{data}:{config.data_dir}"],
        env=["PYTHONUNBUFFERED=1"],
    )  # fmt: skip
    agent.start()
    try:
        _exercise(ctl, arch, device, agent)
    except BaseException:
        print(f"--- agent log ({arch}) ---\n{agent.log()[-8000:]}")
        print(f"--- controller log ---\n{ctl.log()[-4000:]}")
        raise
    finally:
        agent.terminate()


def _exercise(ctl: Controller, arch: str, device: str, agent: UserlandProcess) -> None:
    """Online with ARM facts, two signed golden-checked rollouts, then the refused bad model."""
    online = wait_until(
        lambda: (d := ctl.cli_json("devices", "show", device))["online"] and d["facts"] and d,
        ONLINE_TIMEOUT_S,
        f"{device} online with its facts",
        interval=1.0,
    )
    assert online["facts"]["arch"] == EXPECTED_ARCH[arch], online["facts"]
    assert online["runtime"] == EXPECTED_RUNTIME[arch], online
    assert online["profile"] == PROFILE[arch], online

    fp32, int8, nan = (DATA / f"tiny_{k}.tflite" for k in ("fp32", "int8", "nan"))
    for model, version in ((fp32, "1"), (int8, "2"), (nan, "3")):
        golden = model.with_suffix(".golden.npz")
        ctl.cli("models", "add", str(model), "--name", "tiny", "--version", version,
                "--golden", str(golden))  # fmt: skip

    # fp32, then int8: each golden is checked in the self-test child on the emulated CPU (the
    # int8 one is what caught qemu's `max` CPU computing wrong results), then a benchmark runs.
    for model, version in ((fp32, "1"), (int8, "2")):
        final = _rollout(ctl, f"tiny:{version}", device, expect="completed")
        (row,) = final["devices"]
        assert row["state"] == "succeeded", row
        assert row["result"]["p95_ms"] > 0, row  # a benchmark ran; its value is not a figure
        _serving(ctl, device, _sha(model))

    # A model whose golden self-test fails (NaN outputs): refused before activation, the rollout
    # aborts, and the device keeps serving int8.
    final = _rollout(ctl, "tiny:3", device, expect="aborted")
    (row,) = final["devices"]
    assert row["state"] == "failed" and row["stage"] == "self-testing", row
    assert "not finite" in row["detail"], row
    kept = _serving(ctl, device, _sha(int8))
    assert kept["online"], kept
    assert agent.alive, agent.log()[-3000:]
    # Everything arrived signed and verified: the agent reported no security event.
    security = [e for e in kept["events"] if e["kind"] == "security"]
    assert security == [], security

"""The agent on emulated Debian 12 ARM userlands against `edgefleet up` on the host, end to end.

Per architecture (arm64 with ai-edge-litert, armhf with tflite-runtime 2.14): the agent installed
as docs/packaging.md tells a user, onboarded with the bundle `edgefleet devices register` writes,
runs as a real process under qemu-user. It takes two signed rollouts whose goldens are checked on
the emulated CPU (fp32, then int8), benchmarks them, and refuses a model whose golden self-test
fails, keeping the previous one, and a forged unsigned desired state. Asserts function only:
emulated latencies mean nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from agent.protocol import Desired, Topics, dump, parse
from agent.protocol.config import AgentConfig, load_config
from tests.arm.conftest import Controller
from tests.arm.userland import (
    ARCHES,
    EXPECTED_ARCH,
    EXPECTED_RUNTIME,
    UserlandProcess,
    run_in_userland,
)
from tests.polling import wait_until

pytestmark = [pytest.mark.arm, pytest.mark.e2e]

DATA = Path(__file__).resolve().parent.parent / "data"
# The profile a user picks for each board: a 64-bit Pi 4 and a Pi 3 B+ on 32-bit Raspberry Pi OS.
PROFILE = {"arm64": "rpi4", "armhf": "rpi3b-plus"}
# The device user's home: the printed commands copy the bundle to ~ (root in the userland).
DEVICE_HOME = "/root"
# pip under emulation: the agent's wheel with its requirements already satisfied takes ≈ 1 min.
INSTALL_TIMEOUT_S = 900
# Emulated Python imports numpy and the runtime in ≈ 20-60 s: hello, then each self-test child.
ONLINE_TIMEOUT_S = 300
# One rollout: download, self-test child, activation, benchmark, all emulated.
ROLLOUT_TIMEOUT_S = 600
# Enough timed runs to produce percentiles; their values are not looked at (emulation).
BENCHMARK_RUNS = "10"


def _sha(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _onboard(
    ctl: Controller, arch: str, device: str, tmp_path: Path
) -> tuple[list[str], str, AgentConfig]:
    """`devices register`, then what it prints for the device, followed inside the userland.

    Returns the binds that stand for the copy to the device (the bundle in root's home, the
    data dir fresh for this run), the printed start command, and the bundle's config.
    """
    row = ctl.cli_json("devices", "register", device, "--profile", PROFILE[arch])
    config = load_config(Path(row["config"]))
    binds = [f"{tmp_path / 'device-data'}:/var/lib/edgefleet-agent"]  # as root (docs/agent.md)
    (tmp_path / "device-data").mkdir()
    run_line = None
    for line in (c for c in row["commands"] if not c.startswith("#")):
        line = line.removeprefix("sudo ")  # the userland's commands run as root
        if copy := re.fullmatch(r"scp -rp (\S+) DEVICE:(\S+)", line):
            binds.append(f"{copy[1]}:{DEVICE_HOME}/{copy[2]}")
        elif "edgefleet-agent run " in line:
            run_line = line
        elif "edgefleet-agent install-service" in line:
            continue  # the alternative to `run`: a systemd unit, and no systemd runs in a chroot
        else:
            done = run_in_userland(arch, ["sh", "-c", line], binds, timeout=INSTALL_TIMEOUT_S)
            assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
    assert run_line is not None and len(binds) == 2, row["commands"]
    return binds, run_line, config


def _rollout(ctl: Controller, model: str, device: str, *, expect: str) -> dict[str, Any]:
    """Start a one-device rollout of `model` and return it once it reached `expect`."""
    started = ctl.cli_json(
        "rollout", "start", model, "--to", f"device:{device}", "--waves", "100",
        "--max-failures", "0", "--benchmark-runs", BENCHMARK_RUNS,
    )  # fmt: skip
    final = wait_until(
        lambda: (
            (r := ctl.cli_json("rollout", "status", started["id"], ok=(0, 1)))["state"]
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


# The install steps, the agent's start and three emulated rollouts: ≈ 5 min per arch on a busy
# 2-core machine, well over pytest's default 300 s; 30 min bounds a slow CI runner.
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("arch", ARCHES)
def test_onboarded_arm_agent_takes_signed_golden_rollouts_and_refuses_a_bad_model(
    arch: str, pristine_userland: Any, controller_up: Controller, tmp_path: Path
) -> None:
    pristine_userland(arch)
    ctl = controller_up
    device = f"pi-{arch}"
    binds, run_line, config = _onboard(ctl, arch, device, tmp_path)
    assert list(config.trusted_keys) == ctl.cli_json("keys", "show")["trusted"], (
        "the bundle makes the agent follow only signed desired states"
    )
    agent = UserlandProcess(
        arch,
        ["sh", "-c", f"exec {run_line} --log-level DEBUG"],  # exec: our PID is the agent's
        tmp_path / "agent.log",
        binds=binds,
        env=["PYTHONUNBUFFERED=1"],
    )
    agent.start()
    try:
        _exercise(ctl, arch, device, agent, config.topic_root)
    except BaseException:
        print(f"--- agent log ({arch}) ---\n{agent.log()[-8000:]}")
        print(f"--- controller log ---\n{ctl.log()[-4000:]}")
        raise
    finally:
        agent.terminate()


def _exercise(
    ctl: Controller, arch: str, device: str, agent: UserlandProcess, topic_root: str
) -> None:
    """Online with ARM facts, two signed golden-checked rollouts, the refused bad model, then
    a refused forged desired state."""
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
    _forged_desired_is_refused(ctl, device, topic_root, _sha(int8))
    assert agent.alive, agent.log()[-3000:]


def _forged_desired_is_refused(ctl: Controller, device: str, topic_root: str, kept: str) -> None:
    """An unsigned desired state (the current one, newer generation, no signature) published
    retained on the device's topic: the agent's signature check (cryptography on this arch)
    refuses it with a security event, and the kept model serves on."""
    from paho.mqtt import publish, subscribe

    url = urlsplit(ctl.broker_url)
    topic = Topics(topic_root).desired(device)
    retained = subscribe.simple(topic, hostname=url.hostname, port=url.port, retained=True)
    current = parse(retained.payload, Desired)
    forged = dataclasses.replace(current, generation=current.generation + 10, sig=None)
    publish.single(topic, dump(forged), retain=True, hostname=url.hostname, port=url.port)
    event = wait_until(
        lambda: next(
            (e for e in ctl.cli_json("devices", "show", device)["events"]
             if e["kind"] == "security"),
            None,
        ),
        120,
        f"a security event from {device}",
        interval=1.0,
    )  # fmt: skip
    assert "unsigned desired state" in event["message"], event
    _serving(ctl, device, kept)

"""Walking skeleton end to end: real controller, real agent processes, real broker, real models."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.runtime import runtime_info
from tests.e2e.conftest import DATA, AgentProcess, RunningController, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.agent]

# First deployments include a cold interpreter import in the self-test child: allow for it.
DEPLOY_TIMEOUT_S = 60


def _sha(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _registered(ctl: RunningController, device_id: str) -> dict[str, Any] | None:
    """The device row once it said hello and is online."""
    rows = [d for d in ctl.fleet.devices() if d["id"] == device_id and d["online"]]
    return rows[0] if rows and rows[0]["facts"] else None


def _finished(ctl: RunningController, deployment_id: str) -> dict[str, Any] | None:
    """The deployment once every device reached a terminal state."""
    dep = ctl.fleet.deployment(deployment_id)
    done = all(d["state"] in ("succeeded", "failed") for d in dep["devices"])
    return dep if done else None


def _deploy(ctl: RunningController, model: Path, devices: list[str], **kw: Any) -> dict[str, Any]:
    """Deploy and wait for the terminal state of every device."""
    dep = ctl.fleet.deploy(model, devices=devices, **kw)
    return wait_until(
        lambda: _finished(ctl, dep["id"]),
        DEPLOY_TIMEOUT_S,
        f"deployment {dep['id']} of {model.name}",
    )


def test_agent_registers_with_facts(
    controller: RunningController, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent("dev-a", profile="rpi4")
    row = wait_until(lambda: _registered(controller, "dev-a"), 30, "hello from dev-a")
    info = runtime_info()
    assert row["runtime"] == info.name and row["runtime_version"] == info.version
    assert row["facts"]["cpu_count"] >= 1 and row["facts"]["ram_mb"] > 0
    assert row["profile"] == "rpi4" and row["profile_reason"] == "declared by device"
    assert agent.alive


def test_deploy_benchmark_then_bad_models_keep_previous_serving(
    controller: RunningController, start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent = start_agent("dev-b")
    wait_until(lambda: _registered(controller, "dev-b"), 30, "hello from dev-b")

    good = DATA / "tiny_fp32.tflite"
    dep = _deploy(controller, good, ["dev-b"], name="tiny")
    assert dep["devices"][0]["state"] == "succeeded", agent.log()[-3000:]
    device = controller.fleet.device("dev-b")
    assert device["model_sha256"] == _sha(good) and device["state"] == "active"
    bench = controller.fleet.benchmarks("dev-b")[0]
    assert bench["model_sha256"] == _sha(good)
    assert 0 < bench["p50_ms"] <= bench["p90_ms"] <= bench["p99_ms"]
    assert bench["runs"] == 50 and bench["peak_rss_mb"] > 0
    assert bench["power_source"] == "estimated" and bench["power_estimated"] is True
    assert bench["energy_mj_per_inference"] > 0
    stored = controller.home / "agents"  # agent data dirs live beside, not inside, the controller
    assert not stored.exists()
    assert (agent.config.models_dir / f"{_sha(good)}.tflite").read_bytes() == good.read_bytes()

    # A truncated model (valid header, cut in half) must be refused with the runtime's message.
    dep = _deploy(controller, DATA / "truncated.tflite", ["dev-b"], name="tiny", version="cut")
    assert dep["devices"][0]["state"] == "failed"
    assert "self-test failed" in dep["devices"][0]["detail"]
    device = controller.fleet.device("dev-b")
    assert device["model_sha256"] == _sha(good), "the previous model keeps serving"
    assert device["state"] == "failed"

    # Garbage with no TFLite header: the controller refuses it; forced through, the agent does.
    garbage = DATA / "garbage.tflite"
    with pytest.raises(ValueError, match="not a TFLite model"):
        controller.fleet.deploy(garbage, devices=["dev-b"])
    dep = _deploy(controller, garbage, ["dev-b"], name="junk", check=False)
    assert dep["devices"][0]["state"] == "failed"
    assert controller.fleet.device("dev-b")["model_sha256"] == _sha(good)
    assert agent.alive, "bad models never take the agent down"

    # Redeploying the serving model is the no-download path; the deployment still completes.
    dep = _deploy(controller, good, ["dev-b"], name="tiny")
    assert dep["devices"][0]["state"] == "succeeded"
    assert controller.fleet.device("dev-b")["state"] == "active"


@pytest.mark.skipif(
    runtime_info().name != "tflite-runtime", reason="needs tflite-runtime 2.14 (slim device env)"
)
def test_newer_op_version_is_rejected_on_old_runtime(
    controller: RunningController, start_agent: Callable[..., AgentProcess]
) -> None:
    """TF 2.21 dynamic-range FULLY_CONNECTED v12 does not load on tflite-runtime 2.14."""
    start_agent("dev-old")
    wait_until(lambda: _registered(controller, "dev-old"), 30, "hello from dev-old")
    good = DATA / "tiny_int8.tflite"
    assert _deploy(controller, good, ["dev-old"])["devices"][0]["state"] == "succeeded"
    dep = _deploy(controller, DATA / "tiny_dynamic_tf221.tflite", ["dev-old"])
    assert dep["devices"][0]["state"] == "failed"
    assert "FULLY_CONNECTED" in dep["devices"][0]["detail"]
    assert controller.fleet.device("dev-old")["model_sha256"] == _sha(good)


def test_agent_restart_keeps_serving_without_refetch(
    controller: RunningController, start_agent: Callable[..., AgentProcess]
) -> None:
    agent = start_agent("dev-c")
    wait_until(lambda: _registered(controller, "dev-c"), 30, "hello from dev-c")
    good = DATA / "tiny_int8.tflite"
    assert _deploy(controller, good, ["dev-c"])["devices"][0]["state"] == "succeeded"
    chunks_before = controller.service.chunks_published
    agent.kill()
    wait_until(lambda: not controller.fleet.device("dev-c")["online"], 60, "last will (offline)")
    agent.start()
    wait_until(lambda: controller.fleet.device("dev-c")["online"], 30, "dev-c back online")
    device = wait_until(
        lambda: (d := controller.fleet.device("dev-c"))["state"] == "active" and d, 30, "active"
    )
    assert device["model_sha256"] == _sha(good)
    assert controller.service.chunks_published == chunks_before, "nothing downloaded again"


def test_malformed_messages_are_rejected_and_agent_stays_up(
    controller: RunningController,
    start_agent: Callable[..., AgentProcess],
    mqtt_probe: Any,
    e2e_broker: Any,
    topic_root: str,
) -> None:
    agent = start_agent("dev-d")
    wait_until(lambda: _registered(controller, "dev-d"), 30, "hello from dev-d")
    probe = mqtt_probe(e2e_broker)
    base = f"{topic_root}/devices/dev-d"
    probe.publish(f"{base}/cmd", b"{not json")
    probe.publish(f"{base}/cmd", b'{"v":1,"command_id":"x","action":"format-disk"}')
    probe.publish(f"{base}/cmd", b"x" * 300_000)
    events = wait_until(
        lambda: (
            len(
                rows := [
                    e
                    for e in controller.fleet.device_detail("dev-d")["events"]
                    if e["kind"] == "rejected"
                ]
            )
            >= 3
            and rows
        ),
        30,
        "three rejected events",
    )
    messages = " | ".join(e["message"] for e in events)
    assert "not valid JSON" in messages
    assert "$.action: must be one of" in messages
    assert "exceeds" in messages
    assert agent.alive
    # The agent still works after the junk.
    dep = _deploy(controller, DATA / "tiny_fp32.tflite", ["dev-d"])
    assert dep["devices"][0]["state"] == "succeeded"


def test_two_devices_share_one_publication_of_each_chunk(
    controller: RunningController, start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """Fan-out: chunks go out on the artifact topic once, not once per device."""
    for name in ("dev-e", "dev-f"):
        start_agent(name)
    for name in ("dev-e", "dev-f"):
        wait_until(lambda n=name: _registered(controller, n), 30, f"hello from {name}")
    big = tmp_path / "padded.tflite"
    # A real model padded with trailing bytes: many chunks, and it still loads.
    shutil.copyfile(DATA / "tiny_fp32.tflite", big)
    with big.open("ab") as fh:
        fh.write(bytes(range(256)) * 2048)  # +512 KiB → 9 chunks of 64 KiB
    before = controller.service.bytes_published
    dep = _deploy(controller, big, ["dev-e", "dev-f"])
    assert all(d["state"] == "succeeded" for d in dep["devices"]), dep
    egress = controller.service.bytes_published - before
    assert egress < 1.5 * big.stat().st_size, f"egress {egress} for {big.stat().st_size} bytes"

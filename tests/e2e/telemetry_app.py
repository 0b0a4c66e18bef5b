"""An application on a served agent's inference socket, and reading back what telemetry the
controller stored (the e2e telemetry, outage and dashboard tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.client import InferenceClient, wait_for_service
from tests.e2e.conftest import DATA, AgentProcess, RunningController, wait_until

# Short intervals so a test sees many records; real devices use 10 s.
INTERVAL_S = 0.5


class Application(threading.Thread):
    """An application on the device calling the agent's inference service in a loop."""

    def __init__(self, socket_path: Path, pause_s: float = 0.005) -> None:
        """Connect lazily to the service at socket_path."""
        super().__init__(daemon=True)
        self.socket_path = socket_path
        self.pause_s = pause_s
        self.requests = 0
        self.failures: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        """Call infer() until stopped, counting answers and keeping any failure."""
        with InferenceClient(self.socket_path) as client:
            info = client.model_info()["inputs"][0]
            shape = [1 if d < 0 else d for d in info["shape"]]
            x = np.random.default_rng(0).random(shape).astype(info["dtype"])
            while not self._halt.is_set():
                try:
                    out = client.infer(x)
                    assert np.all(np.isfinite(out))
                    self.requests += 1
                except Exception as exc:  # any failure is a test failure, reported at the end
                    self.failures.append(repr(exc))
                time.sleep(self.pause_s)

    def finish(self) -> int:
        """Stop calling; return how many requests were answered."""
        self._halt.set()
        self.join(10)
        return self.requests


def serving_agent(
    controller: RunningController, start_agent: Callable[..., AgentProcess], device: str
) -> AgentProcess:
    """An agent with a short telemetry interval, serving tiny_fp32 through a deployment."""
    agent = start_agent(device, telemetry_interval_s=INTERVAL_S)
    wait_until(
        lambda: controller.fleet.has_device(device) and controller.fleet.device(device)["online"],
        30,
        "agent registered",
    )
    dep = controller.fleet.deploy(DATA / "tiny_fp32.tflite", devices=[device])
    wait_until(
        lambda: controller.fleet.deployment(dep["id"])["devices"][0]["state"] == "succeeded",
        60,
        "deployment",
    )
    assert agent.config.socket_path is not None
    wait_for_service(agent.config.socket_path, 10)
    return agent


def stored_telemetry(controller: RunningController, device: str) -> tuple[list[int], int]:
    """Sequence numbers the controller stored for a device, and the inferences they count."""
    rows = controller.fleet.db.query(
        "SELECT seq, served FROM telemetry WHERE device_id = ? ORDER BY seq", (device,)
    )
    return [r["seq"] for r in rows], sum(r["served"] for r in rows)


def telemetry_complete(controller: RunningController, device: str, requests: int) -> bool:
    """Every answered request is counted and the seqs run 1..N without a hole."""
    seqs, served = stored_telemetry(controller, device)
    return served == requests and seqs == list(range(1, len(seqs) + 1))

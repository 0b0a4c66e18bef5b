"""A new user's first hour: `edgefleet up`, `devices register` with defaults, the printed command.

Everything is a real process: the controller with its embedded broker, the register command,
and an agent started with exactly the command line `register` printed (the venv and bundle
paths substituted for this machine), which comes online and takes a deployment.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.fleet.onboarding import DEVICE_VENV, read_serving
from controller.fleet.registry import Fleet
from tests.e2e.conftest import DATA, wait_until

pytestmark = [pytest.mark.e2e]

BIN = Path(sys.executable).parent
EDGEFLEET = str(BIN / "edgefleet")


@pytest.fixture
def up(tmp_path: Path, mosquitto_binary: str) -> Iterator[Path]:
    """`edgefleet up --port 0` (embedded mosquitto on a free loopback port) in its own process."""
    home = tmp_path / "home"
    log = tmp_path / "up.log"
    env = {**os.environ, "PATH": f"{Path(mosquitto_binary).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [EDGEFLEET, "up", "--port", "0", "--home", str(home)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_until(
            lambda: (s := read_serving(home)) is not None and s.pid == proc.pid,
            30,
            "serving.json from `edgefleet up`",
        )
        yield home
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_command(commands: list[str], bundle: Path, device_id: str) -> list[str]:
    """The printed `edgefleet-agent run` line, with this machine's venv and the bundle path."""
    (line,) = [c for c in commands if " run --config " in c and not c.startswith("#")]
    line = line.replace(f"{DEVICE_VENV}/bin/", f"{BIN}/").replace(
        f"~/edgefleet-{device_id}", str(bundle)
    )
    return shlex.split(line)


def test_register_with_defaults_then_the_printed_command_comes_online_and_deploys(
    up: Path, tmp_path: Path
) -> None:
    serving = read_serving(up)
    assert serving is not None and serving.auth == "none"
    assert serving.device_broker.startswith("mqtt://127.0.0.1:")
    assert serving.broker_pid is not None and serving.running
    assert f"devices connect to {serving.device_broker} (auth none)" in (
        tmp_path / "up.log"
    ).read_text()

    out = subprocess.run(
        [EDGEFLEET, "devices", "register", "pi-kitchen", "--profile", "rpi4", "--home", str(up)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "on the device:" in out.stdout and "edgefleet-agent run --config" in out.stdout
    row = json.loads(
        subprocess.run(
            [EDGEFLEET, "devices", "show", "pi-kitchen", "--json", "--home", str(up)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )
    assert row["profile"] == "rpi4"
    bundle = up / "bundles" / "pi-kitchen"
    # Which lines were printed: the same list --json carries (registering again is idempotent).
    again = subprocess.run(
        [
            *(EDGEFLEET, "devices", "register", "pi-kitchen", "--profile", "rpi4"),
            *("--home", str(up), "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    info = json.loads(again.stdout)
    assert info["broker"] == serving.device_broker and info["auth"] == "none"
    for line in info["commands"]:
        assert line.strip() in out.stdout
    assert {p.name: p.stat().st_mode & 0o777 for p in bundle.iterdir()} == {
        "agent.toml": 0o600,
        info["wheel"].rsplit("/", 1)[1]: 0o600,
    }

    state_dir = tmp_path / "state"  # what systemd's StateDirectory= would hand the agent
    env = {**os.environ, "STATE_DIRECTORY": str(state_dir)}
    agent_log = tmp_path / "agent.log"
    proc = subprocess.Popen(
        _run_command(info["commands"], bundle, "pi-kitchen"),
        stdout=agent_log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    fleet = Fleet(up)
    try:
        wait_until(lambda: fleet.device("pi-kitchen")["online"], 30, "the agent online")
        deploy = subprocess.run(
            [
                *(EDGEFLEET, "deploy", str(DATA / "tiny_int8.tflite")),
                *("--to", "pi-kitchen", "--home", str(up), "--json"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert deploy.returncode == 0, deploy.stderr
        wait_until(lambda: len(fleet.benchmarks("pi-kitchen")) >= 1, 90, "deployed + benchmark")
        assert fleet.device("pi-kitchen")["state"] == "active", agent_log.read_text()[-2000:]
        assert (state_dir / "models").is_dir(), "the agent used the data dir systemd gives it"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)
        fleet.close()

"""ARM tier fixtures: emulated userlands with the agent installed, `edgefleet up` on the host.

The tier runs only when selected (`pytest -m arm`, `make test-arm`): a cold build takes minutes.
Locally a machine that cannot emulate (no root) skips; under CI=true every missing part fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.arm import userland
from tests.conftest import running_in_ci
from tests.polling import wait_until

# The console script of the venv running the tests, as a user runs it.
EDGEFLEET = [str(Path(sys.executable).parent / "edgefleet")]
# `edgefleet up` starts mosquitto and connects within a second or two on an idle machine.
UP_TIMEOUT_S = 60


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the ARM tier unless the marker expression names it (`-m arm`)."""
    if "arm" in (config.option.markexpr or ""):
        return
    keep = [item for item in items if item.get_closest_marker("arm") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def _missing(reason: str) -> None:
    """Skip locally; fail under CI=true, where the ARM tier must run."""
    if running_in_ci():
        pytest.fail(f"{reason}; CI must run the ARM tier", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pristine_userland() -> Callable[[str], Path]:
    """Factory: the userland of an arch, built or restored, with no agent installed in it yet."""

    def get(arch: str) -> Path:
        problem = userland.prerequisites_problem()
        if problem:
            _missing(problem)
        return userland.ensure_userland(arch)

    return get


@dataclass
class Controller:
    """A running `edgefleet up` process: its home, broker URL and a CLI runner."""

    home: Path
    broker_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def cli(self, *args: str, timeout: float = 120, ok: tuple[int, ...] = (0,)) -> str:
        """Run `edgefleet ARGS --home HOME` and return stdout; fail with stderr on an exit code
        not in `ok` (docs/cli.md: `rollout status` exits 1 aborted, 3 partial, 4 paused)."""
        proc = subprocess.run(
            [*EDGEFLEET, *args, "--home", str(self.home)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert proc.returncode in ok, f"edgefleet {' '.join(args)}: {proc.stderr}{proc.stdout}"
        return proc.stdout

    def cli_json(self, *args: str, ok: tuple[int, ...] = (0,)) -> Any:
        """`edgefleet ARGS --json` parsed."""
        return json.loads(self.cli(*args, "--json", ok=ok))

    def log(self) -> str:
        """The controller's log so far."""
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def controller_up(tmp_path: Path) -> Iterator[Controller]:
    """`edgefleet up` as a user runs it: embedded mosquitto (on a free port), its own home."""
    home = tmp_path / "controller"
    log_path = tmp_path / "up.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [*EDGEFLEET, "up", "--home", str(home), "--port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=tmp_path,
        )
    try:
        url = wait_until(
            lambda: re.search(r"embedded \w+ broker on (mqtt://\S+)", log_path.read_text()),
            UP_TIMEOUT_S,
            "`edgefleet up` to start its broker",
            interval=0.2,
        ).group(1)
        wait_until(lambda: "controller leads" in log_path.read_text(), UP_TIMEOUT_S, "leader")
        yield Controller(home, url, proc, log_path)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C, as the user stops it
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()

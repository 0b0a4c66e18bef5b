"""Emulated ARM userlands for tests: build or restore them, run commands and processes in them.

Wraps scripts/arm/build-userland.sh and scripts/arm/run-in-userland.sh (the same scripts a
developer runs by hand), so the tests exercise exactly what the docs describe.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts" / "arm"
ARCHES = ("arm64", "armhf")
# What each userland reports as its architecture (agent/facts.py userland_arch).
EXPECTED_ARCH = {"arm64": "aarch64", "armhf": "armv7l"}
# The runtime (distribution) the markers of requirements/agent.txt pick per architecture.
EXPECTED_RUNTIME = {"arm64": "ai-edge-litert", "armhf": "tflite-runtime"}
# A cold build took 40 min (arm64, 2409 s) here on 2 cores shared with other jobs (load 12-20);
# `make test-arm` builds before pytest; this bounds a build the fixture itself has to do.
BUILD_TIMEOUT_S = 3600


def prerequisites_problem() -> str | None:
    """Why this machine cannot build userlands at all, or None when it can try."""
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        return "emulated ARM userlands need root (chroot, mounts, binfmt_misc) and there is no sudo"
    if shutil.which("qemu-aarch64-static") is None and shutil.which("apt-get") is None:
        return "qemu-user-static is missing and there is no apt-get to install it"
    return None


def ensure_userland(arch: str) -> Path:
    """A pristine userland of `arch` (no agent installed yet), built or restored from the cache."""
    proc = subprocess.run(
        [str(SCRIPTS / "build-userland.sh"), "--fresh", arch],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"build-userland.sh {arch} failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def run_in_userland_cmd(
    arch: str, command: Sequence[str], binds: Sequence[str] = (), env: Sequence[str] = ()
) -> list[str]:
    """The argv of run-in-userland.sh running `command` inside `arch` with binds and env."""
    argv = [str(SCRIPTS / "run-in-userland.sh"), arch]
    for bind in binds:
        argv += ["--bind", bind]
    for item in env:
        argv += ["--env", item]
    return [*argv, "--", *command]


def run_in_userland(
    arch: str, command: Sequence[str], binds: Sequence[str] = (), timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run `command` inside the userland and return its result (stdout+stderr captured)."""
    return subprocess.run(
        run_in_userland_cmd(arch, command, binds),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class UserlandProcess:
    """One process inside an emulated userland, started and stopped by PID (a real agent)."""

    arch: str
    command: list[str]
    log_path: Path
    binds: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process; run-in-userland.sh execs into it, so our PID is the agent's."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            run_in_userland_cmd(self.arch, self.command, self.binds, self.env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def terminate(self) -> None:
        """SIGTERM by PID and wait; SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """The process's output so far (for failure messages)."""
        return self.log_path.read_text(errors="replace")

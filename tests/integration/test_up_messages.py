"""`edgefleet up` as an operator sees it: an unreachable broker is named, Ctrl-C ends cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from controller.brokers.base import free_port

EXE = Path(sys.executable).parent / "edgefleet"
# Long enough for the first two attempts (the transport backs off 3 s after the first).
WAIT_S = 30.0


def _up_until(args: list[str], home: Path, marker: str) -> tuple[int, list[str]]:
    """Run `edgefleet up ARGS` until `marker` is on stderr, then Ctrl-C it; rc and stderr lines."""
    proc = subprocess.Popen(
        [str(EXE), "up", *args, "--home", str(home)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own process group, like a shell job
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + WAIT_S
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if marker in line:
                break
        assert any(marker in line for line in lines), "\n".join(lines)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        _, rest = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, lines + rest.splitlines()


def test_up_names_an_unreachable_broker_and_says_it_retries(tmp_path: Path) -> None:
    port = free_port()
    rc, lines = _up_until(
        ["--broker", f"mqtt://127.0.0.1:{port}"], tmp_path / "home", "not reachable yet"
    )
    text = "\n".join(lines)
    assert f"cannot connect to mqtt://127.0.0.1:{port} (attempt 1): ConnectionRefused" in text
    assert "retrying in" in text
    assert f"broker mqtt://127.0.0.1:{port} not reachable yet: retrying with backoff" in text
    assert lines[-1] == "controller stopped", text
    assert rc == 0


def test_ctrl_c_ends_with_a_clean_stop_not_a_reconnect(tmp_path: Path) -> None:
    rc, lines = _up_until(
        ["--port", str(free_port())], tmp_path / "home", "driving rollouts and publishing"
    )
    text = "\n".join(lines)
    assert "reconnecting with backoff" not in text and "Unspecified error" not in text, text
    assert "(stopped)" in text
    assert lines[-1] == "controller stopped", text
    assert rc == 0

"""Progress bars with counts and elapsed time on a terminal; the plain lines everywhere else."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from controller.cli.optimize import _Progress
from controller.cli.progress import ProgressDisplay
from controller.cli.simulate import _show
from controller.fleet.registry import Fleet
from controller.fleet.rollout.policy import Policy, parse_threshold, parse_waves
from controller.fleet.rollout.states import DeviceState as D
from controller.fleet.rollout.states import RolloutState as R
from controller.fleet.rollout.states import move, move_rollout
from converters.report import ProgressEvent
from tests.paths import REPO_ROOT, TEST_DATA

# The CLI of this checkout (a console script may belong to another checkout's venv).
CLI = [sys.executable, "-m", "controller.cli.main"]
PROFILES = ["rpi4", "jetson-nano", "x86-64-gateway"]
STEPS = [
    ProgressEvent("rpi4", "start", None, "int8, fp32"),
    ProgressEvent("rpi4", "convert", "int8"),
    ProgressEvent("rpi4", "done", "int8", "selected"),
    ProgressEvent("jetson-nano", "start"),
    ProgressEvent("jetson-nano", "warning", None, "no calibration data"),
    ProgressEvent("jetson-nano", "done", "fp16", "selected"),
    ProgressEvent("x86-64-gateway", "convert", "int8"),
]


def _screen() -> tuple[io.StringIO, Console]:
    """A fake 100-column terminal and a console drawing on it."""
    screen = io.StringIO()
    return screen, Console(file=screen, force_terminal=True, width=100, color_system=None)


def test_optimize_draws_profiles_done_of_total_on_a_terminal() -> None:
    screen, console = _screen()
    with ProgressDisplay(terminal=True, console=console) as display:
        progress = _Progress(PROFILES, display)
        for step in STEPS:
            progress(step)
    drawn = screen.getvalue()
    assert "2/3" in drawn and "profiles" in drawn and "0:00:0" in drawn
    assert "x86-64-gateway convert int8" in drawn  # what it works on now
    # Each profile's end and every warning stay in the scrollback as lines.
    assert re.search(r"\[1/3 rpi4 +\d+\.\ds\] done +int8 selected", drawn)
    assert "warning    no calibration data" in drawn
    assert "convert    int8" not in drawn  # steps are the bar's text, not lines


def test_optimize_prints_one_line_per_step_without_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with ProgressDisplay() as display:  # stderr is captured here: no terminal
        assert not display.terminal
        progress = _Progress(PROFILES, display)
        for step in STEPS:
            progress(step)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(STEPS)
    assert re.match(r"  \[3/3 x86-64-gateway +\d+\.\ds\] convert +int8$", lines[-1])


def _snapshot(connected: int, active: int) -> dict[str, object]:
    """A simulation snapshot of 10 devices."""
    return {
        "devices": 10, "elapsed_s": 3.0, "connected": connected, "activated": active + 2,
        "failed": 1, "bytes_received": 0, "chunks_rejected": 0, "rss_mb": 80.0,
        "telemetry_records": 0, "states": {"active": active, "idle": 10 - active},
    }  # fmt: skip


def test_simulate_draws_agents_connected_and_devices_active() -> None:
    screen, console = _screen()
    with ProgressDisplay(terminal=True, console=console) as display:
        _show(display, _snapshot(4, 0))
        _show(display, _snapshot(10, 7))
    drawn = screen.getvalue()
    assert "agents connected" in drawn and "10/10" in drawn
    assert "devices active (9 updates, 1 failed)" in drawn and "7/10" in drawn


def test_simulate_prints_its_progress_line_without_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with ProgressDisplay() as display:
        _show(display, _snapshot(10, 7))
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("[    3.0s] connected 10/10  activated 9  failed 1")


def test_rollout_watch_on_a_real_terminal_draws_a_bar(fleet: Fleet, tmp_path: Path) -> None:
    for d in ("t-0", "t-1"):
        fleet.register_device(d, "rpi4")
    fleet.add_model(TEST_DATA / "tiny_int8.tflite", name="cnn", version="2", profile="rpi4")
    policy = Policy(waves=parse_waves("100"), max_failures=parse_threshold("100%"))
    rid = fleet.start_rollout("cnn:2", "all", policy)["id"]
    with fleet.db.transaction() as tx:
        move(tx, (rid, "t-0"), D.SUCCEEDED, ts=time.time())
        move(tx, (rid, "t-1"), D.FAILED, ts=time.time(), detail="boom")
        move_rollout(tx, rid, R.COMPLETED, ts=time.time(), reason="every wave done")
    leader, follower = pty.openpty()  # stderr on a terminal, stdout into a pipe
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "xterm"}
    env.pop("EDGEFLEET_DEBUG", None)
    drawn: list[bytes] = []
    # Drained while the command runs: a full terminal buffer would block its writes.
    reader = threading.Thread(target=lambda: drawn.extend(iter(lambda: _read(leader), b"")))
    reader.start()
    try:
        done = subprocess.run(
            [*CLI, "rollout", "status", rid, "--watch", "--home", str(tmp_path / "home")],
            stdout=subprocess.PIPE, stderr=follower, env=env, timeout=60, check=False,
            cwd=REPO_ROOT,
        )  # fmt: skip
    finally:
        os.close(follower)  # the reader sees EIO once no writer is left
        reader.join(10)
        os.close(leader)
    text = b"".join(drawn).decode("utf-8", "replace")
    assert done.returncode == 3, text
    assert f"{rid} completed with 1 failed" in text and "2/2" in text and "devices" in text
    assert "done 2/2" not in text  # the bar, not the plain line
    assert done.stdout.decode().strip().endswith("outcome partial; every wave done")


def _read(fd: int) -> bytes:
    """What the terminal holds (b"" once the writer is gone)."""
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: no writer left on the pty
        return b""


def test_a_dumb_terminal_gets_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert ProgressDisplay().terminal
    monkeypatch.setenv("TERM", "dumb")
    assert not ProgressDisplay().terminal

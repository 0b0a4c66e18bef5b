"""Scripting `edgefleet`: rollout --wait/--watch/status exit codes, --version, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.cli.main import app
from controller.cli.rollout_wait import (
    EXIT_ABORTED,
    EXIT_COMPLETED,
    EXIT_PARTIAL,
    EXIT_PENDING,
    EXIT_USAGE,
)
from controller.fleet.registry import Fleet
from controller.fleet.rollout.states import DeviceState as D
from controller.fleet.rollout.states import RolloutState as R
from controller.fleet.rollout.states import move, move_rollout
from tests.paths import TEST_DATA

DATA = TEST_DATA
EXE = Path(sys.executable).parent / "edgefleet"
runner = CliRunner()
DEVICES = ["pi-0", "pi-1", "pi-2"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data dir with three rpi4 devices and model cnn:2 registered (no --debug leaking in)."""
    monkeypatch.delenv("EDGEFLEET_DEBUG", raising=False)
    path = tmp_path / "home"
    for d in DEVICES:
        args = ["devices", "register", d, "--profile", "rpi4", "--home", str(path)]
        assert runner.invoke(app, args).exit_code == 0
    added = runner.invoke(
        app,
        ["models", "add", str(DATA / "tiny_int8.tflite"), "--name", "cnn", "--version", "2",
         "--profile", "rpi4", "--home", str(path)],
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    return path


def _start(home: Path) -> str:
    """Start a one-wave rollout of cnn:2 to every device; its id."""
    started = runner.invoke(
        app, ["rollout", "start", "cnn:2", "--waves", "100", "--json", "--home", str(home)]
    )
    assert started.exit_code == 0, started.output
    return str(json.loads(started.output)["id"])


def _finish(home: Path, rollout_id: str, failed: set[str]) -> None:
    """Move every device (pending: the first wave starts at once) to its end, then the rollout."""
    fleet = Fleet(home)
    with fleet.db.transaction() as tx:
        for d in DEVICES:
            end = D.FAILED if d in failed else D.SUCCEEDED
            move(tx, (rollout_id, d), end, ts=time.time(), detail="agent error: boom")
        move_rollout(tx, rollout_id, R.COMPLETED, ts=time.time(), reason="every wave done")


def _status(home: Path, rollout_id: str, *extra: str) -> tuple[int, str]:
    """Exit code and output of `rollout status ID`."""
    result = runner.invoke(app, ["rollout", "status", rollout_id, *extra, "--home", str(home)])
    return result.exit_code, result.output


def test_status_exit_code_of_a_completed_rollout(home: Path) -> None:
    rid = _start(home)
    assert _status(home, rid)[0] == EXIT_COMPLETED  # running: nothing wrong yet
    _finish(home, rid, failed=set())
    code, out = _status(home, rid, "--watch")
    assert code == EXIT_COMPLETED, out
    assert f"rollout {rid}: completed" in out


def test_status_exit_code_of_a_partial_rollout(home: Path) -> None:
    rid = _start(home)
    _finish(home, rid, failed={"pi-1"})
    assert _status(home, rid)[0] == EXIT_PARTIAL
    code, out = _status(home, rid, "--watch")
    assert code == EXIT_PARTIAL
    assert "1 of 3 device(s) failed" in out
    as_json = runner.invoke(app, ["rollout", "status", rid, "--json", "--home", str(home)])
    assert as_json.exit_code == EXIT_PARTIAL


@pytest.mark.parametrize("action", ["abort", "rollback"])
def test_status_is_non_zero_for_an_aborted_rollout(home: Path, action: str) -> None:
    rid = _start(home)
    assert runner.invoke(app, ["rollout", action, rid, "--home", str(home)]).exit_code == 0
    assert _status(home, rid)[0] == EXIT_ABORTED
    code, out = _status(home, rid, "--watch")
    assert code == EXIT_ABORTED
    assert f"rollout {rid}: {'aborted' if action == 'abort' else 'rolled_back'}" in out


def test_watch_stops_on_pause_and_on_timeout(home: Path) -> None:
    rid = _start(home)
    began = time.monotonic()
    code, out = _status(home, rid, "--watch", "--timeout", "0.5")
    assert code == EXIT_PENDING and "still running after 0.5 s" in out
    assert time.monotonic() - began < 10
    assert runner.invoke(app, ["rollout", "pause", rid, "--home", str(home)]).exit_code == 0
    code, out = _status(home, rid, "--watch")
    assert code == EXIT_PENDING and f"rollout {rid}: paused" in out


def test_start_wait_times_out_without_a_controller(home: Path) -> None:
    result = runner.invoke(
        app,
        ["rollout", "start", "cnn:2", "--wait", "--timeout", "0.3", "--home", str(home)],
    )
    assert result.exit_code == EXIT_PENDING, result.output
    assert "still running after 0.3 s" in result.output


def test_watch_needs_an_id_and_unknown_ids_are_usage_errors(home: Path) -> None:
    assert _status(home, "nope", "--watch")[0] == EXIT_USAGE
    result = runner.invoke(app, ["rollout", "status", "--watch", "--home", str(home)])
    assert result.exit_code == EXIT_USAGE and "--watch needs a ROLLOUT_ID" in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("edgefleet 0.")


def test_optimize_check_of_garbage_is_one_line_rc_2() -> None:
    result = runner.invoke(app, ["optimize", str(DATA / "garbage.tflite"), "--check", "-p", "rpi4"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "Not a TFLite flatbuffer" in result.output


def test_subprocess_exit_codes_and_one_line_errors(home: Path, tmp_path: Path) -> None:
    """The installed script: --version, status rc of an aborted rollout, simulate with no broker."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(EXE), *args], capture_output=True, text=True, timeout=120, check=False
        )

    assert run("--version").stdout.startswith("edgefleet ")
    rid = _start(home)
    assert runner.invoke(app, ["rollout", "abort", rid, "--home", str(home)]).exit_code == 0
    status = run("rollout", "status", rid, "--watch", "--home", str(home))
    assert status.returncode == EXIT_ABORTED, status.stderr
    sim = run("simulate", "-n", "2", "--broker", "mqtt://127.0.0.1:1", "--duration", "1")
    assert sim.returncode == 1
    assert sim.stderr.strip() == "error: broker mqtt://127.0.0.1:1 unreachable: Connection refused"
    check = run("optimize", str(DATA / "garbage.tflite"), "--check", "-p", "rpi4")
    assert check.returncode == 2 and len(check.stderr.strip().splitlines()) == 1, check.stderr
    assert "Traceback" not in check.stderr and check.stdout == ""
    usage = run("rollout", "status", "--bogus")
    assert usage.returncode == EXIT_USAGE
    assert usage.stderr.strip() == (
        "error: No such option: --bogus (see `edgefleet rollout status --help`)"
    )
    assert run("devices", "list", "--limit", "-1", "--home", str(home)).returncode == EXIT_USAGE

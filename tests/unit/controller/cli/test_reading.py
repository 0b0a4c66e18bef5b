"""Reading `edgefleet` output: tables readable at 100 columns, units, name:version, filters."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.protocol.messages import Status
from controller.cli.main import app
from controller.cli.render import ms
from controller.fleet.registry import Fleet
from tests.paths import TEST_DATA

DATA = TEST_DATA
runner = CliRunner()
NARROW = {"COLUMNS": "100"}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Twelve rpi4 and three coral devices; model cnn:2 for rpi4; pi-00 serves it."""
    monkeypatch.delenv("EDGEFLEET_DEBUG", raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)
    path = tmp_path / "home"
    devices = [(f"pi-{i:02}", "rpi4") for i in range(12)]
    devices += [(f"cor-{i}", "coral-dev-board") for i in range(3)]
    for device, profile in devices:
        args = ["devices", "register", device, "--profile", profile, "--home", str(path)]
        assert runner.invoke(app, args).exit_code == 0
    add = ["models", "add", str(DATA / "tiny_int8.tflite"), "--name", "cnn", "--version", "2",
           "--profile", "rpi4", "--home", str(path)]  # fmt: skip
    assert runner.invoke(app, add).exit_code == 0
    sha = hashlib.sha256((DATA / "tiny_int8.tflite").read_bytes()).hexdigest()
    fleet = Fleet(path)
    try:
        fleet.record_status(Status("pi-00", True, model_sha256=sha, generation=1))
    finally:
        fleet.close()
    return path


def _letters(text: str) -> Counter[str]:
    """Every printed character but whitespace and table rules: what wrapping must keep."""
    return Counter(c for c in text if not c.isspace() and c != "─")


def _both(args: list[str]) -> tuple[str, str]:
    """Output of a command at pipe width and at 100 columns (both must succeed the same way)."""
    wide = runner.invoke(app, args)
    narrow = runner.invoke(app, args, env=NARROW)
    assert wide.exit_code == narrow.exit_code, narrow.output
    return wide.stdout, narrow.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["optimize", str(DATA / "tiny_int8.tflite"), "--check", "-p", "all"],
        ["profiles", "list"],
        ["devices", "list"],
        ["models", "list"],
        ["rollout", "status"],
    ],
)
def test_tables_at_100_columns_lose_no_text(home: Path, args: list[str]) -> None:
    if args[0] in ("devices", "models", "rollout"):
        args = [*args, "--home", str(home)]
    if args[0] == "rollout":
        start = ["rollout", "start", "cnn:2", "--to", "profile:rpi4", "--home", str(home)]
        assert runner.invoke(app, start).exit_code == 0
    wide, narrow = _both(args)
    assert _letters(wide) == _letters(narrow)
    assert max(len(line) for line in narrow.splitlines()) <= 100, narrow
    assert "…" not in narrow


def test_rollout_status_at_100_columns_with_long_details(home: Path) -> None:
    start = ["rollout", "start", "cnn:2", "--to", "profile:rpi4", "--json", "--home", str(home)]
    rid = json.loads(runner.invoke(app, start).output)["id"]
    assert runner.invoke(app, ["rollout", "abort", rid, "--home", str(home)]).exit_code == 0
    wide, narrow = _both(["rollout", "status", rid, "--limit", "0", "--home", str(home)])
    assert _letters(wide) == _letters(narrow)
    assert max(len(line) for line in narrow.splitlines()) <= 100, narrow


def test_check_detail_is_not_cut_where_the_fix_is_written() -> None:
    out = runner.invoke(
        app, ["optimize", str(DATA / "tiny_int8.tflite"), "--check", "-p", "coral-dev-board"],
        env=NARROW,
    ).stdout  # fmt: skip
    flat = " ".join(out.split())
    assert "install the 'edgetpu-compiler' Debian package" in flat, out


def test_human_latency_units() -> None:
    assert [ms(None), ms(0.0073), ms(0.25), ms(12.5), ms(1234.0)] == [
        "-", "7.3 µs", "250 µs", "12.50 ms", "1.23 s"
    ]  # fmt: skip


def test_devices_list_filters_limit_and_model_names(home: Path) -> None:
    h = ["--home", str(home)]
    full = runner.invoke(app, ["devices", "list", *h]).stdout
    assert "cnn:2" in full and "showing" not in full
    coral = runner.invoke(app, ["devices", "list", "--profile", "coral-dev-board", *h]).stdout
    assert coral.count("cor-") == 3 and "pi-" not in coral
    assert "3 of 15 devices match the filters" in coral
    online = runner.invoke(app, ["devices", "list", "--state", "online", *h]).stdout
    assert "pi-00" in online and "pi-01" not in online
    limited = runner.invoke(app, ["devices", "list", "--limit", "4", *h]).stdout
    assert len(limited.strip().splitlines()) == 2 + 4 + 1
    assert "showing 4 of 15 devices; --limit 0 for all" in limited
    both = runner.invoke(app, ["devices", "list", "--profile", "rpi4", "--limit", "5", *h])
    assert "showing 5 of 12 matching (15 devices)" in both.stdout
    as_json = json.loads(runner.invoke(app, ["devices", "list", "--json", *h]).stdout)
    assert len(as_json) == 15  # scripts get every row unless they ask for a limit


def test_rollout_status_filters_its_devices(home: Path) -> None:
    h = ["--home", str(home)]
    start = ["rollout", "start", "cnn:2", "--to", "profile:rpi4", "--waves", "100", "--json", *h]
    rid = json.loads(runner.invoke(app, start).output)["id"]
    limited = runner.invoke(app, ["rollout", "status", rid, "--limit", "3", *h]).stdout
    assert "showing 3 of 12 devices; --limit 0 for all" in limited
    assert sum(line.startswith("pi-") for line in limited.splitlines()) == 3
    pending = runner.invoke(app, ["rollout", "status", rid, "--state", "failed", *h]).stdout
    assert "0 of 12 devices match the filters" in pending and "pi-00" not in pending


def test_devices_show_has_no_python_reprs(home: Path) -> None:
    out = runner.invoke(app, ["devices", "show", "pi-00", "--home", str(home)]).stdout
    assert "None" not in out and "{" not in out and "'" not in out
    assert "cnn:2" in out and "online           yes" in out


def test_no_colour_in_a_pipe_and_with_no_color(home: Path) -> None:
    exe = Path(sys.executable).parent / "edgefleet"
    out = subprocess.run(
        [str(exe), "devices", "list", "--home", str(home)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "\x1b[" not in out.stdout and "cnn:2" in out.stdout

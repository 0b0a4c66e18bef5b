"""`edgefleet telemetry` and `edgefleet report` through typer's CliRunner, plus one real --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.protocol import SeqRange, Telemetry
from controller.cli.main import app
from controller.fleet.registry import Fleet
from controller.fleet.telemetry.queries import parse_since
from controller.fleet.telemetry.store import TelemetryStore
from tests.paths import TEST_DATA
from tests.telemetry_records import T0, record

DATA = TEST_DATA
runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path) -> list[str]:
    """--home pointing at a data dir with pi-1 (rpi4) and x-1 (x86), tiny:1, and telemetry."""
    fleet = Fleet(tmp_path / "home")
    try:
        fleet.register_device("pi-1", "rpi4")
        fleet.register_device("x-1", "x86-64-gateway")
        fleet.register_device("quiet", "rpi4")
        fleet.add_model(DATA / "tiny_fp32.tflite", name="tiny", version="1")
        sha = fleet.model("tiny:1")["artifacts"][0]["sha256"]
        store = TelemetryStore(fleet.db)
        for device in ("pi-1", "x-1"):
            records = tuple(
                record(seq, T0 + 10 * seq, [2.0, 2.5, 4.0], sha=sha) for seq in range(1, 31)
            )
            store.ingest(Telemetry(device, records[:10] + records[15:]), received=T0)
        store.ingest(Telemetry("pi-1", (), unavailable=(SeqRange(11, 12),)), received=T0)
    finally:
        fleet.close()
    return ["--home", str(tmp_path / "home")]


def test_telemetry_json_and_table(home: list[str]) -> None:
    result = runner.invoke(app, ["telemetry", "pi-1", "--json", *home])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [r["seq"] for r in data["records"]] == [*range(1, 11), *range(16, 31)]
    assert {r["resolution"] for r in data["records"]} == {"raw"}
    assert data["cursor"]["highest"] == 30 and data["cursor"]["contiguous"] == 12
    assert [(g["seq_first"], g["seq_last"], g["state"]) for g in data["gaps"]] == [
        (11, 12, "lost"),
        (13, 15, "missing"),
    ]
    limited = json.loads(
        runner.invoke(app, ["telemetry", "pi-1", "--limit", "3", "--json", *home]).output
    )
    assert [r["seq"] for r in limited["records"]] == [28, 29, 30]
    assert {r["model"] for r in limited["records"]} == {"tiny:1"}

    table = runner.invoke(app, ["telemetry", "pi-1", *home])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[:3] == ["TIME", "(UTC)", "RES"]
    assert "tiny:1" in lines[2] and "estimated*" in lines[2]
    assert "1 gap(s) open (3 records), 2 lost" in table.output


def test_telemetry_since_and_plot(home: list[str], tmp_path: Path) -> None:
    iso = "2023-11-14T22:16:00"  # T0 + 180 s
    assert parse_since(iso) == T0 + 180
    later = json.loads(
        runner.invoke(app, ["telemetry", "pi-1", "--since", iso, "--json", *home]).output
    )
    assert [r["seq"] for r in later["records"]] == list(range(18, 31))
    epoch = json.loads(
        runner.invoke(app, ["telemetry", "pi-1", "--since", str(T0 + 295), "--json", *home]).output
    )
    assert [r["seq"] for r in epoch["records"]] == [30]
    png = tmp_path / "pi-1.png"
    plotted = runner.invoke(app, ["telemetry", "pi-1", "--plot", str(png), *home])
    assert plotted.exit_code == 0, plotted.output
    assert f"plot: {png}" in plotted.output
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000


def test_parse_since_forms() -> None:
    now = 1_000_000.0
    assert parse_since("90s", now) == now - 90
    assert parse_since("30m", now) == now - 1800
    assert parse_since("1.5h", now) == now - 5400
    assert parse_since("2d", now) == now - 2 * 86_400
    assert parse_since("1w", now) == now - 7 * 86_400
    assert parse_since("1700000000", now) == 1_700_000_000.0
    assert parse_since("2023-11-14T22:13:20+00:00", now) == 1_700_000_000.0
    assert parse_since(None, now) is None


def test_report_table_json_and_plot(home: list[str], tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", "--json", *home])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert [(r["profile"], r["model"], r["devices"], r["inferences"]) for r in rows] == [
        ("rpi4", "tiny:1", 1, 75),
        ("x86-64-gateway", "tiny:1", 1, 75),
    ]
    by_device = json.loads(runner.invoke(app, ["report", "--by", "device", "--json", *home]).output)
    assert [(r["device"], r["profile"]) for r in by_device["rows"]] == [
        ("pi-1", "rpi4"),
        ("x-1", "x86-64-gateway"),
    ]
    table = runner.invoke(app, ["report", "--model", "tiny:1", *home])
    assert table.exit_code == 0, table.output
    assert table.output.splitlines()[0].split()[:4] == ["PROFILE", "MODEL", "DEVICES", "INFERENCES"]
    assert "rpi4" in table.output and "estimated*" in table.output
    recent = runner.invoke(app, ["report", "--since", "1h", *home])
    assert recent.exit_code == 0 and "no telemetry in this range" in recent.output
    png = tmp_path / "rpi4.png"
    plotted = runner.invoke(app, ["report", "--profile", "rpi4", "--plot", str(png), *home])
    assert plotted.exit_code == 0, plotted.output
    assert png.stat().st_size > 20_000
    assert "x86-64-gateway" not in plotted.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["telemetry", "ghost"], "unknown device 'ghost'"),
        (["telemetry", "pi-1", "--since", "yesterday"], "--since 'yesterday'"),
        (["telemetry", "pi-1", "--limit", "0"], "--limit must be >= 1"),
        (["telemetry", "quiet", "--plot", "q.png"], "no telemetry to plot for device quiet"),
        (["report", "--by", "model"], "--by must be 'profile' or 'device'"),
        (["report", "--plot", "x.png"], "--plot needs --profile"),
        (["report", "--model", "ghost"], "unknown model 'ghost'"),
        (["report", "--model", "tiny:9"], "unknown model 'tiny:9'"),
    ],
)
def test_bad_input_exits_2_with_a_clear_error(
    home: list[str], args: list[str], message: str
) -> None:
    result = runner.invoke(app, [*args, *home])
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in result.output


def test_a_known_device_without_telemetry_shows_an_empty_table(home: list[str]) -> None:
    result = runner.invoke(app, ["telemetry", "quiet", "--json", *home])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["records"] == []


def test_help_of_the_installed_console_script() -> None:
    exe = Path(sys.executable).parent / "edgefleet"
    for command in ("telemetry", "report"):
        out = subprocess.run(
            [str(exe), command, "--help"], capture_output=True, text=True, timeout=60, check=True
        )
        assert "--since" in out.stdout and "--json" in out.stdout

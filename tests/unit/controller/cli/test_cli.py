"""Both command lines through typer's CliRunner, plus one real subprocess --help each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.cli import main as agent_main
from controller.cli.main import app
from tests.paths import TEST_DATA

DATA = TEST_DATA
runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path) -> list[str]:
    """--home option pointing at a fresh data dir."""
    return ["--home", str(tmp_path / "home")]


def test_register_list_show_remove(home: list[str]) -> None:
    result = runner.invoke(app, ["devices", "register", "pi-1", "--profile", "rpi4", *home])
    assert result.exit_code == 0, result.output
    listed = runner.invoke(app, ["devices", "list", "--json", *home])
    assert [d["id"] for d in json.loads(listed.output)] == ["pi-1"]
    table = runner.invoke(app, ["devices", "list", *home])
    assert "pi-1" in table.output and "rpi4" in table.output and "offline" in table.output
    shown = runner.invoke(app, ["devices", "show", "pi-1", "--json", *home])
    assert json.loads(shown.output)["profile"] == "rpi4"
    assert runner.invoke(app, ["devices", "remove", "pi-1", *home]).exit_code == 0
    assert json.loads(runner.invoke(app, ["devices", "list", "--json", *home]).output) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["devices", "show", "ghost"], "unknown device 'ghost'"),
        (["devices", "remove", "ghost"], "unknown device 'ghost'"),
        (["devices", "register", "pi-1", "--profile", "nope"], "nope"),
        (["devices", "register", "a/b", "--profile", "rpi4"], "Invalid device id"),
        (["deploy", str(DATA / "tiny_fp32.tflite"), "--to", "ghost"], "unknown device"),
        (["deploy", str(DATA / "tiny_fp32.tflite"), "--profile", "nope"], "nope"),
        (["deployments", "show", "dep-x"], "unknown deployment"),
        (
            ["models", "add", str(DATA / "garbage.tflite"), "--name", "m", "--version", "1"],
            "not a TFLite model",
        ),
        (["rollout", "start", "ghost:1"], "unknown model 'ghost:1'"),
        (["rollout", "status", "ro-x"], "unknown deployment or rollout 'ro-x'"),
        (["rollout", "pause", "ro-x"], "unknown deployment or rollout 'ro-x'"),
    ],
)
def test_bad_input_exits_2_with_a_clear_error(
    home: list[str], args: list[str], message: str
) -> None:
    result = runner.invoke(app, [*args, *home])
    assert result.exit_code == 2
    assert message in result.output


def test_deploy_and_show_deployment(home: list[str]) -> None:
    runner.invoke(app, ["devices", "register", "pi-1", "--profile", "rpi4", *home])
    result = runner.invoke(
        app, ["deploy", str(DATA / "tiny_fp32.tflite"), "--to", "pi-1", "--json", *home]
    )
    assert result.exit_code == 0, result.output
    dep = json.loads(result.output)
    assert dep["devices"][0]["state"] == "pending"
    shown = runner.invoke(app, ["deployments", "show", dep["id"], *home])
    assert "pi-1" in shown.output and "pending" in shown.output


def test_models_and_rollout_lifecycle(home: list[str]) -> None:
    for i in range(4):
        runner.invoke(app, ["devices", "register", f"pi-{i}", "--profile", "rpi4", *home])
    added = runner.invoke(
        app,
        ["models", "add", str(DATA / "tiny_int8.tflite"), "--name", "cnn", "--version", "2",
         "--profile", "rpi4", "--json", *home],
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    assert json.loads(added.output)["artifacts"][0]["profile"] == "rpi4"
    listed = runner.invoke(app, ["models", "list", *home])
    assert "cnn" in listed.output and "rpi4" in listed.output
    bad = runner.invoke(app, ["rollout", "start", "cnn:2", "--gate", "p95_ms>=3", *home])
    assert bad.exit_code == 2 and "METRIC<=NUMBER" in bad.output
    started = runner.invoke(
        app,
        ["rollout", "start", "cnn:2", "--to", "pi-*", "--waves", "25,100", "--gate",
         "p95_ms<=50", "--gate", "p95_regression<=10%", "--max-failures", "1", "--json", *home],
    )  # fmt: skip
    assert started.exit_code == 0, started.output
    ro = json.loads(started.output)
    assert ro["policy"]["gates"] == ["p95_ms<=50", "p95_regression<=10%"]
    assert [w["devices"] for w in ro["waves"]] == [1, 3]
    shown = runner.invoke(app, ["rollout", "status", ro["id"], *home])
    assert "p95_ms<=50" in shown.output and "WAVE" in shown.output
    assert ro["id"] in runner.invoke(app, ["rollout", "status", *home]).output
    for action, state in (("pause", "paused"), ("resume", "running"), ("abort", "aborted")):
        result = runner.invoke(app, ["rollout", action, ro["id"], "--json", *home])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["state"] == state
    again = runner.invoke(app, ["rollout", "resume", ro["id"], *home])
    assert again.exit_code == 2 and "is aborted, not paused" in again.output
    rolled = runner.invoke(app, ["rollout", "rollback", ro["id"], *home])
    assert rolled.exit_code == 0 and "rolled_back" in rolled.output


def test_profiles_list_and_show() -> None:
    listed = json.loads(runner.invoke(app, ["profiles", "list", "--json"]).output)
    assert {"rpi4", "pixel-8", "imx93"} <= {p["id"] for p in listed}
    shown = runner.invoke(app, ["profiles", "show", "imx93"])
    assert shown.exit_code == 0 and json.loads(shown.output)["compiler"]["kind"] == "vela"
    assert runner.invoke(app, ["profiles", "show", "nope"]).exit_code == 2


@pytest.mark.agent
def test_agent_benchmark_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = agent_main(["benchmark", str(DATA / "tiny_int8.tflite"), "--runs", "20", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    data = json.loads(out)
    assert data["runs"] == 20 and 0 < data["p50_ms"] <= data["p99_ms"]
    assert data["power_source"] == "estimated"


@pytest.mark.agent
def test_agent_benchmark_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_main(["benchmark", str(DATA / "tiny_fp32.tflite"), "--runs", "5"]) == 0
    out = capsys.readouterr().out
    assert "p50" in out and "p99" in out and "estimated" in out


@pytest.mark.agent
@pytest.mark.parametrize("name", ["garbage.tflite", "empty.tflite", "truncated.tflite"])
def test_agent_benchmark_bad_model(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_main(["benchmark", str(DATA / name)]) == 1
    assert "does not load" in capsys.readouterr().err


@pytest.mark.agent
def test_agent_benchmark_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_main(["benchmark", str(DATA / "nope.tflite")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.agent
@pytest.mark.parametrize("args", [["benchmark", "m.tflite", "--runs", "0"], ["explode"], []])
def test_agent_bad_arguments_exit_2(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        agent_main(args)
    assert exc.value.code == 2


@pytest.mark.agent
def test_agent_run_with_bad_config_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "d"\ndata_dir = "/tmp/x"\nwhat = 1\n')
    assert agent_main(["run", "--config", str(cfg)]) == 2
    assert "unknown key 'what'" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["edgefleet", "edgefleet-agent"])
def test_help_of_the_installed_console_script(script: str) -> None:
    exe = Path(sys.executable).parent / script
    out = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "usage" in out.stdout.lower()

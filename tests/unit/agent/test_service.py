"""`edgefleet-agent install-service` into a temp root: the unit, the config, their modes, and
the unit as systemd itself reads it (systemd-analyze verify where installed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.protocol.config import AgentConfig, dump_config
from agent.service import UNIT_TEMPLATE, plan_install

pytestmark = [pytest.mark.agent]


def _bundle(tmp_path: Path, tls: bool = False) -> Path:
    """A bundle like `devices register` writes: agent.toml without data_dir (+ TLS files)."""
    bundle = tmp_path / "bundle"
    bundle.mkdir(mode=0o700, parents=True)
    extra: dict[str, object] = {}
    if tls:
        for name in ("ca.crt", "device.crt", "device.key"):
            (bundle / name).write_text(f"-----BEGIN {name}-----\n")
            (bundle / name).chmod(0o600)
        extra = {"ca_file": "ca.crt", "cert_file": "device.crt", "key_file": "device.key"}
    config = AgentConfig(
        device_id="pi-1",
        data_dir=Path("."),
        broker="mqtts://b.lan:8884" if tls else "mqtt://127.0.0.1:1883",
        **extra,  # type: ignore[arg-type]
    )
    path = bundle / "agent.toml"
    path.write_text(dump_config(config, omit=("data_dir",)))
    path.chmod(0o600)
    return path


def _unit(text: str) -> dict[str, list[str]]:
    """key -> values of a unit file (repeated keys kept in order; comments skipped)."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith(("#", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        values.setdefault(key, []).append(value)
    return values


def test_installs_unit_and_config_into_a_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _bundle(tmp_path, tls=True)
    root = tmp_path / "root"
    assert main(["install-service", "--config", str(config), "--root", str(root)]) == 0
    etc = root / "etc" / "edgefleet-agent"
    assert {p.name: p.stat().st_mode & 0o777 for p in etc.iterdir()} == {
        name: 0o640 for name in ("agent.toml", "ca.crt", "device.crt", "device.key")
    }
    assert etc.stat().st_mode & 0o777 == 0o750
    assert (etc / "agent.toml").read_bytes() == config.read_bytes()
    unit_path = root / "etc" / "systemd" / "system" / "edgefleet-agent.service"
    assert unit_path.stat().st_mode & 0o777 == 0o644
    unit = _unit(unit_path.read_text())
    (exec_start,) = unit["ExecStart"]
    binary = exec_start.split()[0]
    assert Path(binary).parent == Path(sys.executable).parent
    assert exec_start.endswith("run --config /etc/edgefleet-agent/agent.toml")
    assert unit["User"] == ["edgefleet-agent"] and unit["Group"] == ["edgefleet-agent"]
    assert unit["Restart"] == ["on-failure"] and unit["StateDirectory"] == ["edgefleet-agent"]
    assert unit["TimeoutStopSec"] == ["150"] and unit["KillMode"] == ["mixed"]
    assert unit["RestartPreventExitStatus"] == ["2"], "a config error does not loop"
    assert unit["NoNewPrivileges"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    assert unit["WantedBy"] == ["multi-user.target"]
    out = capsys.readouterr().out
    assert "run: systemctl daemon-reload" in out and "run: systemctl enable --now" in out
    assert "run: useradd --system" in out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_installed_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert main(["install-service", "--config", str(_bundle(tmp_path)), "--root", str(root)]) == 0
    unit = root / "etc" / "systemd" / "system" / "edgefleet-agent.service"
    # Not --root: the ExecStart binary is this venv's, which exists on this host, not in root.
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "edgefleet-agent.service" not in done.stderr, done.stderr


def test_packaged_unit_documents_the_stop_budget() -> None:
    text = UNIT_TEMPLATE.read_text()
    assert "selftest_timeout_s, 120 s" in text and "TimeoutStopSec=150" in text


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    args = ["install-service", "--config", str(_bundle(tmp_path)), "--root", str(root)]
    assert main([*args, "--dry-run"]) == 0
    assert not root.exists()
    assert "would write" in capsys.readouterr().out


def test_bad_bundles_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope" / "agent.toml"
    assert main(["install-service", "--config", str(missing), "--root", str(tmp_path)]) == 2
    assert "no such config file" in capsys.readouterr().err
    config = _bundle(tmp_path, tls=True)
    (config.parent / "device.key").unlink()
    assert main(["install-service", "--config", str(config), "--root", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "key_file" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists(), "nothing written for a broken bundle"


def test_explicit_data_dir_outside_state_directory_is_flagged(tmp_path: Path) -> None:
    config = _bundle(tmp_path)
    config.write_text('data_dir = "/srv/agent"\n' + config.read_text())
    plan = plan_install(config, tmp_path / "root")
    assert any("ProtectSystem=strict" in note for note in plan.notes)
    assert not plan_install(_bundle(tmp_path / "b"), tmp_path / "root").notes

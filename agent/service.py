"""`edgefleet-agent install-service`: the systemd unit and the bundle's config, installed.

The unit ships in the package (agent/packaging/edgefleet-agent.service). Installing copies the
bundle (agent.toml and the TLS files it names) to /etc/edgefleet-agent/, root-owned and only
readable by the service's group, writes the unit with ExecStart pointing at the venv this
command runs from, creates the system user, and enables the service. `--root DIR` installs
into a tree instead of / (packaging, tests), `--dry-run` only prints what it would do.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.protocol.config import load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["SERVICE_NAME", "InstallPlan", "install_service", "plan_install", "unit_text"]

SERVICE_NAME = "edgefleet-agent"
SERVICE_USER = "edgefleet-agent"
CONFIG_DIR = Path("/etc/edgefleet-agent")
UNIT_DIR = Path("/etc/systemd/system")
UNIT_TEMPLATE = Path(__file__).resolve().parent / "packaging" / f"{SERVICE_NAME}.service"
# Config files: root-owned, readable by the service's group only; the directory likewise.
CONFIG_FILE_MODE = 0o640
CONFIG_DIR_MODE = 0o750
# A unit file is public (systemctl cat shows it to anyone); it holds no secret.
UNIT_MODE = 0o644
_TLS_KEYS = ("ca_file", "cert_file", "key_file")


class InstallError(RuntimeError):
    """The service cannot be installed (bad config, missing file, a failing system command)."""


@dataclass
class InstallPlan:
    """What install-service writes and runs; printed as it is carried out (or by --dry-run)."""

    root: Path
    unit_path: Path
    unit: str
    config_dir: Path
    files: dict[Path, Path] = field(default_factory=dict)  # source -> installed path
    commands: list[list[str]] = field(default_factory=list)  # run on the live system only
    notes: list[str] = field(default_factory=list)


def agent_command() -> list[str]:
    """How systemd starts this very installation: its console script, else python -m."""
    script = Path(sys.executable).parent / "edgefleet-agent"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "agent.cli"]


def unit_text(exec_start: list[str], config: Path, user: str = SERVICE_USER) -> str:
    """The packaged unit with ExecStart, User and Group set for this installation."""
    lines = []
    for line in UNIT_TEMPLATE.read_text().splitlines():
        if line.startswith("ExecStart="):
            args = [*exec_start, "run", "--config", str(config)]
            line = "ExecStart=" + " ".join(shlex.quote(a) for a in args)
        elif line.startswith(("User=", "Group=")):
            line = f"{line.split('=', 1)[0]}={user}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _under(root: Path, path: Path) -> Path:
    """`path` (absolute on the target system) inside the install root."""
    return root / path.relative_to("/")


def plan_install(
    config_path: Path, root: Path = Path("/"), user: str = SERVICE_USER
) -> InstallPlan:
    """Check the bundle and work out every file and command; InstallError names a problem."""
    config_path = config_path.resolve()
    config = load_config(config_path)  # ConfigError (a ValueError) names the key
    bundle = config_path.parent
    plan = InstallPlan(
        root=root,
        unit_path=_under(root, UNIT_DIR / f"{SERVICE_NAME}.service"),
        unit=unit_text(agent_command(), CONFIG_DIR / "agent.toml", user),
        config_dir=_under(root, CONFIG_DIR),
    )
    plan.files[config_path] = plan.config_dir / "agent.toml"
    for key in _TLS_KEYS:
        value = getattr(config, key)
        if value is None:
            continue
        source = Path(value)
        if not source.is_file():
            raise InstallError(f"{config_path}: {key} {value!r} does not exist")
        if source.parent != bundle:
            # agent.toml is copied verbatim; a file outside the bundle keeps its absolute path.
            plan.notes.append(f"{key} {value} is outside the bundle: left where it is")
            continue
        plan.files[source] = plan.config_dir / source.name
    if "data_dir" in tomllib.loads(config_path.read_text()) and not str(config.data_dir).startswith(
        "/var/lib/edgefleet-agent"
    ):
        plan.notes.append(
            f"agent.toml sets data_dir {config.data_dir}: the unit's ProtectSystem=strict makes it "
            "read-only; remove data_dir to use /var/lib/edgefleet-agent (StateDirectory)"
        )
    plan.commands = [
        [
            *("useradd", "--system", "--user-group", "--no-create-home"),
            *("--home-dir", "/var/lib/edgefleet-agent", "--shell", "/usr/sbin/nologin", user),
        ],
        ["chown", "-R", f"root:{user}", str(CONFIG_DIR)],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", "--now", SERVICE_NAME],
    ]
    return plan


def _user_exists(user: str) -> bool:
    """Whether the system user exists already (useradd would fail on it)."""
    try:
        pwd.getpwnam(user)
        grp.getgrnam(user)
    except KeyError:
        return False
    return True


def install_service(
    config_path: Path,
    *,
    root: Path = Path("/"),
    dry_run: bool = False,
    user: str = SERVICE_USER,
    echo: Callable[[str], None] = print,
) -> InstallPlan:
    """Install the unit and the config; on the live system also the user and `systemctl`.

    With a `root` other than / only files are written (into that tree) and the commands are
    printed, since they act on the running system. Needs root for /.
    """
    say = echo
    plan = plan_install(config_path, root, user)
    live = root.resolve() == Path("/")
    if live and not dry_run and os.geteuid() != 0:
        raise InstallError("install-service writes /etc and creates a user: run it with sudo")
    for note in plan.notes:
        say(f"note: {note}")
    verb = "would write" if dry_run else "wrote"
    if not dry_run:
        plan.config_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(plan.config_dir, CONFIG_DIR_MODE)
        for source, target in plan.files.items():
            partial = target.with_name(f".{target.name}.part")
            shutil.copyfile(source, partial)
            os.chmod(partial, CONFIG_FILE_MODE)
            os.replace(partial, target)
        plan.unit_path.parent.mkdir(parents=True, exist_ok=True)
        partial = plan.unit_path.with_name(f".{plan.unit_path.name}.part")
        partial.write_text(plan.unit)
        os.chmod(partial, UNIT_MODE)
        os.replace(partial, plan.unit_path)
    for source, target in plan.files.items():
        say(f"{verb} {target} (from {source}, mode {CONFIG_FILE_MODE:o})")
    say(f"{verb} {plan.unit_path}")
    systemd = Path("/run/systemd/system").is_dir()
    for command in plan.commands:
        text = shlex.join(command)
        if command[0] == "useradd" and live and _user_exists(user):
            continue
        if dry_run or not live or (command[0] == "systemctl" and not systemd):
            say(f"run: {text}")
            continue
        say(f"running: {text}")
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise InstallError(f"{text} failed ({done.returncode}): {done.stderr.strip()}")
    if live and not dry_run and not systemd:
        say(
            "note: systemd is not running here (PID 1 is not systemd): start the unit on the device"
        )
    return plan

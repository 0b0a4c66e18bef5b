"""One-step device onboarding: what `edgefleet up` serves, and the bundle a device needs for it.

`up` records in HOME/serving.json how devices reach it (broker URL, auth, TLS, topic root,
the broker's pid and files). `devices register` reads that record, so the bundle it writes
works against the controller as it runs, and prints the exact commands for the device.
docs/onboarding.md explains the choices.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field

from agent.protocol import DEFAULT_ROOT
from agent.protocol.transport import is_tls_url, parse_mqtt_url
from firmware_profiles.validation import FileContentError, read_json_model

if TYPE_CHECKING:
    from controller.brokers.base import BrokerHandle

__all__ = [
    "SERVING_FILE",
    "BundleTarget",
    "Serving",
    "ServingFileError",
    "device_commands",
    "onboard",
    "read_serving",
    "record_serving",
    "reload_broker_passwords",
    "resolve_target",
    "write_serving",
]

SERVING_FILE = "serving.json"
# What `edgefleet up` serves with no options: the embedded broker, anonymous, on loopback.
UP_DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
# Where the printed commands put the agent's virtualenv: one place root, a service user and a
# login user can all read (a home directory is 0700 on Debian 12, so not there).
DEVICE_VENV = "/opt/edgefleet-agent"
# psutil's process start time is rounded to the clock tick and the record is written right after
# start-up; a second of slack keeps the real `up` recognised while a reused pid is not.
PID_START_SLACK_S = 1.0


class ServingFileError(ValueError):
    """HOME/serving.json is not a record `up` wrote; names the file, the key and the problem."""


Url = Annotated[str, Field(min_length=1, strict=True)]


class Serving(BaseModel):
    """How a running (or the last) `edgefleet up` in a data dir is reached by devices.

    HOME/serving.json holds one, written by `up` (`write_serving`); unknown keys are refused.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pid: int = Field(ge=1, strict=True, description="Process id of the `edgefleet up` process")
    started_at: float = Field(
        ge=0, strict=True, description="When it started (Unix time): tells it from a reused pid"
    )
    device_broker: Url = Field(description="The broker URL devices connect to")
    auth: Literal["none", "password"] = Field(
        description="How devices authenticate at that broker"
    )
    topic_root: str = Field(
        default=DEFAULT_ROOT, min_length=1, strict=True, description="The fleet's MQTT topic root"
    )
    embedded: bool = Field(
        default=True,
        strict=True,
        description="Whether `up` runs the broker itself (else an external one)",
    )
    cert_broker: Url | None = Field(
        default=None,
        description="The client-certificate (mTLS) listener's URL, if the broker has one",
    )
    broker_pid: int | None = Field(
        default=None, ge=1, strict=True, description="Process id of the embedded mosquitto"
    )
    broker_dir: str | None = Field(
        default=None, min_length=1, strict=True, description="The embedded mosquitto's directory"
    )

    @property
    def running(self) -> bool:
        """Whether the `up` process that wrote this record is still alive (not a reused pid)."""
        try:
            created = psutil.Process(self.pid).create_time()
        except psutil.Error:
            return False
        # A process that started after the record was written only reuses the pid.
        return created <= self.started_at + PID_START_SLACK_S

    def broker_process(self) -> psutil.Process | None:
        """The embedded mosquitto of this record, if that very process still runs."""
        if self.broker_pid is None or self.broker_dir is None:
            return None
        try:
            process = psutil.Process(self.broker_pid)
            cmdline = process.cmdline()
        except psutil.Error:
            return None
        # Our mosquitto runs `-c BROKER_DIR/mosquitto.conf`; anything else only reuses the pid.
        return process if str(Path(self.broker_dir) / "mosquitto.conf") in cmdline else None


def write_serving(home: Path, serving: Serving) -> Path:
    """Record what `up` serves in HOME/serving.json (0600: it names the broker's files)."""
    from controller.security.identity import write_private

    path = home / SERVING_FILE
    write_private(path, (json.dumps(serving.model_dump(), indent=2) + "\n").encode())
    return path


def read_serving(home: Path) -> Serving | None:
    """The record of the running or last `up` in `home`; None when there is none.

    A bad record is a ServingFileError naming the file, the key and the problem: silently
    taking it for "no `up` ran" would give devices `up`'s loopback defaults.
    """
    try:
        return read_json_model(home / SERVING_FILE, Serving)
    except FileNotFoundError:
        return None
    except FileContentError as exc:
        raise ServingFileError(f"{exc}; run `edgefleet up` again to rewrite it") from None


def embedded_serving(
    *,
    host: str,
    url: str,
    secured: bool,
    tls_port: int | None,
    cert_port: int | None,
    topic_root: str,
    broker_pid: int | None,
    broker_dir: Path | None,
) -> Serving:
    """The record for `up`'s embedded broker: anonymous on loopback, else TLS + passwords."""
    if not secured:
        return Serving(
            pid=os.getpid(),
            started_at=time.time(),
            device_broker=url,
            auth="none",
            topic_root=topic_root,
            broker_pid=broker_pid,
            broker_dir=str(broker_dir) if broker_dir else None,
        )
    # The broker certificate covers the listen address, this host's names and loopback
    # (broker_config.default_server_names); a wildcard listener is reached by the FQDN.
    name = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    name = f"[{name}]" if ":" in name else name
    return Serving(
        pid=os.getpid(),
        started_at=time.time(),
        device_broker=f"mqtts://{name}:{tls_port}",
        auth="password",
        topic_root=topic_root,
        cert_broker=f"mqtts://{name}:{cert_port}" if cert_port else None,
        broker_pid=broker_pid,
        broker_dir=str(broker_dir) if broker_dir else None,
    )


def external_serving(broker: str, topic_root: str) -> Serving:
    """The record for `up --broker URL`: devices use the same broker, as the controller does."""
    return Serving(
        pid=os.getpid(),
        started_at=time.time(),
        device_broker=broker,
        auth="none",
        topic_root=topic_root,
        embedded=False,
    )


def record_serving(
    home: Path, handle: BrokerHandle | None, broker: str, *, host: str, topic_root: str
) -> Path:
    """Write HOME/serving.json for `up`: its embedded broker (`handle`) or the external `broker`."""
    if handle is None:
        serving = external_serving(broker, topic_root)
    else:
        serving = embedded_serving(
            host=host,
            url=handle.url,
            secured=handle.tls_port is not None,
            tls_port=handle.tls_port,
            cert_port=handle.cert_port,
            topic_root=topic_root,
            broker_pid=handle.pid,
            broker_dir=handle.data_dir,
        )
    return write_serving(home, serving)


@dataclass(frozen=True)
class BundleTarget:
    """The broker URL, auth and topic root a new bundle gets, and where they came from."""

    broker: str
    auth: str
    topic_root: str
    source: str
    warnings: tuple[str, ...] = ()


def resolve_target(
    home: Path, broker: str | None, auth: str | None, topic_root: str | None = None
) -> BundleTarget:
    """Pick the bundle's broker and auth: explicit options first, then what `up` serves.

    Without a record (no `up` ran in this data dir yet): `up`'s defaults (anonymous loopback),
    unless credentials were asked for, which mean the TLS broker of `edgefleet broker config`.
    ValueError names an impossible combination.
    """
    from controller.security.broker_config import default_device_broker_url

    serving = read_serving(home)
    warnings: list[str] = []
    if broker is not None:
        chosen_auth = auth or ("password" if is_tls_url(broker) else "none")
        root = topic_root or (serving.topic_root if serving else DEFAULT_ROOT)
        target = BundleTarget(broker, chosen_auth, root, "--broker")
    elif serving is not None:
        state = "running" if serving.running else "last run, not running now"
        chosen_auth = auth or serving.auth
        url = serving.device_broker
        if chosen_auth == "cert":
            if serving.cert_broker is None:
                raise ValueError(
                    f"the controller's broker ({serving.device_broker}) has no client-certificate "
                    "listener: use --auth password, or --broker URL of a broker that has one"
                )
            url = serving.cert_broker
        elif chosen_auth != serving.auth and serving.embedded:
            warnings.append(
                f"--auth {chosen_auth}, but `edgefleet up` serves auth {serving.auth} "
                f"on {url}: the device may be refused"
            )
        target = BundleTarget(
            url, chosen_auth, topic_root or serving.topic_root, f"`edgefleet up` ({state})"
        )
    elif auth in ("password", "cert"):
        target = BundleTarget(
            default_device_broker_url(auth),
            auth,
            topic_root or DEFAULT_ROOT,
            "`edgefleet broker config` defaults (no `edgefleet up` ran with this data dir)",
        )
    else:
        target = BundleTarget(
            UP_DEFAULT_BROKER,
            auth or "none",
            topic_root or DEFAULT_ROOT,
            "`edgefleet up` defaults (it has not run with this data dir yet)",
        )
    host, _ = parse_mqtt_url(target.broker)  # ValueError on a bad URL, before anything is written
    if host in ("127.0.0.1", "localhost", "::1"):
        warnings.append(
            f"the broker {target.broker} is loopback: only an agent on this machine (or a chroot "
            "sharing its network) reaches it; for other machines run `edgefleet up --host "
            "0.0.0.0` (TLS + passwords) and register again"
        )
    elif target.auth == "password" and not is_tls_url(target.broker):
        warnings.append(f"the password crosses the network in clear: {target.broker} is not TLS")
    return BundleTarget(
        target.broker, target.auth, target.topic_root, target.source, tuple(warnings)
    )


def reload_broker_passwords(home: Path, password_file: Path) -> str | None:
    """Make the running embedded mosquitto re-read its password file now (SIGHUP); what it did.

    The secured embedded broker reads the live HOME/security/passwd (`password_file`) and its
    watcher reloads it within a second anyway; the signal only makes the new device usable at
    once, before the operator copies the bundle.
    """
    serving = read_serving(home)
    if serving is None or serving.auth != "password" or not serving.embedded:
        return None
    broker = serving.broker_process() if serving.running else None
    if broker is None or not password_file.exists():
        return None
    try:
        broker.send_signal(signal.SIGHUP)
    except psutil.Error:
        return None
    return f"reloaded the running broker's passwords (pid {broker.pid})"


def device_commands(bundle: Path, device_id: str, wheel_name: str) -> list[str]:
    """The exact shell lines to run for the device: copy, install, start (or install a service).

    The bundle directory is copied to the device's home as `edgefleet-DEVICE`; the agent's
    wheel inside it carries its requirements (with armv7l markers: docs/packaging.md).
    """
    remote = f"edgefleet-{device_id}"
    return [
        "# 1. copy the bundle to the device (it holds the device's secrets: keep it private)",
        f"scp -rp {bundle} DEVICE:{remote}",
        "# 2. install on the device (Debian 12 / Raspberry Pi OS, arm64 or armv7l, no compiler)",
        "sudo apt-get install -y python3-venv python3-cffi python3-numpy python3-psutil",
        f"sudo python3 -m venv --system-site-packages {DEVICE_VENV}",
        f"sudo {DEVICE_VENV}/bin/pip install ~/{remote}/{wheel_name}",
        "# 3. start: in the foreground as you (data in ~/.local/share/edgefleet-agent) ...",
        f"{DEVICE_VENV}/bin/edgefleet-agent run --config ~/{remote}/agent.toml",
        "#    ... or as a systemd service (user edgefleet-agent, data in /var/lib/edgefleet-agent)",
        f"sudo {DEVICE_VENV}/bin/edgefleet-agent install-service --config ~/{remote}/agent.toml",
    ]


def onboard(
    home: Path,
    device_id: str,
    profile: str,
    *,
    auth: str | None = None,
    bundle: Path | None = None,
    broker: str | None = None,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """`devices register`: register, write the bundle (config + agent wheel), reload the broker.

    Returns the device row with the bundle, broker, where it came from, the device commands
    and warnings. FleetError / ValueError name what is wrong; nothing is written before the
    broker URL and auth are known to be usable.
    """
    from controller.fleet.agent_wheel import build_agent_wheel
    from controller.fleet.registry import Fleet

    if auth is not None and auth not in ("password", "cert", "none"):
        raise ValueError(f"unknown auth {auth!r}: expected one of password, cert, none")
    target = resolve_target(home, broker, auth)
    fleet = Fleet(home)
    try:
        row = fleet.register_device(
            device_id,
            profile,
            auth=target.auth,
            bundle_dir=bundle,
            broker_url=target.broker,
            topic_root=target.topic_root,
            agent_data_dir=data_dir,
        )
    finally:
        fleet.close()
    bundle_dir = Path(row["bundle"])
    wheel = build_agent_wheel(bundle_dir)
    reloaded = None
    broker_steps: list[str] = []
    if target.auth in ("password", "cert"):
        from controller.security.broker_config import refresh_broker_copies
        from controller.security.identity import FleetSecurity

        security = FleetSecurity(home)
        if target.auth == "password":
            reloaded = reload_broker_passwords(home, security.passwords.path)
        # `broker config --out` outputs get fresh passwd/acl copies; their operator reloads.
        broker_steps = refresh_broker_copies(security)
    row.update(
        broker=target.broker,
        broker_source=target.source,
        broker_reloaded=reloaded,
        broker_steps=broker_steps,
        topic_root=target.topic_root,
        config=str(bundle_dir / "agent.toml"),
        wheel=str(wheel),
        commands=device_commands(bundle_dir, device_id, wheel.name),
        warnings=list(target.warnings),
    )
    return row

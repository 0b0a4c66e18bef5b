"""Agent configuration (agent.toml): strict keys, every path and knob in one place."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from agent.protocol import DEFAULT_ROOT, ProtocolError, validate_device_id
from agent.protocol.schema import decode_dataclass
from agent.protocol.signing import PUBLIC_KEY_BYTES, decode_b64

# Where an agent keeps its data when agent.toml names no data_dir (docs/agent.md): systemd's
# StateDirectory= first, then the FHS place for root, then the XDG place for everyone else.
SYSTEM_DATA_DIR = "/var/lib/edgefleet-agent"
USER_DATA_SUBDIR = "edgefleet-agent"


def default_data_dir(
    environ: dict[str, str] | None = None, euid: int | None = None, home: Path | None = None
) -> Path:
    """The data dir for an agent.toml without `data_dir`, from who runs the agent and how.

    Under systemd with StateDirectory= the unit's $STATE_DIRECTORY; as root
    /var/lib/edgefleet-agent; otherwise $XDG_DATA_HOME/edgefleet-agent, by default
    ~/.local/share/edgefleet-agent. So one bundle fits a service, root and a normal user.
    """
    env = os.environ if environ is None else environ
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state)
    if (os.geteuid() if euid is None else euid) == 0:
        return Path(SYSTEM_DATA_DIR)
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / USER_DATA_SUBDIR
    return (home or Path.home()) / ".local" / "share" / USER_DATA_SUBDIR


class ConfigError(ValueError):
    """agent.toml is unreadable or holds an unknown, missing or mistyped key."""


@dataclass(frozen=True)
class PowerModelConfig:
    """The profile's power model, used to estimate power where no sensor exists."""

    idle_w: float = 2.0
    active_w_per_core: float = 1.0
    accelerator_active_w: float = 0.0


@dataclass(frozen=True)
class AgentConfig:
    """Everything an agent needs to run: identity, broker, storage and measurement settings."""

    device_id: str
    data_dir: Path
    broker: str = "mqtt://127.0.0.1:1883"
    topic_root: str = DEFAULT_ROOT
    profile: str | None = None
    username: str | None = None
    password: str | None = None
    # TLS (broker URL mqtts://): the CA that signed the broker's certificate (None = the system's
    # CAs), and a client certificate + key for certificate authentication. Relative paths in
    # agent.toml are resolved against the file's directory (a provisioning bundle is one dir).
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Fleet verify keys (base64 raw ed25519 public keys) that desired states, manifests and key
    # rotations must be signed with; empty = development mode, nothing checked (docs/security.md).
    trusted_keys: tuple[str, ...] = ()
    threads: int | None = None
    benchmark_runs: int = 50
    benchmark_warmup: int = 5
    # Whole-download limit; a 8 MiB artifact moves in ~1.5 s, so 300 s only trips on a dead link.
    fetch_timeout_s: float = 300.0
    # Ask again for missing chunks after this much silence (repair of lost QoS1 deliveries).
    repair_interval_s: float = 2.0
    # A model whose first load + golden run takes longer than this is rejected.
    selftest_timeout_s: float = 120.0
    # Latency budget for the self-test, from the profile (0 = no budget).
    latency_budget_ms: float = 0.0
    # Memory budget for the self-test child's peak RSS, from the profile (0 = no budget).
    memory_budget_mb: float = 0.0
    # Local inference service (docs/inference.md): a Unix socket, "" to turn it off; relative
    # paths are under data_dir. Optional localhost HTTP as "127.0.0.1:PORT" for non-Python apps.
    serve_socket: str = "infer.sock"
    serve_http: str | None = None
    # Micro-batching: wait up to this long for more requests (0 = off), merge at most max_batch.
    batch_window_ms: float = 0.0
    max_batch: int = 8
    # Bounded result cache keyed by (model, input hash); 0 = off, the default: inputs rarely repeat.
    result_cache_entries: int = 0
    # One telemetry record per interval; 10 s keeps 100,000 devices near 10k records/s fleet-wide.
    telemetry_interval_s: float = 10.0
    # Durable spool bound: 10,000 records is 27 h of 10 s intervals offline, ~6 MB of SQLite.
    spool_max_records: int = 10_000
    # Which record goes when the spool is full: the oldest (keep recent state) or the newest.
    spool_overflow: str = "drop_oldest"
    # Acknowledged records kept for the controller's resend requests (gaps after broker loss).
    spool_keep_acked: int = 1_000
    power: PowerModelConfig = field(default_factory=PowerModelConfig)

    def __post_init__(self) -> None:
        """Validate the device id and numeric ranges."""
        try:
            validate_device_id(self.device_id)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file and key_file must be given together (client certificate)")
        tls_keys = [k for k in ("ca_file", "cert_file", "key_file") if getattr(self, k)]
        if tls_keys and not self.broker.lower().startswith(("mqtts://", "ssl://")):
            raise ConfigError(
                f"{', '.join(tls_keys)} set but broker {self.broker!r} is not TLS: use mqtts://"
            )
        for key in self.trusted_keys:
            try:
                decode_b64(key, PUBLIC_KEY_BYTES, f"trusted_keys entry {key[:20]!r}")
            except ValueError as exc:
                raise ConfigError(f"{exc} (expected a base64 raw ed25519 public key)") from None
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.spool_overflow not in ("drop_oldest", "drop_newest"):
            raise ConfigError(
                "spool_overflow must be 'drop_oldest' or 'drop_newest', "
                f"got {self.spool_overflow!r}"
            )
        for name in ("max_batch", "spool_max_records"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("batch_window_ms", "result_cache_entries", "spool_keep_acked"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.telemetry_interval_s <= 0:
            raise ConfigError(f"telemetry_interval_s must be > 0, got {self.telemetry_interval_s}")

    @property
    def socket_path(self) -> Path | None:
        """The inference service's Unix socket, or None when it is turned off."""
        if not self.serve_socket:
            return None
        return self.data_dir / self.serve_socket

    @property
    def spool_path(self) -> Path:
        """Durable telemetry spool (SQLite)."""
        return self.data_dir / "telemetry.db"

    @property
    def models_dir(self) -> Path:
        """Content-addressed model store."""
        return self.data_dir / "models"

    @property
    def downloads_dir(self) -> Path:
        """Partial downloads with their chunk bitmaps."""
        return self.data_dir / "downloads"


_TLS_FILE_KEYS = ("ca_file", "cert_file", "key_file")


def _config_error(exc: ProtocolError, source: str) -> ConfigError:
    """The decoder's `$.key: problem` in agent.toml's terms: the file, then the key."""
    where, _, problem = str(exc).partition(": ")
    key = where.removeprefix("$").lstrip(".")
    if problem == "unknown field":
        return ConfigError(f"{source}: unknown key '{key}'")
    if problem == "missing field":
        return ConfigError(f"{source}: missing key '{key}'")
    return ConfigError(f"{source}: '{key}': {problem}" if key else f"{source}: {problem}")


def config_from_dict(
    data: dict[str, Any], source: str = "<dict>", base_dir: Path | None = None
) -> AgentConfig:
    """Build an AgentConfig from parsed TOML, naming the file and key of anything wrong.

    The protocol's strict decoder checks every key and type (one validation approach for the
    wire, update.json and agent.toml). `~` is expanded; relative TLS file paths are resolved
    against `base_dir` (the config file's directory).
    """
    if "data_dir" not in data:  # the default place for who runs the agent and how
        data = {**data, "data_dir": str(default_data_dir())}
    try:
        config = decode_dataclass(data, AgentConfig)
    except ProtocolError as exc:
        raise _config_error(exc, source) from None
    paths: dict[str, Any] = {"data_dir": config.data_dir.expanduser()}
    for key in _TLS_FILE_KEYS:
        value = getattr(config, key)
        if value is not None:
            path = Path(value).expanduser()
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            paths[key] = str(path)
    return dataclasses.replace(config, **paths)


def load_config(path: Path) -> AgentConfig:
    """Read agent.toml."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    return config_from_dict(data, str(path), base_dir=path.resolve().parent)


def dump_config(config: AgentConfig, omit: tuple[str, ...] = ()) -> str:
    """Render a config as agent.toml text (used by the controller to write device bundles).

    Keys in `omit` are left out, e.g. data_dir so the device picks its own (default_data_dir).
    """
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "power" or f.name in omit or value is None or value == ():
            continue
        if isinstance(value, Path):
            value = str(value)
        lines.append(f"{f.name} = {_toml_value(value)}")
    lines.append("")
    lines.append("[power]")
    for f in dataclasses.fields(PowerModelConfig):
        lines.append(f"{f.name} = {_toml_value(getattr(config.power, f.name))}")
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    """Render one scalar as TOML."""
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)

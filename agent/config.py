"""Agent configuration (agent.toml): strict keys, every path and knob in one place."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from agent.protocol import DEFAULT_ROOT, validate_device_id
from agent.protocol.signing import PUBLIC_KEY_BYTES, decode_b64


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


_TYPES: dict[str, tuple[type, ...]] = {
    "device_id": (str,),
    "data_dir": (str,),
    "broker": (str,),
    "topic_root": (str,),
    "profile": (str,),
    "username": (str,),
    "password": (str,),
    "ca_file": (str,),
    "cert_file": (str,),
    "key_file": (str,),
    "trusted_keys": (list,),
    "threads": (int,),
    "benchmark_runs": (int,),
    "benchmark_warmup": (int,),
    "fetch_timeout_s": (int, float),
    "repair_interval_s": (int, float),
    "selftest_timeout_s": (int, float),
    "latency_budget_ms": (int, float),
    "memory_budget_mb": (int, float),
    "serve_socket": (str,),
    "serve_http": (str,),
    "batch_window_ms": (int, float),
    "max_batch": (int,),
    "result_cache_entries": (int,),
    "telemetry_interval_s": (int, float),
    "spool_max_records": (int,),
    "spool_overflow": (str,),
    "spool_keep_acked": (int,),
}


_TLS_FILE_KEYS = ("ca_file", "cert_file", "key_file")


def config_from_dict(
    data: dict[str, Any], source: str = "<dict>", base_dir: Path | None = None
) -> AgentConfig:
    """Build an AgentConfig from parsed TOML, naming the file and key of anything wrong.

    Relative TLS file paths are resolved against `base_dir` (the config file's directory).
    """
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "power":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [power] must be a table")
            known = {f.name for f in dataclasses.fields(PowerModelConfig)}
            for pkey, pval in value.items():
                if pkey not in known:
                    raise ConfigError(f"{source}: unknown key 'power.{pkey}'")
                if isinstance(pval, bool) or not isinstance(pval, (int, float)):
                    raise ConfigError(f"{source}: 'power.{pkey}' must be a number")
            kwargs["power"] = PowerModelConfig(**{k: float(v) for k, v in value.items()})
            continue
        if key not in _TYPES:
            raise ConfigError(f"{source}: unknown key '{key}'")
        if isinstance(value, bool) or not isinstance(value, _TYPES[key]):
            names = " or ".join(t.__name__ for t in _TYPES[key])
            raise ConfigError(f"{source}: '{key}' must be {names}, got {value!r}")
        if key == "trusted_keys":
            keys = cast("list[object]", value)  # _TYPES made sure it is a list
            if not all(isinstance(k, str) for k in keys):
                raise ConfigError(f"{source}: 'trusted_keys' must be a list of base64 strings")
            value = tuple(keys)
        kwargs[key] = value
    for required in ("device_id", "data_dir"):
        if required not in kwargs:
            raise ConfigError(f"{source}: missing key '{required}'")
    kwargs["data_dir"] = Path(os.path.expanduser(kwargs["data_dir"]))
    for key in _TLS_FILE_KEYS:
        if key in kwargs:
            path = Path(os.path.expanduser(kwargs[key]))
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            kwargs[key] = str(path)
    return AgentConfig(**kwargs)


def load_config(path: Path) -> AgentConfig:
    """Read agent.toml."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    return config_from_dict(data, str(path), base_dir=path.resolve().parent)


def dump_config(config: AgentConfig) -> str:
    """Render a config as agent.toml text (used by the controller to write device bundles)."""
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "power" or value is None or value == ():
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

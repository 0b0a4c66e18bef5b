"""Device profile schema: frozen dataclasses that validate themselves, so bad ones cannot exist."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from types import MappingProxyType
from typing import Any, NoReturn

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# Leading numeric release plus an optional tail: "2.14.0", "2.5.0.post1", "0.dev20261023182759".
VERSION_PATTERN = re.compile(r"[0-9]+(\.[0-9A-Za-z]+)*([+-][0-9A-Za-z.]+)?")
DELEGATE_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
OPTION_KEY_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")

DEVICE_CLASSES = ("phone", "sbc", "npu-board", "mcu-npu", "x86")
ARCHES = ("x86_64", "aarch64", "armv7l", "cortex-m")
RUNTIMES = ("tflite-runtime", "ai-edge-litert", "tflite-micro", "android-litert")
ACCELERATOR_KINDS = ("npu", "gpu", "tpu", "dsp")
QUANTIZATIONS = ("fp32", "fp16", "dynamic", "int8", "int16x8", "weight-int8", "weight-int4")
COMPILERS = ("none", "vela", "edgetpu")
# The accelerator configurations Vela accepts (ethosu.vela.architecture_features.Accelerator).
VELA_ACCELERATORS = (
    "ethos-u55-32", "ethos-u55-64", "ethos-u55-128", "ethos-u55-256",
    "ethos-u65-256", "ethos-u65-512",
    "ethos-u85-128", "ethos-u85-256", "ethos-u85-512", "ethos-u85-1024", "ethos-u85-2048",
)  # fmt: skip
# The delegate each compiler's output needs on the device.
COMPILER_DELEGATES = {"vela": "ethos-u", "edgetpu": "edgetpu"}
SOURCE_KEYS = (
    "soc", "cpu", "memory", "runtime", "accelerators", "quantization", "compiler", "power",
    "budgets",
)  # fmt: skip
REQUIRED_SOURCES = ("cpu", "memory", "power", "runtime")


class ProfileError(ValueError):
    """A device profile is invalid or unknown; the message names the file and the dotted key."""


def _fail(key: str, problem: str) -> NoReturn:
    """Raise the one error shape every check uses: the dotted key, then what is wrong with it."""
    raise ProfileError(f"'{key}' {problem}")


def _choices(allowed: tuple[str, ...]) -> str:
    """Render allowed values for an error message."""
    return ", ".join(allowed)


def _check_str(value: object, key: str, choices: tuple[str, ...] | None = None) -> None:
    """Require a non-empty string, and one of `choices` when given."""
    if not isinstance(value, str) or not value.strip():
        _fail(key, f"must be a non-empty string, got {value!r}")
    if choices is not None and value not in choices:
        _fail(key, f"must be one of {_choices(choices)}; got {value!r}")


def _check_pattern(value: object, key: str, pattern: re.Pattern[str], what: str) -> None:
    """Require a string that matches `pattern` completely."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        _fail(key, f"must be {what}, got {value!r}")


def _check_int(value: object, key: str, minimum: int) -> None:
    """Require an integer (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(key, f"must be an integer, got {value!r}")
    if value < minimum:
        _fail(key, f"must be >= {minimum}, got {value}")


def _check_number(value: object, key: str, positive: bool) -> None:
    """Require an int or float (not a bool) that is > 0 when `positive`, else >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail(key, f"must be a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        _fail(key, f"must be {'> 0' if positive else '>= 0'}, got {value}")


def _check_bool(value: object, key: str) -> None:
    """Require true or false."""
    if not isinstance(value, bool):
        _fail(key, f"must be true or false, got {value!r}")


def _freeze_mapping(owner: object, name: str, key: str) -> Mapping[str, Any]:
    """Replace a mapping field with a read-only copy so the frozen object stays immutable."""
    value = getattr(owner, name)
    if not isinstance(value, Mapping):
        _fail(key, f"must be a table, got {value!r}")
    frozen = MappingProxyType(dict(value))
    object.__setattr__(owner, name, frozen)
    return frozen


@dataclass(frozen=True)
class Cpu:
    """CPU facts: used to match devices and to estimate per-core power."""

    arch: str
    cores: int
    description: str
    big_cores: int = 0

    def __post_init__(self) -> None:
        """Validate arch, core counts and the description."""
        _check_str(self.arch, "cpu.arch", ARCHES)
        _check_int(self.cores, "cpu.cores", 1)
        _check_int(self.big_cores, "cpu.big_cores", 0)
        if self.big_cores > self.cores:
            _fail("cpu.big_cores", f"must be <= cpu.cores ({self.cores}), got {self.big_cores}")
        _check_str(self.description, "cpu.description")


@dataclass(frozen=True)
class Memory:
    """RAM and the shares of RAM and storage a model may take on this device."""

    ram_mb: int
    model_ram_budget_mb: float
    storage_budget_mb: float

    def __post_init__(self) -> None:
        """Validate sizes; a model budget larger than the RAM would be a typo."""
        _check_int(self.ram_mb, "memory.ram_mb", 1)
        _check_number(self.model_ram_budget_mb, "memory.model_ram_budget_mb", positive=True)
        _check_number(self.storage_budget_mb, "memory.storage_budget_mb", positive=True)
        if self.model_ram_budget_mb > self.ram_mb:
            _fail(
                "memory.model_ram_budget_mb",
                f"must be <= memory.ram_mb ({self.ram_mb}), got {self.model_ram_budget_mb}",
            )


@dataclass(frozen=True)
class Runtime:
    """The TFLite runtime on the device; its version bounds the op versions a model may use."""

    name: str
    version: str

    def __post_init__(self) -> None:
        """Validate the runtime name and the version's shape."""
        _check_str(self.name, "runtime.name", RUNTIMES)
        _check_pattern(self.version, "runtime.version", VERSION_PATTERN, "a version like 2.14.0")

    @property
    def version_tuple(self) -> tuple[int, ...]:
        """The leading numeric parts of the version, for comparisons: "2.5.0.post1" -> (2, 5, 0)."""
        parts: list[int] = []
        for piece in re.split(r"[.+-]", self.version):
            if not piece.isdigit():
                break
            parts.append(int(piece))
        return tuple(parts)


@dataclass(frozen=True)
class Accelerator:
    """One accelerator and the delegate that reaches it."""

    name: str
    kind: str
    delegate: str
    int8_only: bool = False

    def __post_init__(self) -> None:
        """Validate the fields; errors name the accelerator since the array index is not known."""
        _check_str(self.name, "accelerators.name")
        try:
            _check_str(self.kind, "accelerators.kind", ACCELERATOR_KINDS)
            _check_pattern(
                self.delegate,
                "accelerators.delegate",
                DELEGATE_PATTERN,
                "a lowercase delegate name such as gpu, nnapi, edgetpu, vx, ethos-u",
            )
            _check_bool(self.int8_only, "accelerators.int8_only")
        except ProfileError as exc:
            raise ProfileError(f"{exc} (accelerator {self.name!r})") from None


@dataclass(frozen=True)
class Quantization:
    """The quantization recipes the optimizer may produce here, and the one it tries first."""

    preferred: str
    allowed: tuple[str, ...]

    def __post_init__(self) -> None:
        """Validate the recipes; the preferred one must be allowed."""
        if isinstance(self.allowed, list):
            object.__setattr__(self, "allowed", tuple(self.allowed))
        if not isinstance(self.allowed, tuple) or not self.allowed:
            _fail("quantization.allowed", f"must be a non-empty array, got {self.allowed!r}")
        for recipe in self.allowed:
            _check_str(recipe, "quantization.allowed", QUANTIZATIONS)
        if len(set(self.allowed)) != len(self.allowed):
            _fail("quantization.allowed", f"has duplicates: {list(self.allowed)}")
        _check_str(self.preferred, "quantization.preferred", QUANTIZATIONS)
        if self.preferred not in self.allowed:
            _fail(
                "quantization.preferred",
                f"must be one of quantization.allowed ({_choices(self.allowed)}); "
                f"got {self.preferred!r}",
            )


@dataclass(frozen=True)
class Compiler:
    """The ahead-of-time compiler for this device (Vela, edgetpu_compiler) and its options."""

    kind: str
    options: Mapping[str, str | int] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        """Validate the kind and options; Vela cannot run without an accelerator_config."""
        _check_str(self.kind, "compiler.kind", COMPILERS)
        options = _freeze_mapping(self, "options", "compiler.options")
        for key, value in options.items():
            _check_pattern(key, "compiler.options", OPTION_KEY_PATTERN, "a snake_case option name")
            if isinstance(value, bool) or not isinstance(value, str | int):
                _fail(f"compiler.options.{key}", f"must be a string or an integer, got {value!r}")
        if self.kind == "none" and options:
            _fail(
                "compiler.options", f"must be empty when compiler.kind is 'none': {dict(options)}"
            )
        if self.kind == "vela":
            if "accelerator_config" not in options:
                _fail("compiler.options.accelerator_config", "is required for compiler 'vela'")
            _check_str(
                options["accelerator_config"],
                "compiler.options.accelerator_config",
                VELA_ACCELERATORS,
            )
            # Vela refuses a --config file unless the system config and memory mode are named too.
            for needed in ("system_config", "memory_mode"):
                if "config" in options and needed not in options:
                    _fail(f"compiler.options.{needed}", "is required with compiler.options.config")


@dataclass(frozen=True)
class Power:
    """A linear power model for estimates on devices without a power sensor."""

    idle_w: float
    active_w_per_core: float
    accelerator_active_w: float = 0.0

    def __post_init__(self) -> None:
        """Validate that every figure is a non-negative number."""
        _check_number(self.idle_w, "power.idle_w", positive=False)
        _check_number(self.active_w_per_core, "power.active_w_per_core", positive=False)
        _check_number(self.accelerator_active_w, "power.accelerator_active_w", positive=False)

    def estimate_w(self, busy_cores: float, accelerator_busy: float = 0.0) -> float:
        """Watts with `busy_cores` cores busy and the accelerator busy for a 0..1 share of time."""
        return (
            self.idle_w
            + self.active_w_per_core * max(busy_cores, 0.0)
            + self.accelerator_active_w * min(max(accelerator_busy, 0.0), 1.0)
        )


@dataclass(frozen=True)
class Budgets:
    """Default self-test and rollout limits for this device class."""

    latency_ms: float
    peak_rss_mb: float

    def __post_init__(self) -> None:
        """Validate that both limits are positive numbers."""
        _check_number(self.latency_ms, "budgets.latency_ms", positive=True)
        _check_number(self.peak_rss_mb, "budgets.peak_rss_mb", positive=True)


_CPU_PART_PATTERN = re.compile(r"0x[0-9a-f]{1,4}")


@dataclass(frozen=True)
class Match:
    """How a device proves it is this board (firmware_profiles/identity.py scores it).

    Case-insensitive substrings of the device-tree model (`boards`) and of the SoC identifiers
    (`socs`: device-tree compatible entries, cpuinfo Hardware), and cpuinfo CPU part numbers.
    """

    boards: tuple[str, ...] = ()
    socs: tuple[str, ...] = ()
    cpu_parts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Turn lists into tuples of non-empty strings; CPU parts as lowercase 0x hex."""
        for name in ("boards", "socs", "cpu_parts"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple):
                _fail(f"match.{name}", f"must be an array of strings, got {value!r}")
            for item in value:
                _check_str(item, f"match.{name}")
            object.__setattr__(self, name, tuple(value))
        for part in self.cpu_parts:
            _check_pattern(part, "match.cpu_parts", _CPU_PART_PATTERN, "lowercase hex like 0xd08")


@dataclass(frozen=True)
class Profile:
    """A device class: what the hardware is, what runs on it, and where each figure comes from."""

    id: str
    name: str
    device_class: str = field(metadata={"toml": "class"})
    soc: str
    runs_agent: bool
    cpu: Cpu = field(metadata={"section": Cpu})
    memory: Memory = field(metadata={"section": Memory})
    runtime: Runtime = field(metadata={"section": Runtime})
    quantization: Quantization = field(metadata={"section": Quantization})
    compiler: Compiler = field(metadata={"section": Compiler})
    power: Power = field(metadata={"section": Power})
    budgets: Budgets = field(metadata={"section": Budgets})
    sources: Mapping[str, str] = field(hash=False)
    accelerators: tuple[Accelerator, ...] = field(default=(), metadata={"array_of": Accelerator})
    identity: Match = field(default_factory=Match, metadata={"section": Match, "toml": "match"})
    # Where the profile was loaded from; not part of the TOML schema nor of equality.
    path: str | None = field(default=None, compare=False, metadata={"toml": None})

    def __post_init__(self) -> None:
        """Validate own fields, section types and the rules that span sections."""
        _check_pattern(self.id, "id", ID_PATTERN, "lowercase [a-z0-9][a-z0-9._-]{0,63}")
        _check_str(self.name, "name")
        _check_str(self.device_class, "class", DEVICE_CLASSES)
        _check_str(self.soc, "soc")
        _check_bool(self.runs_agent, "runs_agent")
        for f in fields(self):
            section = f.metadata.get("section")
            if section is not None and not isinstance(getattr(self, f.name), section):
                _fail(f.name, f"must be a {section.__name__}, got {getattr(self, f.name)!r}")
        self._check_accelerators()
        self._check_sources()
        self._check_consistency()

    def _check_accelerators(self) -> None:
        """Turn a list into a tuple and require Accelerator items with unique names."""
        if isinstance(self.accelerators, list):
            object.__setattr__(self, "accelerators", tuple(self.accelerators))
        if not isinstance(self.accelerators, tuple):
            _fail("accelerators", f"must be an array of tables, got {self.accelerators!r}")
        names = [a.name for a in self.accelerators if isinstance(a, Accelerator)]
        if len(names) != len(self.accelerators):
            _fail("accelerators", "must contain only Accelerator entries")
        if len(set(names)) != len(names):
            _fail("accelerators", f"names must be unique, got {names}")

    def _check_sources(self) -> None:
        """Require a non-empty source string for at least cpu, memory, power and runtime."""
        sources = _freeze_mapping(self, "sources", "sources")
        for key, value in sources.items():
            if key not in SOURCE_KEYS:
                _fail(f"sources.{key}", f"is not a section; use one of {_choices(SOURCE_KEYS)}")
            _check_str(value, f"sources.{key}")
        for key in REQUIRED_SOURCES:
            if key not in sources:
                _fail(f"sources.{key}", "is required: say where the figure comes from")

    def _check_consistency(self) -> None:
        """Rules across sections: MCUs run no agent, compilers need their delegate and int8."""
        mcu = self.device_class == "mcu-npu"
        if mcu and self.runs_agent:
            _fail("runs_agent", "must be false for class 'mcu-npu' (no Python agent on an MCU)")
        if (self.cpu.arch == "cortex-m") != mcu:
            _fail("cpu.arch", "must be 'cortex-m' exactly when class is 'mcu-npu'")
        if (self.runtime.name == "tflite-micro") != mcu:
            _fail("runtime.name", "must be 'tflite-micro' exactly when class is 'mcu-npu'")
        if self.budgets.peak_rss_mb > self.memory.ram_mb:
            _fail("budgets.peak_rss_mb", f"must be <= memory.ram_mb ({self.memory.ram_mb})")
        needed = COMPILER_DELEGATES.get(self.compiler.kind)
        if needed is not None:
            kind = self.compiler.kind
            if needed not in self.delegates:
                _fail("compiler.kind", f"{kind!r} needs an accelerator with delegate {needed!r}")
            if "int8" not in self.quantization.allowed:
                _fail("quantization.allowed", f"must include 'int8' for compiler {kind!r}")

    @property
    def delegates(self) -> tuple[str, ...]:
        """The delegate names of this profile's accelerators, in file order."""
        return tuple(a.delegate for a in self.accelerators)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the TOML schema's keys (so `class`, not `device_class`)."""
        plain: dict[str, Any] = _plain(self)
        return plain


def _toml_key(f: Field[Any]) -> str | None:
    """The TOML key of a dataclass field, or None when the field is not loadable from TOML."""
    key: str | None = f.metadata.get("toml", f.name)
    return key


def _plain(value: Any) -> Any:
    """Convert dataclasses, tuples and mappings into plain JSON types, using TOML key names."""
    if is_dataclass(value) and not isinstance(value, type):
        return {
            key: _plain(getattr(value, f.name))
            for f in fields(value)
            if (key := _toml_key(f)) is not None
        }
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _join(prefix: str, key: str) -> str:
    """Dotted key of `key` inside `prefix`."""
    return f"{prefix}.{key}" if prefix else key


def build(cls: type[Any], table: object, prefix: str = "") -> Any:
    """Build dataclass `cls` from a parsed TOML table, rejecting unknown and missing keys."""
    if not isinstance(table, Mapping):
        _fail(prefix, f"must be a table, got {table!r}")
    by_key = {key: f for f in fields(cls) if (key := _toml_key(f)) is not None}
    for key in table:
        if key not in by_key:
            raise ProfileError(f"unknown key '{_join(prefix, key)}'")
    kwargs: dict[str, Any] = {}
    for key, f in by_key.items():
        dotted = _join(prefix, key)
        if key not in table:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ProfileError(f"missing required key '{dotted}'")
            continue
        value = table[key]
        if (section := f.metadata.get("section")) is not None:
            value = build(section, value, dotted)
        elif (item_cls := f.metadata.get("array_of")) is not None:
            if not isinstance(value, list):
                _fail(dotted, f"must be an array of tables ([[{dotted}]]), got {value!r}")
            value = tuple(build(item_cls, item, f"{dotted}[{i}]") for i, item in enumerate(value))
        kwargs[f.name] = value
    return cls(**kwargs)

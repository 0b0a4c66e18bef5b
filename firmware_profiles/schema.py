"""Device profile schema: frozen pydantic dataclasses, so a bad profile cannot exist.

Each TOML key is a field with its description (docs/schemas/profile.schema.json is generated
from them); unknown keys are refused; rules across keys are validators. Errors are one line
naming the dotted key (firmware_profiles/validation.py), also when a section is built in code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    Strict,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic.json_schema import SkipJsonSchema, WithJsonSchema

from firmware_profiles.fields import (
    CONFIG,
    Bool,
    Int,
    Number,
    ProfileError,
    Table,
    Text,
    anchored,
    frozen_table,
    matching,
    section,
)
from firmware_profiles.validation import describe, one_line, rule_error

__all__ = [
    "Accelerator", "Budgets", "Compiler", "Cpu", "Match", "Memory", "Power", "Profile",
    "ProfileError", "Quantization", "Runtime", "build", "json_schema",
]  # fmt: skip

T = TypeVar("T")

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# Leading numeric release plus an optional tail: "2.14.0", "2.5.0.post1", "0.dev20261023182759".
VERSION_PATTERN = re.compile(r"[0-9]+(\.[0-9A-Za-z]+)*([+-][0-9A-Za-z.]+)?")
DELEGATE_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
OPTION_KEY_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
CPU_PART_PATTERN = re.compile(r"0x[0-9a-f]{1,4}")

DeviceClass = Literal["phone", "sbc", "npu-board", "mcu-npu", "x86"]
Arch = Literal["x86_64", "aarch64", "armv7l", "cortex-m"]
RuntimeName = Literal["tflite-runtime", "ai-edge-litert", "tflite-micro", "android-litert"]
AcceleratorKind = Literal["npu", "gpu", "tpu", "dsp"]
Recipe = Literal["fp32", "fp16", "dynamic", "int8", "int16x8", "weight-int8", "weight-int4"]
CompilerKind = Literal["none", "vela", "edgetpu"]
SourceKey = Literal[
    "soc", "cpu", "memory", "runtime", "accelerators", "quantization", "compiler", "power",
    "budgets",
]  # fmt: skip

DEVICE_CLASSES: tuple[str, ...] = get_args(DeviceClass)
ARCHES: tuple[str, ...] = get_args(Arch)
RUNTIMES: tuple[str, ...] = get_args(RuntimeName)
ACCELERATOR_KINDS: tuple[str, ...] = get_args(AcceleratorKind)
QUANTIZATIONS: tuple[str, ...] = get_args(Recipe)
COMPILERS: tuple[str, ...] = get_args(CompilerKind)
SOURCE_KEYS: tuple[str, ...] = get_args(SourceKey)
# The accelerator configurations Vela accepts (ethosu.vela.architecture_features.Accelerator).
VELA_ACCELERATORS = (
    "ethos-u55-32", "ethos-u55-64", "ethos-u55-128", "ethos-u55-256",
    "ethos-u65-256", "ethos-u65-512",
    "ethos-u85-128", "ethos-u85-256", "ethos-u85-512", "ethos-u85-1024", "ethos-u85-2048",
)  # fmt: skip
# The delegate each compiler's output needs on the device.
COMPILER_DELEGATES = {"vela": "ethos-u", "edgetpu": "edgetpu"}
REQUIRED_SOURCES = ("cpu", "memory", "power", "runtime")

def _options(value: object) -> object:
    """Compiler options: snake_case names to strings or integers (not booleans, not floats)."""
    if not isinstance(value, Mapping):
        return value  # the type check names it
    for key, item in value.items():
        if not isinstance(key, str) or not OPTION_KEY_PATTERN.fullmatch(key):
            raise rule_error("", f"must be snake_case option names, got {describe(key)}")
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise rule_error(key, f"must be a string or an integer, got {describe(item)}")
    return value


@section("cpu")
@dataclass(frozen=True, config=CONFIG)
class Cpu:
    """CPU facts: used to match devices and to estimate per-core power."""

    arch: Annotated[Arch, Field(description="The userland's machine name (decides the runtime)")]
    cores: Annotated[Int, Field(ge=1, description="All CPU cores")]
    description: Annotated[Text, Field(description="The cores and clocks in words")]
    big_cores: Annotated[
        Int, Field(ge=0, description="Performance cores on big.LITTLE (0 = homogeneous)")
    ] = 0

    @model_validator(mode="after")
    def _big_within_cores(self) -> Cpu:
        """big_cores cannot exceed cores."""
        if self.big_cores > self.cores:
            raise rule_error(
                "big_cores", f"must be <= cpu.cores ({self.cores}), got {self.big_cores}"
            )
        return self


@section("memory")
@dataclass(frozen=True, config=CONFIG)
class Memory:
    """RAM and the shares of RAM and storage a model may take on this device."""

    ram_mb: Annotated[Int, Field(ge=1, description="RAM (on MCUs: the memory the arena is in)")]
    model_ram_budget_mb: Annotated[
        Number, Field(gt=0, description="RAM one model may use; <= ram_mb")
    ]
    storage_budget_mb: Annotated[Number, Field(gt=0, description="Storage one model may use")]

    @model_validator(mode="after")
    def _budget_within_ram(self) -> Memory:
        """A model budget larger than the RAM would be a typo."""
        if self.model_ram_budget_mb > self.ram_mb:
            raise rule_error(
                "model_ram_budget_mb",
                f"must be <= memory.ram_mb ({self.ram_mb}), got {self.model_ram_budget_mb}",
            )
        return self


@section("runtime")
@dataclass(frozen=True, config=CONFIG)
class Runtime:
    """The TFLite runtime on the device; its version bounds the op versions a model may use."""

    name: Annotated[RuntimeName, Field(description="The TFLite runtime (tflite-micro for MCUs)")]
    version: Annotated[
        str,
        Strict(),
        matching(VERSION_PATTERN, "a version like 2.14.0"),
        Field(
            description="The runtime's version on the device; bounds the op versions",
            json_schema_extra={"pattern": anchored(VERSION_PATTERN)},
        ),
    ]

    @property
    def version_tuple(self) -> tuple[int, ...]:
        """The leading numeric parts of the version, for comparisons: "2.5.0.post1" -> (2, 5, 0)."""
        parts: list[int] = []
        for piece in re.split(r"[.+-]", self.version):
            if not piece.isdigit():
                break
            parts.append(int(piece))
        return tuple(parts)


@section("accelerators")
@dataclass(frozen=True, config=CONFIG)
class Accelerator:
    """One accelerator and the delegate that reaches it."""

    name: Annotated[Text, Field(description="Unique among the profile's accelerators")]
    kind: Annotated[AcceleratorKind, Field(description="What sort of accelerator it is")]
    delegate: Annotated[
        str,
        Strict(),
        matching(DELEGATE_PATTERN, "a lowercase delegate name such as gpu, nnapi, edgetpu, vx"),
        Field(
            description="The TFLite delegate that reaches it (gpu, nnapi, edgetpu, vx, ethos-u, …)",
            json_schema_extra={"pattern": anchored(DELEGATE_PATTERN)},
        ),
    ]
    int8_only: Annotated[Bool, Field(description="Floats cannot run on it")] = False


def _no_duplicates(value: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse a recipe listed twice."""
    if len(set(value)) != len(value):
        raise rule_error("", f"has duplicates: {list(value)}")
    return value


@section("quantization")
@dataclass(frozen=True, config=CONFIG)
class Quantization:
    """The quantization recipes the optimizer may produce here, and the one it tries first."""

    preferred: Annotated[Recipe, Field(description="The recipe tried first; one of allowed")]
    allowed: Annotated[
        tuple[Recipe, ...],
        Field(min_length=1, description="The recipes the optimizer may produce for this class"),
        AfterValidator(_no_duplicates),
    ]

    @model_validator(mode="after")
    def _preferred_is_allowed(self) -> Quantization:
        """The preferred recipe must be one of the allowed ones."""
        if self.preferred not in self.allowed:
            raise rule_error(
                "preferred",
                f"must be one of quantization.allowed ({', '.join(self.allowed)}); "
                f"got {self.preferred!r}",
            )
        return self


@section("compiler")
@dataclass(frozen=True, config=CONFIG)
class Compiler:
    """The ahead-of-time compiler for this device (Vela, edgetpu_compiler) and its options."""

    kind: Annotated[CompilerKind, Field(description="The ahead-of-time compiler, or none")]
    options: Annotated[
        Mapping[str, str | int],
        BeforeValidator(_options),
        AfterValidator(frozen_table),
        Table,
        Field(
            description="Compiler options (snake_case -> string or integer); empty for none. "
            "vela: accelerator_config (required), config, system_config, memory_mode"
        ),
    ] = dataclasses.field(default_factory=dict, hash=False)

    @model_validator(mode="after")
    def _options_fit_kind(self) -> Compiler:
        """No options without a compiler; Vela needs a known accelerator_config."""
        if self.kind == "none" and self.options:
            raise rule_error(
                "options", f"must be empty when compiler.kind is 'none': {dict(self.options)}"
            )
        if self.kind == "vela":
            config = self.options.get("accelerator_config")
            if config is None:
                raise rule_error("options.accelerator_config", "is required for compiler 'vela'")
            if config not in VELA_ACCELERATORS:
                raise rule_error(
                    "options.accelerator_config",
                    f"must be one of {', '.join(VELA_ACCELERATORS)}; got {config!r}",
                )
            # Vela refuses a --config file unless the system config and memory mode are named.
            for needed in ("system_config", "memory_mode"):
                if "config" in self.options and needed not in self.options:
                    raise rule_error(
                        f"options.{needed}", "is required with compiler.options.config"
                    )
        return self


@section("power")
@dataclass(frozen=True, config=CONFIG)
class Power:
    """A linear power model for estimates on devices without a power sensor."""

    idle_w: Annotated[Number, Field(ge=0, description="Watts when idle")]
    active_w_per_core: Annotated[Number, Field(ge=0, description="Extra watts per busy core")]
    accelerator_active_w: Annotated[
        Number, Field(ge=0, description="Extra watts while the accelerator is busy")
    ] = 0.0

    def estimate_w(self, busy_cores: float, accelerator_busy: float = 0.0) -> float:
        """Watts with `busy_cores` cores busy and the accelerator busy for a 0..1 share of time."""
        return (
            self.idle_w
            + self.active_w_per_core * max(busy_cores, 0.0)
            + self.accelerator_active_w * min(max(accelerator_busy, 0.0), 1.0)
        )


@section("budgets")
@dataclass(frozen=True, config=CONFIG)
class Budgets:
    """Default self-test and rollout limits for this device class."""

    latency_ms: Annotated[Number, Field(gt=0, description="Self-test latency budget")]
    peak_rss_mb: Annotated[Number, Field(gt=0, description="Peak RSS budget; <= memory.ram_mb")]


@section("match")
@dataclass(frozen=True, config=CONFIG)
class Match:
    """How a device proves it is this board (firmware_profiles/identity.py scores it).

    Case-insensitive substrings of the device-tree model (`boards`) and of the SoC identifiers
    (`socs`: device-tree compatible entries, cpuinfo Hardware), and cpuinfo CPU part numbers.
    """

    boards: Annotated[
        tuple[Text, ...], Field(description="Substrings of the device-tree model")
    ] = ()
    socs: Annotated[
        tuple[Text, ...],
        Field(description="Substrings of the SoC ids (device-tree compatible, cpuinfo Hardware)"),
    ] = ()
    cpu_parts: Annotated[
        tuple[
            Annotated[
                str,
                Strict(),
                matching(CPU_PART_PATTERN, "lowercase hex like 0xd08"),
                WithJsonSchema({"type": "string", "pattern": anchored(CPU_PART_PATTERN)}),
            ],
            ...,
        ],
        Field(description="cpuinfo CPU part numbers, lowercase hex like 0xd08"),
    ] = ()


def _sources(value: Mapping[str, str]) -> Mapping[str, str]:
    """Require a source for the figures every profile has, then freeze the table."""
    for key in REQUIRED_SOURCES:
        if key not in value:
            raise rule_error(key, "is required: say where the figure comes from")
    return MappingProxyType(dict(value))


@section("")
@dataclass(frozen=True, config=CONFIG)
class Profile:
    """A device class: what the hardware is, what runs on it, and where each figure comes from."""

    id: Annotated[
        str,
        Strict(),
        matching(ID_PATTERN, "lowercase [a-z0-9][a-z0-9._-]{0,63}"),
        Field(
            description="Equals the file name stem",
            json_schema_extra={"pattern": anchored(ID_PATTERN)},
        ),
    ]
    name: Annotated[Text, Field(description="Display name")]
    device_class: Annotated[
        DeviceClass, Field(alias="class", description="The device class (attribute device_class)")
    ]
    soc: Annotated[Text, Field(description="The SoC")]
    runs_agent: Annotated[
        Bool, Field(description="False for microcontrollers: artifacts only, no Python agent")
    ]
    cpu: Cpu
    memory: Memory
    runtime: Runtime
    quantization: Quantization
    compiler: Compiler
    power: Power
    budgets: Budgets
    sources: Annotated[
        Mapping[SourceKey, Text],
        AfterValidator(_sources),
        Table,
        Field(
            description="Where each section's figures come from (cpu, memory, power, runtime "
            "required)"
        ),
    ] = dataclasses.field(hash=False)
    accelerators: Annotated[
        tuple[Accelerator, ...], Field(description="The accelerators ([[accelerators]])")
    ] = ()
    identity: Annotated[
        Match, Field(alias="match", description="How a device proves it is this board")
    ] = dataclasses.field(default_factory=Match)
    # Where the profile was loaded from: set by the loader, not a TOML key, not in equality.
    path: Annotated[SkipJsonSchema[str | None], Field(exclude=True)] = dataclasses.field(
        default=None, compare=False
    )

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        """Rules across sections: MCUs run no agent, compilers need their delegate and int8."""
        names = [a.name for a in self.accelerators]
        if len(set(names)) != len(names):
            raise rule_error("accelerators", f"names must be unique, got {names}")
        mcu = self.device_class == "mcu-npu"
        if mcu and self.runs_agent:
            raise rule_error(
                "runs_agent", "must be false for class 'mcu-npu' (no Python agent on an MCU)"
            )
        if (self.cpu.arch == "cortex-m") != mcu:
            raise rule_error("cpu.arch", "must be 'cortex-m' exactly when class is 'mcu-npu'")
        if (self.runtime.name == "tflite-micro") != mcu:
            raise rule_error(
                "runtime.name", "must be 'tflite-micro' exactly when class is 'mcu-npu'"
            )
        if self.budgets.peak_rss_mb > self.memory.ram_mb:
            raise rule_error(
                "budgets.peak_rss_mb", f"must be <= memory.ram_mb ({self.memory.ram_mb})"
            )
        needed = COMPILER_DELEGATES.get(self.compiler.kind)
        if needed is not None:
            kind = self.compiler.kind
            if needed not in self.delegates:
                raise rule_error(
                    "compiler.kind", f"{kind!r} needs an accelerator with delegate {needed!r}"
                )
            if "int8" not in self.quantization.allowed:
                raise rule_error(
                    "quantization.allowed", f"must include 'int8' for compiler {kind!r}"
                )
        return self

    @property
    def delegates(self) -> tuple[str, ...]:
        """The delegate names of this profile's accelerators, in file order."""
        return tuple(a.delegate for a in self.accelerators)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the TOML schema's keys (so `class`, not `device_class`)."""
        plain: dict[str, Any] = _adapter(Profile).dump_python(self, mode="json", by_alias=True)
        return plain


_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def _adapter(cls: type[Any]) -> TypeAdapter[Any]:
    """One TypeAdapter per section class (building one compiles its validator)."""
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = TypeAdapter(cls)
    return _ADAPTERS[cls]


def build(cls: type[T], table: object, prefix: str = "") -> T:
    """Build section `cls` (a Profile by default) from a parsed TOML table; one-line errors."""
    if cls is Profile and isinstance(table, Mapping) and "path" in table:
        raise ProfileError(f"unknown key '{prefix + '.' if prefix else ''}path'")
    try:
        built: T = _adapter(cls).validate_python(table)
    except ValidationError as exc:
        raise ProfileError(one_line(exc, prefix)) from None
    return built


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a profile file (TOML keys), generated from the fields' descriptions."""
    schema: dict[str, Any] = _adapter(Profile).json_schema(by_alias=True, mode="validation")
    schema["title"] = "edgefleet device profile (firmware_profiles/<id>.toml)"
    return schema

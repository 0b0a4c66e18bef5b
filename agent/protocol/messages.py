"""Message types of the wire protocol: frozen dataclasses that validate themselves."""

from __future__ import annotations

import json
import re
import reprlib
import time
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from agent.protocol.errors import ProtocolError
from agent.protocol.limits import (
    MAX_ARTIFACT_SIZE,
    MAX_BENCHMARK_RUNS,
    MAX_BENCHMARK_WARMUP,
    MAX_BUDGET_MB,
    MAX_BUDGET_MS,
    MAX_CHUNK_SIZE,
    MAX_JSON_BYTES,
    SCHEMA_VERSION,
)
from agent.protocol.names import validate_label, validate_name
from agent.protocol.schema import OMIT_DEFAULT, decode_dataclass, encode
from agent.protocol.states import AgentState
from agent.protocol.telemetry import Environment
from agent.protocol.topics import validate_device_id, validate_sha256

M = TypeVar("M")

# Board model strings are short ("Raspberry Pi 4 Model B Rev 1.4"); 128 leaves room for vendors'
# longer ones while a hostile device cannot bloat the registry.
MAX_IDENTITY_CHARS = 128
# Device-tree compatible lists have 2-4 entries; big.LITTLE SoCs have 2-3 CPU part numbers.
MAX_IDENTITY_ITEMS = 8
_CPU_PART = re.compile(r"0x[0-9a-f]{1,4}")


def _check_version(v: int) -> None:
    """Refuse a schema version this code does not speak."""
    if v != SCHEMA_VERSION:
        raise ProtocolError(
            f"$.v: unsupported schema version {v} (this side speaks {SCHEMA_VERSION})"
        )


def _name(field_name: str, kind: str, value: object, *, allow_empty: bool = False) -> None:
    """Refuse an unsafe name (names can reach paths, topics and shells), naming the field."""
    try:
        validate_name(kind, value, allow_empty=allow_empty)
    except ProtocolError as exc:
        raise ProtocolError(f"$.{field_name}: {exc}") from None


def _non_negative(name: str, value: float) -> None:
    """Refuse a negative count, size or duration."""
    if value < 0:
        raise ProtocolError(f"$.{name}: must be >= 0, got {value}")


def _bounded(name: str, value: float, low: float, high: float) -> None:
    """Refuse a number outside low..high (every number that sizes work or memory is bounded)."""
    if not low <= value <= high:
        raise ProtocolError(f"$.{name}: must be {low:g}..{high:g}, got {value}")


@dataclass(frozen=True)
class DeviceFacts:
    """Hardware and software facts an agent reports about its device."""

    arch: str
    system: str
    cpu_count: int
    ram_mb: int
    runtime: str
    runtime_version: str
    python: str
    delegates: tuple[str, ...] = ()
    # Board identity for profile matching (agent/facts.py, firmware_profiles/identity.py): the
    # device-tree model (or /proc/cpuinfo "Model"), the SoC identifiers (device-tree compatible
    # entries, cpuinfo "Hardware"), the distinct cpuinfo "CPU part" numbers, and whether the
    # cores and RAM are an emulator host's (qemu-user). Left out while unset, so a hello without
    # them is what controllers released before them parse.
    board: str | None = field(default=None, metadata={OMIT_DEFAULT: True})
    socs: tuple[str, ...] = field(default=(), metadata={OMIT_DEFAULT: True})
    cpu_parts: tuple[str, ...] = field(default=(), metadata={OMIT_DEFAULT: True})
    emulated: bool = field(default=False, metadata={OMIT_DEFAULT: True})

    def __post_init__(self) -> None:
        """Bound the free-text identity facts (they reach logs, the database and the UI) and
        the counts."""
        for name, value in (("board", self.board), *(("socs", s) for s in self.socs)):
            if value is not None and (len(value) > MAX_IDENTITY_CHARS or not value.isprintable()):
                raise ProtocolError(
                    f"$.facts.{name}: at most {MAX_IDENTITY_CHARS} printable characters"
                )
        if len(self.socs) > MAX_IDENTITY_ITEMS or len(self.cpu_parts) > MAX_IDENTITY_ITEMS:
            raise ProtocolError(f"$.facts: at most {MAX_IDENTITY_ITEMS} socs and cpu_parts")
        for part in self.cpu_parts:
            if not _CPU_PART.fullmatch(part):
                raise ProtocolError(f"$.facts.cpu_parts: {part!r} is not a hex part like 0xd08")
        # Counts are not negative (they are stored and shown, never used to size work).
        _non_negative("facts.cpu_count", self.cpu_count)
        _non_negative("facts.ram_mb", self.ram_mb)


@dataclass(frozen=True)
class Hello:
    """Registration sent by an agent on every connect."""

    device_id: str
    agent_version: str
    facts: DeviceFacts
    profile: str | None = None
    ts: float = field(default_factory=time.time)
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        """Validate the device id, names and schema version."""
        _check_version(self.v)
        validate_device_id(self.device_id)
        _name("agent_version", "agent version", self.agent_version)
        if self.profile is not None:
            _name("profile", "profile id", self.profile)


@dataclass(frozen=True)
class Status:
    """Retained device status; the broker publishes the offline variant as the last will."""

    device_id: str
    online: bool
    state: AgentState = AgentState.IDLE
    model_sha256: str | None = None
    previous_sha256: str | None = None
    generation: int = 0
    detail: str = ""
    ts: float = field(default_factory=time.time)
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        """Validate ids and version."""
        _check_version(self.v)
        validate_device_id(self.device_id)
        for sha in (self.model_sha256, self.previous_sha256):
            if sha is not None:
                validate_sha256(sha)
        _non_negative("generation", self.generation)


@dataclass(frozen=True)
class ArtifactRef:
    """Reference from desired state to an artifact's manifest."""

    sha256: str
    size: int
    name: str
    version: str

    def __post_init__(self) -> None:
        """Validate digest, size and names."""
        validate_sha256(self.sha256)
        if not 0 < self.size <= MAX_ARTIFACT_SIZE:
            raise ProtocolError(f"$.artifact.size: out of range (1..{MAX_ARTIFACT_SIZE})")
        _name("artifact.name", "model name", self.name)
        _name("artifact.version", "model version", self.version)


@dataclass(frozen=True)
class GoldenRef:
    """Golden inputs and expected outputs (.npz) shipped as their own content-addressed blob."""

    sha256: str
    size: int

    def __post_init__(self) -> None:
        """Validate digest and size."""
        validate_sha256(self.sha256)
        if not 0 < self.size <= MAX_ARTIFACT_SIZE:
            raise ProtocolError(f"$.golden.size: out of range (1..{MAX_ARTIFACT_SIZE})")


@dataclass(frozen=True)
class Signature:
    """An ed25519 signature over a message's canonical encoding, with the signing key's id."""

    key_id: str
    value: str

    def __post_init__(self) -> None:
        """Bound the key id and the base64 value (an ed25519 signature is 88 base64 characters)."""
        if not 1 <= len(self.key_id) <= 64 or not self.key_id.isascii():
            raise ProtocolError("$.sig.key_id: must be 1-64 ASCII characters")
        if not 1 <= len(self.value) <= 128 or not self.value.isascii():
            raise ProtocolError("$.sig.value: must be 1-128 ASCII characters")


# The most interpreter threads a desired state may ask for (a sanity bound, not a device limit).
MAX_THREADS = 64


def _threads(field_name: str, value: int | None) -> None:
    """None (the agent's own setting) or 1..MAX_THREADS interpreter threads."""
    if value is not None and not 1 <= value <= MAX_THREADS:
        raise ProtocolError(f"$.{field_name}: must be 1..{MAX_THREADS} or null, got {value}")


@dataclass(frozen=True)
class Fallback:
    """A lighter variant to switch to when the active model's p95 breaches a budget for a while.

    The agent downloads and self-tests it next to the active model, watches the latency of the
    requests it serves, and switches once, when every fifth of `window_s` had a p95 above
    `latency_ms` (docs/closed-loop.md). It reports the switch as a `fallback` event.
    """

    artifact: ArtifactRef
    latency_ms: float
    threads: int | None = None
    window_s: float = 60.0

    def __post_init__(self) -> None:
        """Validate the budget, the window and the thread count."""
        if not 0 < self.latency_ms <= MAX_BUDGET_MS:
            raise ProtocolError(
                f"$.fallback.latency_ms: must be > 0 and <= {MAX_BUDGET_MS:g}, "
                f"got {self.latency_ms}"
            )
        if not 1.0 <= self.window_s <= 86400.0:
            raise ProtocolError(f"$.fallback.window_s: must be 1..86400 s, got {self.window_s}")
        _threads("fallback.threads", self.threads)


@dataclass(frozen=True)
class Desired:
    """Retained desired state of one device: which artifact, under which deployment/generation."""

    generation: int
    deployment_id: str
    artifact: ArtifactRef | None
    benchmark_runs: int = 50
    benchmark_warmup: int = 5
    # The device profile's self-test budgets (0 = none); the agent applies the tighter of these
    # and its own configured budgets before it commits a model.
    latency_budget_ms: float = 0.0
    memory_budget_mb: float = 0.0
    ts: float = field(default_factory=time.time)
    # Signed desired state (docs/security.md): the device and profile it is for, when it stops
    # being valid (unix time), and the fleet key's signature over everything else.
    device_id: str | None = None
    profile: str | None = None
    expires: float | None = None
    # Runtime options of this artifact chosen by the rollout (None: the agent's own setting),
    # and the lighter variant to fall back to on a sustained latency breach.
    threads: int | None = field(default=None, metadata={OMIT_DEFAULT: True})
    fallback: Fallback | None = field(default=None, metadata={OMIT_DEFAULT: True})
    sig: Signature | None = None
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        """Validate counters, budgets and the deployment id."""
        _check_version(self.v)
        _name("deployment_id", "deployment id", self.deployment_id)
        if self.device_id is not None:
            validate_device_id(self.device_id)
        if self.profile is not None:
            _name("profile", "profile id", self.profile)
        if self.generation < 1:
            raise ProtocolError(f"$.generation: must be >= 1, got {self.generation}")
        _bounded("benchmark_runs", self.benchmark_runs, 1, MAX_BENCHMARK_RUNS)
        _bounded("benchmark_warmup", self.benchmark_warmup, 0, MAX_BENCHMARK_WARMUP)
        _bounded("latency_budget_ms", self.latency_budget_ms, 0, MAX_BUDGET_MS)
        _bounded("memory_budget_mb", self.memory_budget_mb, 0, MAX_BUDGET_MB)
        _threads("threads", self.threads)
        if self.fallback is not None and self.artifact is None:
            raise ProtocolError("$.fallback: needs an artifact to fall back from")


@dataclass(frozen=True)
class Manifest:
    """Retained description of an artifact: size, chunking and per-chunk digests."""

    sha256: str
    size: int
    chunk_size: int
    chunk_sha256: tuple[str, ...]
    name: str
    version: str
    recipe: str
    profile: str | None = None
    golden: GoldenRef | None = None
    created: float = field(default_factory=time.time)
    expires: float | None = None
    sig: Signature | None = None
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        """Check names, and that size, chunk size and the chunk list agree."""
        _check_version(self.v)
        validate_sha256(self.sha256)
        _name("name", "model name", self.name)
        # Empty while the controller builds a manifest before it knows the version (fleet.py).
        _name("version", "model version", self.version, allow_empty=True)
        _name("recipe", "recipe name", self.recipe)
        if self.profile is not None:
            _name("profile", "profile id", self.profile)
        if not 0 < self.size <= MAX_ARTIFACT_SIZE:
            raise ProtocolError(f"$.size: out of range (1..{MAX_ARTIFACT_SIZE})")
        if not 0 < self.chunk_size <= MAX_CHUNK_SIZE:
            raise ProtocolError(f"$.chunk_size: out of range (1..{MAX_CHUNK_SIZE})")
        expected = -(-self.size // self.chunk_size)
        if len(self.chunk_sha256) != expected:
            raise ProtocolError(
                f"$.chunk_sha256: {len(self.chunk_sha256)} digests for {expected} chunks"
            )
        for i, sha in enumerate(self.chunk_sha256):
            try:
                validate_sha256(sha)
            except ProtocolError as exc:
                raise ProtocolError(f"$.chunk_sha256[{i}]: {exc}") from None

    @property
    def chunk_count(self) -> int:
        """Number of chunks."""
        return len(self.chunk_sha256)

    def chunk_length(self, index: int) -> int:
        """Byte length of chunk `index` (the last one may be short)."""
        if not 0 <= index < self.chunk_count:
            raise ProtocolError(f"chunk index {index} out of range 0..{self.chunk_count - 1}")
        return min(self.chunk_size, self.size - index * self.chunk_size)


@dataclass(frozen=True)
class BenchmarkReport:
    """On-device measurement of a model, as TFLite's benchmark_model reports it."""

    model_sha256: str
    runtime: str
    runtime_version: str
    threads: int | None
    runs: int
    warmup: int
    init_ms: float
    first_inference_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    peak_rss_mb: float
    rss_mb: float
    power_w: float
    energy_mj_per_inference: float
    power_source: str
    power_estimated: bool
    environment: Environment | None = None

    def __post_init__(self) -> None:
        """Validate the digest and the power source label."""
        validate_sha256(self.model_sha256)
        try:
            validate_label("power source", self.power_source)
        except ProtocolError as exc:
            raise ProtocolError(f"$.power_source: {exc}") from None


EventKind = Literal["update", "benchmark", "error", "rejected", "command", "security", "fallback"]


@dataclass(frozen=True)
class Event:
    """Something that happened on a device, tied to a deployment and generation when it has one."""

    device_id: str
    event_id: str
    kind: EventKind
    message: str
    deployment_id: str | None = None
    generation: int | None = None
    state: AgentState | None = None
    # For errors: the update state the failure happened in (fetching = download, verifying,
    # self-testing = load/self-test), so the controller can tell transient from final failures.
    stage: AgentState | None = None
    model_sha256: str | None = None
    benchmark: BenchmarkReport | None = None
    ts: float = field(default_factory=time.time)
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        """Validate ids and version."""
        _check_version(self.v)
        validate_device_id(self.device_id)
        if not 1 <= len(self.event_id) <= 64:
            raise ProtocolError("$.event_id: must be 1-64 characters")
        _name("event_id", "event id", self.event_id)
        if self.deployment_id is not None:
            _name("deployment_id", "deployment id", self.deployment_id)
        if self.model_sha256 is not None:
            validate_sha256(self.model_sha256)


# A fleet never needs more verify keys at once than this (current + next + a few retiring).
MAX_FLEET_KEYS = 8


@dataclass(frozen=True)
class FleetKeys:
    """Retained list of the fleet's verify keys (base64 raw ed25519), signed by a trusted key.

    `version` only grows: an agent refuses a keys message not newer than the set it holds.
    """

    version: int
    keys: tuple[str, ...]
    ts: float = field(default_factory=time.time)
    sig: Signature | None = None
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        """Validate the version and bound the key list."""
        _check_version(self.v)
        if self.version < 1:
            raise ProtocolError(f"$.version: must be >= 1, got {self.version}")
        if not 1 <= len(self.keys) <= MAX_FLEET_KEYS:
            raise ProtocolError(f"$.keys: must hold 1-{MAX_FLEET_KEYS} keys")
        for i, key in enumerate(self.keys):
            if not 1 <= len(key) <= 64 or not key.isascii():
                raise ProtocolError(f"$.keys[{i}]: must be 1-64 ASCII characters (base64)")


@dataclass(frozen=True)
class Need:
    """Chunk indices of an artifact that one device still lacks."""

    device_id: str
    chunks: tuple[int, ...]
    ts: float = field(default_factory=time.time)
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        """Validate the id and the indices."""
        _check_version(self.v)
        validate_device_id(self.device_id)
        for i, n in enumerate(self.chunks):
            if n < 0:
                raise ProtocolError(f"$.chunks[{i}]: must be >= 0, got {n}")


def parse(payload: bytes | bytearray | str, cls: type[M]) -> M:
    """Parse one JSON message strictly: size cap first, then JSON, then every field."""
    if len(payload) > MAX_JSON_BYTES:
        raise ProtocolError(
            f"message of {len(payload)} bytes exceeds the {MAX_JSON_BYTES}-byte cap"
        )
    try:
        data = json.loads(payload)
    except RecursionError:  # "[[[[…" nested deeper than the interpreter's stack, within the cap
        raise ProtocolError("$: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of >4300 digits
        raise ProtocolError(f"$: not valid JSON ({exc})") from None
    if isinstance(data, dict):
        if "v" not in data:
            raise ProtocolError("$.v: missing field")
        if data["v"] != SCHEMA_VERSION:
            raise ProtocolError(
                f"$.v: unsupported schema version {reprlib.repr(data['v'])} "
                f"(this side speaks {SCHEMA_VERSION})"
            )
    return decode_dataclass(data, cls)


def dump(message: object) -> bytes:
    """Serialize a message to compact JSON bytes, refusing one over the size cap."""
    data = json.dumps(encode(message), separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_JSON_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_JSON_BYTES}-byte cap")
    return data

"""The wire contract between controller and agents: topics, strict message types, limits.

Standard library only (but transport.py): both sides read this one package (docs/architecture.md).
"""

from __future__ import annotations

from agent.protocol.command import Command
from agent.protocol.errors import ProtocolError
from agent.protocol.keychain import FleetKeyChain, parse_fleet_keys
from agent.protocol.limits import (
    DEFAULT_CHUNK_SIZE,
    LATENCY_BUCKETS_MS,
    MAX_CHUNK_SIZE,
    MAX_JSON_BYTES,
    MAX_TELEMETRY_BYTES,
    MAX_TELEMETRY_RECORDS,
    SCHEMA_VERSION,
)
from agent.protocol.messages import (
    MAX_THREADS,
    ArtifactRef,
    BenchmarkReport,
    Desired,
    DeviceFacts,
    Event,
    Fallback,
    FleetKeys,
    GoldenRef,
    Hello,
    Manifest,
    Need,
    Signature,
    Status,
    dump,
    parse,
)
from agent.protocol.names import MAX_NAME_LENGTH, escape_controls, validate_label, validate_name
from agent.protocol.states import IN_FLIGHT_STATES, TERMINAL_STATES, AgentState
from agent.protocol.telemetry import (
    BUCKET_COUNT,
    Environment,
    LatencyStats,
    OverflowPolicy,
    SeqRange,
    Telemetry,
    TelemetryRecord,
)
from agent.protocol.topics import (
    DEFAULT_ROOT,
    ParsedTopic,
    Topics,
    validate_device_id,
    validate_sha256,
)

__all__ = [
    "BUCKET_COUNT",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_ROOT",
    "IN_FLIGHT_STATES",
    "LATENCY_BUCKETS_MS",
    "MAX_CHUNK_SIZE",
    "MAX_JSON_BYTES",
    "MAX_NAME_LENGTH",
    "MAX_TELEMETRY_BYTES",
    "MAX_TELEMETRY_RECORDS",
    "MAX_THREADS",
    "SCHEMA_VERSION",
    "TERMINAL_STATES",
    "AgentState",
    "ArtifactRef",
    "BenchmarkReport",
    "Command",
    "Desired",
    "DeviceFacts",
    "Environment",
    "Event",
    "Fallback",
    "FleetKeyChain",
    "FleetKeys",
    "GoldenRef",
    "Hello",
    "LatencyStats",
    "Manifest",
    "Need",
    "OverflowPolicy",
    "ParsedTopic",
    "ProtocolError",
    "SeqRange",
    "Signature",
    "Status",
    "Telemetry",
    "TelemetryRecord",
    "Topics",
    "dump",
    "escape_controls",
    "parse",
    "parse_fleet_keys",
    "validate_device_id",
    "validate_label",
    "validate_name",
    "validate_sha256",
]

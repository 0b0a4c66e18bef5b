"""Valid samples of every wire message and hypothesis strategies that break them (arbitrary
bytes and JSON, structure-aware mutations, odd topic levels): the fuzzers of the agent's parsers
and of the controller's message path share them."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from agent.protocol import (
    BUCKET_COUNT,
    ArtifactRef,
    BenchmarkReport,
    Command,
    Desired,
    DeviceFacts,
    Environment,
    Event,
    GoldenRef,
    Hello,
    LatencyStats,
    Manifest,
    Need,
    SeqRange,
    Status,
    Telemetry,
    TelemetryRecord,
    Topics,
)
from agent.protocol.schema import encode

ROOT = "fuzz/edgefleet/v1"
TOPICS = Topics(ROOT)
SHA = "ab" * 32
OTHER_SHA = "cd" * 32

# Examples per test: 24 parser tests x 400 + the topic and routing tests pass 10,000 in ~30 s.
EXAMPLES = 400

FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,  # same inputs on every run and machine: a CI failure reproduces
    database=None,
    deadline=None,  # a 256 KiB input legitimately takes milliseconds
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _latency() -> LatencyStats:
    """Valid latency stats: 3 requests in the first bucket."""
    buckets = (3,) + (0,) * (BUCKET_COUNT - 1)
    return LatencyStats(3, 0.1, 0.1, 0.1, 0.1, 0.1, buckets)


def _benchmark() -> BenchmarkReport:
    """A valid benchmark report carrying an environment."""
    return BenchmarkReport(
        model_sha256=SHA,
        runtime="ai-edge-litert",
        runtime_version="1.2.0",
        threads=2,
        runs=10,
        warmup=1,
        init_ms=3.0,
        first_inference_ms=1.5,
        p50_ms=1.0,
        p90_ms=1.2,
        p95_ms=1.3,
        p99_ms=1.4,
        mean_ms=1.05,
        std_ms=0.1,
        min_ms=0.9,
        max_ms=1.5,
        peak_rss_mb=40.0,
        rss_mb=38.0,
        power_w=2.5,
        energy_mj_per_inference=2.6,
        power_source="hwmon:ina3221/VDD_IN",
        power_estimated=False,
        environment=Environment("performance", 1800.0, 1800.0, 51.5, 2, None),
    )


def valid_messages() -> dict[type, object]:
    """One valid instance of every message type, each using its nested types and options."""
    facts = DeviceFacts("aarch64", "Linux", 4, 3792, "tflite-runtime", "2.14.0", "3.11.2", ("gpu",))
    record = TelemetryRecord(
        seq=7,
        ts=1.7e9,
        interval_s=10.0,
        model_sha256=SHA,
        served=_latency(),
        invocations=3,
        throughput_ips=0.3,
        rss_mb=40.0,
        peak_rss_mb=41.0,
        cpu_percent=12.5,
        power_source="rapl:package-0",
        power_estimated=False,
        temperature_c=48.0,
        power_w=3.0,
        energy_mj_per_inference=0.3,
    )
    return {
        Hello: Hello("rpi-01", "0.1.0", facts, profile="rpi4", ts=1.7e9),
        Status: Status("rpi-01", True, "active", SHA, OTHER_SHA, 3, "ok", ts=1.7e9),
        Desired: Desired(
            3, "dep-1", ArtifactRef(SHA, 100_000, "mobilenet_v2-int8", "1.2.0"), 5, 1, 20.0, 64.0
        ),
        Manifest: Manifest(
            sha256=SHA,
            size=100_000,
            chunk_size=65_536,
            chunk_sha256=(SHA, OTHER_SHA),
            name="mobilenet_v2-int8",
            version="1.2.0",
            recipe="int8",
            profile="rpi4",
            golden=GoldenRef(OTHER_SHA, 2048),
            created=1.7e9,
            expires=1.8e9,
        ),
        Event: Event(
            "rpi-01",
            "g3-benchmark",
            "benchmark",
            "done",
            "dep-1",
            3,
            "active",
            None,
            SHA,
            _benchmark(),
        ),
        Command: Command("cmd-1", "resend_telemetry", 5, 1, (SeqRange(1, 4), SeqRange(9, 9))),
        Need: Need("rpi-01", (0, 3, 5)),
        Telemetry: Telemetry("rpi-01", (record,), (SeqRange(1, 6),), ts=1.7e9),
    }


VALID = valid_messages()
MESSAGE_TYPES = list(VALID)

# Strings an attacker puts where a name or id goes.
EVIL_STRINGS = [
    "",
    "../x",
    "..",
    ".",
    "a/b",
    "a\\b",
    "/etc/passwd",
    "C:\\boot.ini",
    "x\x00y",
    "line\nbreak",
    "\x1b[31mred",
    "del\x7f",
    "\u202eevil",  # right-to-left override
    "\u200bzero-width",
    "\ud800",  # a lone surrogate: valid JSON escape, invalid UTF-8
    "-rf",
    "+",
    "#",
    "$SYS",
    "mödel-名前",
    "x" * 200,
    "y" * 9000,
]
# Raw JSON tokens spliced into the text in place of a value (json.dumps cannot produce them).
RAW_TOKENS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "1E400",
    "-0",
    "9" * 400,
    "9" * 5000,  # more digits than int() converts: json.loads raises ValueError
    "[" * 3000 + "]" * 3000,  # deeper than the decoder's recursion limit
    "[" * 200 + "]" * 200,
    '{"a":' * 500 + "1" + "}" * 500,
]
_RAW = "\x00RAW{}\x00"

EVIL_NUMBERS = st.sampled_from(
    [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 10**20, 10**400, -(10**400)]
) | st.floats(allow_nan=True, allow_infinity=True)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | EVIL_NUMBERS
    | st.text(max_size=30)
    | st.sampled_from(EVIL_STRINGS)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
EVIL_VALUES = (
    JSON_VALUES
    | st.sampled_from(RAW_TOKENS).map(lambda token: _RAW.format(RAW_TOKENS.index(token)))
    | st.lists(st.integers(-5, 10**6), max_size=40)
    | st.lists(st.sampled_from([SHA, OTHER_SHA, "0" * 64]), max_size=40)
)


def to_json(value: Any, ascii_only: bool = True) -> str:
    """JSON text of a value, with raw tokens (NaN, 1e999, deep nesting…) spliced in."""
    text = json.dumps(value, allow_nan=True, ensure_ascii=ascii_only)
    for i, token in enumerate(RAW_TOKENS):
        text = text.replace(json.dumps(_RAW.format(i)), token)
    return text


def _containers(node: Any) -> list[Any]:
    """Every dict and list inside a JSON value, the value itself first."""
    found = [node] if isinstance(node, (dict, list)) else []
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        found.extend(_containers(child))
    return found


@st.composite
def mutated(draw: st.DrawFn, cls: type, sample: Any = None) -> str:
    """A valid message of `cls` (or `sample`) with one to four structure-aware mutations, as
    JSON text."""
    document = encode(VALID[cls] if sample is None else sample)
    for _ in range(draw(st.integers(1, 4))):
        node = draw(st.sampled_from(_containers(document)))
        operation = draw(st.sampled_from(["drop", "add", "rename", "replace", "wrap"]))
        if isinstance(node, dict):
            if not node or operation == "add":
                node[draw(st.text(max_size=12) | st.sampled_from(EVIL_STRINGS))] = draw(EVIL_VALUES)
                continue
            key = draw(st.sampled_from(sorted(node)))
            if operation == "drop":
                del node[key]
            elif operation == "rename":
                node[draw(st.text(max_size=12) | st.sampled_from(EVIL_STRINGS))] = node.pop(key)
            elif operation == "wrap":
                node[key] = [node[key]] if draw(st.booleans()) else {"value": node[key]}
            else:
                node[key] = draw(EVIL_VALUES)
        elif node:
            index = draw(st.integers(0, len(node) - 1))
            if operation == "drop":
                del node[index]
            elif operation == "add":
                node.insert(index, draw(EVIL_VALUES))
            else:
                node[index] = draw(EVIL_VALUES)
        else:
            node.append(draw(EVIL_VALUES))
    return to_json(document, ascii_only=draw(st.booleans()))


TOPIC_LEVELS = st.sampled_from(
    ["devices", "artifacts", "rpi-01", SHA, "chunks", "manifest", "need", "status", "cmd", "0",
     "007", "99999999", "²", "-1", "", "+", "#", "..", "a b", "\x00"]
) | st.text(max_size=10)  # fmt: skip

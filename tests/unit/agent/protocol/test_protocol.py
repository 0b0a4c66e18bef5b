"""Wire protocol: topic builders refuse bad ids, messages parse strictly and name the bad field."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import (
    MAX_JSON_BYTES,
    ArtifactRef,
    BenchmarkReport,
    Command,
    Desired,
    DeviceFacts,
    Event,
    Hello,
    Manifest,
    Need,
    ProtocolError,
    Status,
    Topics,
    dump,
    parse,
    validate_device_id,
)

pytestmark = pytest.mark.agent

SHA = "ab" * 32
FACTS = DeviceFacts("aarch64", "Linux", 4, 3792, "tflite-runtime", "2.14.0", "3.11.2", ("xnnpack",))


@pytest.mark.parametrize(
    "bad", ["", "a/b", "a+b", "a#b", "x" * 65, "dev ice", "é", ".", "..", None, 7]
)
def test_device_id_rejects_invalid(bad: object) -> None:
    with pytest.raises(ProtocolError, match="Invalid device id"):
        validate_device_id(bad)


@pytest.mark.parametrize("good", ["a", "rpi-4.lab_1", "X" * 64])
def test_device_id_accepts_valid(good: str) -> None:
    assert validate_device_id(good) == good


def test_topic_builders_and_parse_round_trip() -> None:
    topics = Topics("test/abc/edgefleet/v1")
    assert topics.status("d1") == "test/abc/edgefleet/v1/devices/d1/status"
    assert topics.chunk(SHA, 7) == f"test/abc/edgefleet/v1/artifacts/{SHA}/chunks/7"
    parsed = topics.parse(topics.chunk(SHA, 7))
    assert (parsed.kind, parsed.ident, parsed.channel, parsed.index) == (
        "artifact",
        SHA,
        "chunks",
        7,
    )
    assert topics.parse(topics.events("d1")).channel == "events"
    assert topics.all_devices("hello") == "test/abc/edgefleet/v1/devices/+/hello"


@pytest.mark.parametrize("root", ["", "a//b", "a/+/b", "#", "$SYS/x", "a/b/"])
def test_topic_root_rejects_wildcards_and_empty_levels(root: str) -> None:
    with pytest.raises(ProtocolError, match="Invalid topic root"):
        Topics(root)


@pytest.mark.parametrize(
    "topic",
    [
        "other/devices/d1/status",
        "edgefleet/v1/devices/d1/unknown",
        "edgefleet/v1/devices/d+1/status",
        "edgefleet/v1/artifacts/nothex/manifest",
        f"edgefleet/v1/artifacts/{SHA}/chunks/-1",
        f"edgefleet/v1/artifacts/{SHA}/chunks/99999999",
    ],
)
def test_parse_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(ProtocolError):
        Topics().parse(topic)


def test_chunk_index_must_be_non_negative_int() -> None:
    with pytest.raises(ProtocolError, match="chunk index"):
        Topics().chunk(SHA, -1)


def _messages() -> list[object]:
    """One valid instance of every message type."""
    manifest = Manifest(
        sha256=SHA,
        size=100_000,
        chunk_size=65536,
        chunk_sha256=(SHA, SHA),
        name="m",
        version="1",
        recipe="int8",
        profile="rpi4",
    )
    bench = BenchmarkReport(
        SHA,
        "ai-edge-litert",
        "2.3.0",
        1,
        50,
        5,
        3.0,
        1.0,
        0.5,
        0.6,
        0.7,
        0.9,
        0.55,
        0.1,
        0.4,
        1.2,
        60.0,
        55.0,
        3.1,
        1.7,
        "estimated",
        True,
    )
    return [
        Hello(device_id="d1", agent_version="0.1.0", facts=FACTS, profile="rpi4"),
        Status(device_id="d1", online=True, state="active", model_sha256=SHA, generation=3),
        Desired(
            generation=3,
            deployment_id="dep-1",
            artifact=ArtifactRef(sha256=SHA, size=100_000, name="m", version="1"),
        ),
        manifest,
        Event(device_id="d1", event_id="e1", kind="benchmark", message="ok", benchmark=bench),
        Command(command_id="c1", action="benchmark", runs=10),
        Need(device_id="d1", chunks=(0, 1)),
    ]


@pytest.mark.parametrize("message", _messages(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: object) -> None:
    assert parse(dump(message), type(message)) == message


@pytest.mark.parametrize("message", _messages(), ids=lambda m: type(m).__name__)
def test_unknown_field_is_rejected_with_its_path(message: object) -> None:
    data = json.loads(dump(message))
    data["surprise"] = 1
    with pytest.raises(ProtocolError, match=r"\$\.surprise: unknown field"):
        parse(json.dumps(data), type(message))


def test_missing_field_is_named() -> None:
    data = json.loads(dump(_messages()[0]))
    del data["facts"]["cpu_count"]
    with pytest.raises(ProtocolError, match=r"\$\.facts\.cpu_count: missing field"):
        parse(json.dumps(data), Hello)


def test_wrong_type_is_named() -> None:
    data = json.loads(dump(_messages()[1]))
    data["generation"] = "3"
    with pytest.raises(ProtocolError, match=r"\$\.generation: expected an integer"):
        parse(json.dumps(data), Status)


def test_bool_is_not_an_int() -> None:
    data = json.loads(dump(_messages()[1]))
    data["generation"] = True
    with pytest.raises(ProtocolError, match=r"\$\.generation"):
        parse(json.dumps(data), Status)


def test_literal_state_is_checked() -> None:
    data = json.loads(dump(_messages()[1]))
    data["state"] = "exploded"
    with pytest.raises(ProtocolError, match=r"\$\.state: must be one of"):
        parse(json.dumps(data), Status)


def test_schema_version_is_checked_first() -> None:
    with pytest.raises(ProtocolError, match="unsupported schema version 2"):
        parse(b'{"v": 2}', Hello)
    with pytest.raises(ProtocolError, match=r"\$\.v: missing field"):
        parse(b'{"device_id": "d1"}', Hello)


def test_size_cap_is_checked_before_parsing() -> None:
    payload = b"{" + b" " * MAX_JSON_BYTES + b"}"
    with pytest.raises(ProtocolError, match="exceeds"):
        parse(payload, Hello)


@pytest.mark.parametrize("payload", [b"", b"{", b"\xff\xfe", b"[]", b"null", b"42"])
def test_non_object_payloads_are_rejected(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse(payload, Status)


def test_nan_is_rejected_in_numbers() -> None:
    data = json.loads(dump(_messages()[4]))
    text = json.dumps(data).replace('"p50_ms": 0.5', '"p50_ms": NaN')
    with pytest.raises(ProtocolError, match="p50_ms: must be finite"):
        parse(text, Event)


def test_manifest_chunk_count_must_match_size() -> None:
    with pytest.raises(ProtocolError, match="2 digests for 1 chunks"):
        Manifest(
            sha256=SHA,
            size=10,
            chunk_size=65536,
            chunk_sha256=(SHA, SHA),
            name="m",
            version="1",
            recipe="fp32",
        )


def test_manifest_rejects_oversized_chunks() -> None:
    with pytest.raises(ProtocolError, match="chunk_size"):
        Manifest(
            sha256=SHA,
            size=10,
            chunk_size=1 << 20,
            chunk_sha256=(SHA,),
            name="m",
            version="1",
            recipe="fp32",
        )


def test_manifest_chunk_length_of_last_chunk() -> None:
    manifest = _messages()[3]
    assert isinstance(manifest, Manifest)
    assert manifest.chunk_length(0) == 65536
    assert manifest.chunk_length(1) == 100_000 - 65536
    with pytest.raises(ProtocolError):
        manifest.chunk_length(2)


def test_desired_generation_must_be_positive() -> None:
    with pytest.raises(ProtocolError, match="generation"):
        Desired(generation=0, deployment_id="d", artifact=None)


def test_need_rejects_negative_indices() -> None:
    with pytest.raises(ProtocolError, match=r"chunks\[1\]"):
        parse(b'{"v":1,"device_id":"d1","chunks":[0,-3]}', Need)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    value=_json_values,
    cls=st.sampled_from([Hello, Status, Desired, Manifest, Event, Command, Need]),
)
def test_fuzzed_json_never_crashes_the_parser(value: object, cls: type) -> None:
    payload = json.dumps(value).encode()
    with contextlib.suppress(ProtocolError):
        parse(payload, cls)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=512))
def test_fuzzed_bytes_never_crash_the_parser(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse(payload, Status)


@settings(max_examples=200, deadline=None)
@given(message=st.sampled_from(_messages()), key=st.text(min_size=1, max_size=12))
def test_fuzzed_extra_keys_are_rejected_or_ignored_never_accepted_silently(
    message: object, key: str
) -> None:
    data = json.loads(dump(message))
    if key in data:
        return
    data[key] = 0
    with pytest.raises(ProtocolError, match="unknown field"):
        parse(json.dumps(data), type(message))


def test_fields_added_later_are_left_out_at_their_default_for_older_agents() -> None:
    """An agent released before Desired.threads/fallback parses and verifies what it gets."""
    from agent.protocol import ArtifactRef, Desired, Fallback, dump
    from agent.protocol.signing import canonical_bytes

    ref = ArtifactRef(sha256="a" * 64, size=10, name="m", version="1")
    plain = Desired(generation=3, deployment_id="ro-1", artifact=ref, device_id="d1", ts=1.0)
    wire = json.loads(dump(plain))
    assert "threads" not in wire and "fallback" not in wire
    # The fields an agent of the previous release knows, in its canonical form.
    released = {
        "generation", "deployment_id", "artifact", "benchmark_runs", "benchmark_warmup",
        "latency_budget_ms", "memory_budget_mb", "ts", "device_id", "profile", "expires", "v",
    }  # fmt: skip
    assert set(json.loads(canonical_bytes(plain))) == released
    chosen = Desired(
        generation=3, deployment_id="ro-1", artifact=ref, threads=4,
        fallback=Fallback(artifact=ref, latency_ms=20.0),
    )  # fmt: skip
    wire = json.loads(dump(chosen))
    assert wire["threads"] == 4 and wire["fallback"]["latency_ms"] == 20.0
    assert parse(dump(chosen), Desired) == chosen

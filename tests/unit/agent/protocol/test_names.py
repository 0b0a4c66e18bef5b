"""Names from outside (models, versions, recipes, profiles, ids, labels) cannot smuggle a path,
a control character or an option into a file name, a topic, a log line or a shell."""

from __future__ import annotations

import dataclasses
import json

import pytest

import firmware_profiles
from agent.protocol import (
    ArtifactRef,
    Command,
    Desired,
    DeviceFacts,
    Event,
    Hello,
    Manifest,
    ProtocolError,
    TelemetryRecord,
    dump,
    parse,
)
from agent.protocol.names import MAX_NAME_LENGTH, validate_label, validate_name

pytestmark = pytest.mark.agent

SHA = "ab" * 32

# (bad name, words the error must contain besides the kind)
BAD_NAMES = [
    ("../x", "'..'"),
    ("..", "'..'"),
    (".", "'.'"),
    ("a/b", "path separator '/'"),
    ("a\\b", "path separator '\\\\'"),
    ("nul\x00byte", "U+0000"),
    ("new\nline", "U+000A"),
    ("esc\x1b[2J", "U+001B"),
    ("del\x7f", "U+007F"),
    ("evil\u202egnp.exe", "U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("zero\u200bwidth", "U+200B ZERO WIDTH SPACE"),
    ("tab\tbed", "U+0009"),
    ("two words", "U+0020 SPACE"),
    ("-rf", "starts with '-'"),
    ("x" * (MAX_NAME_LENGTH + 1), f"longer than {MAX_NAME_LENGTH}"),
    ("", "empty"),
]
GOOD_NAMES = ["mobilenet_v2-int8", "1.2.0", "rpi4", "x86-64-gateway", "v1.0.0+build.7", "modèle"]


@pytest.mark.parametrize(("value", "flaw"), BAD_NAMES, ids=repr)
@pytest.mark.parametrize("kind", ["model name", "profile id"])
def test_bad_names_are_rejected_naming_kind_and_flaw(kind: str, value: str, flaw: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        validate_name(kind, value)
    message = str(caught.value)
    assert message.startswith(f"Invalid {kind}: ")
    assert flaw in message
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("value", GOOD_NAMES)
def test_normal_names_are_accepted(value: str) -> None:
    assert validate_name("model version", value) == value


def test_non_string_is_rejected_and_empty_only_when_allowed() -> None:
    with pytest.raises(ProtocolError, match="Invalid model name: expected a string, got int"):
        validate_name("model name", 7)
    assert validate_name("model version", "", allow_empty=True) == ""


def test_labels_allow_slash_and_space_but_not_control_characters() -> None:
    assert validate_label("power source", "hwmon:ina3221/VDD IN") == "hwmon:ina3221/VDD IN"
    with pytest.raises(ProtocolError, match=r"Invalid power source: .* U\+000A"):
        validate_label("power source", "rapl\nfake")
    with pytest.raises(ProtocolError, match=r"Invalid power source: .* U\+202E"):
        validate_label("power source", "rapl\u202e")
    with pytest.raises(ProtocolError, match="longer than 1024"):
        validate_label("power source", "x" * 1025)


def _manifest(**changes: object) -> Manifest:
    """A valid one-chunk manifest with some fields replaced."""
    fields = dict(
        sha256=SHA, size=10, chunk_size=10, chunk_sha256=(SHA,), name="m", version="1",
        recipe="int8", profile="rpi4",
    )  # fmt: skip
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "kind"),
    [("name", "model name"), ("version", "model version"), ("recipe", "recipe name"),
     ("profile", "profile id")],
)  # fmt: skip
@pytest.mark.parametrize("value", ["../../etc/cron.d/x", "a\x00b", "m\u202e"])
def test_manifest_names_are_validated_on_the_wire(field: str, kind: str, value: str) -> None:
    payload = dump(_manifest()).replace(
        f'"{field}":"{getattr(_manifest(), field)}"'.encode(),
        f'"{field}":{json.dumps(value)}'.encode(),
    )
    assert payload != dump(_manifest())
    with pytest.raises(ProtocolError, match=rf"\$\.{field}: Invalid {kind}"):
        parse(payload, Manifest)
    with pytest.raises(ProtocolError, match=f"Invalid {kind}"):
        _manifest(**{field: value})


def test_manifest_version_may_be_empty_while_the_controller_builds_it() -> None:
    assert _manifest(version="").version == ""


def test_desired_artifact_names_and_deployment_id_are_validated() -> None:
    ref = ArtifactRef(SHA, 10, "mobilenet_v2-int8", "1.2.0")
    Desired(1, "dep-1", ref)
    with pytest.raises(ProtocolError, match=r"\$\.artifact\.name: Invalid model name"):
        ArtifactRef(SHA, 10, "../m", "1")
    with pytest.raises(ProtocolError, match=r"\$\.artifact\.version: Invalid model version"):
        ArtifactRef(SHA, 10, "m", "1/2")
    with pytest.raises(ProtocolError, match=r"\$\.deployment_id: Invalid deployment id"):
        Desired(1, "dep\n1", ref)


def test_command_event_and_hello_ids_are_validated() -> None:
    with pytest.raises(ProtocolError, match=r"\$\.command_id: Invalid command id"):
        Command("cmd/../1", "benchmark")
    with pytest.raises(ProtocolError, match=r"\$\.event_id: Invalid event id"):
        Event("d1", "e\x1b1", "update", "m")
    with pytest.raises(ProtocolError, match=r"\$\.deployment_id: Invalid deployment id"):
        Event("d1", "e1", "update", "m", deployment_id="..")
    facts = DeviceFacts("aarch64", "Linux", 4, 1024, "litert", "1.2.0", "3.11.2")
    with pytest.raises(ProtocolError, match=r"\$\.profile: Invalid profile id"):
        Hello("d1", "0.1.0", facts, profile="../rpi4")
    with pytest.raises(ProtocolError, match=r"\$\.agent_version: Invalid agent version"):
        Hello("d1", "0.1\x00", facts)


def test_telemetry_power_source_is_a_label() -> None:
    record = TelemetryRecord(
        seq=1, ts=1.0, interval_s=1.0, model_sha256=None, served=None, invocations=0,
        throughput_ips=0.0, rss_mb=1.0, peak_rss_mb=1.0, cpu_percent=0.0,
        power_source="hwmon:ina3221/VDD_IN", power_estimated=False,
    )  # fmt: skip
    with pytest.raises(ProtocolError, match=r"\$\.power_source: Invalid power source"):
        dataclasses.replace(record, power_source="rapl\r\nINFO forged log line")


@pytest.mark.parametrize("profile_id", ["../rpi4", "rpi4/../../x", "rpi4\x00", "rpi4\n"])
def test_profile_loader_refuses_path_like_ids_naming_the_flaw(profile_id: str) -> None:
    with pytest.raises(firmware_profiles.ProfileError, match="Invalid profile id") as caught:
        firmware_profiles.load(profile_id)
    assert "rpi4" in str(caught.value), "the known profiles are still listed"

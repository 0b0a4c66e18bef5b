"""Topic builders and parsers: a device id or topic that is wrong cannot even be constructed."""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.protocol.errors import ProtocolError

DEFAULT_ROOT = "edgefleet/v1"

_DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A root is one or more plain topic levels: no wildcards, no empty levels, no leading '$'.
_ROOT_LEVEL = re.compile(r"[A-Za-z0-9._-]{1,64}")

DEVICE_CHANNELS = ("hello", "status", "desired", "events", "telemetry", "cmd")
ARTIFACT_CHANNELS = ("manifest", "chunks", "need")


def validate_device_id(device_id: object) -> str:
    """Return the id if it matches [A-Za-z0-9._-]{1,64}, else raise naming the id."""
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        raise ProtocolError(
            f"Invalid device id: {device_id!r} (expected 1-64 characters of A-Z a-z 0-9 . _ -)"
        )
    if device_id in (".", ".."):
        raise ProtocolError(f"Invalid device id: {device_id!r} (path component)")
    if device_id.startswith("-"):
        raise ProtocolError(
            f"Invalid device id: {device_id!r} (starts with '-': a shell tool such as "
            "mosquitto_passwd would read it as an option)"
        )
    return device_id


def validate_sha256(sha256: object) -> str:
    """Return the digest if it is 64 lowercase hex characters, else raise naming it."""
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ProtocolError(f"Invalid sha256: {sha256!r} (expected 64 lowercase hex characters)")
    return sha256


def _validate_root(root: str) -> str:
    """Return a topic root made of plain levels, else raise naming the bad level."""
    levels = root.split("/")
    for level in levels:
        if not _ROOT_LEVEL.fullmatch(level):
            raise ProtocolError(f"Invalid topic root: {root!r} (bad level {level!r})")
    return root


@dataclass(frozen=True)
class ParsedTopic:
    """A topic taken apart: which entity, which channel, and the chunk index for chunks."""

    kind: str  # "device" | "artifact" | "fleet"
    ident: str  # device id, artifact sha256, or "keys"
    channel: str
    index: int | None = None


@dataclass(frozen=True)
class Topics:
    """All topics of one deployment under a root (tests use a unique root each)."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        """Reject a root with wildcards, empty levels or '$'."""
        _validate_root(self.root)

    def device(self, device_id: str, channel: str) -> str:
        """Topic of one device channel (hello, status, desired, events, telemetry, cmd)."""
        if channel not in DEVICE_CHANNELS:
            raise ProtocolError(f"Invalid device channel: {channel!r}")
        return f"{self.root}/devices/{validate_device_id(device_id)}/{channel}"

    def hello(self, device_id: str) -> str:
        """Registration topic of a device."""
        return self.device(device_id, "hello")

    def status(self, device_id: str) -> str:
        """Retained status topic of a device (carries the last will)."""
        return self.device(device_id, "status")

    def desired(self, device_id: str) -> str:
        """Retained desired-state topic of a device."""
        return self.device(device_id, "desired")

    def events(self, device_id: str) -> str:
        """Event topic of a device (update progress, benchmark results, errors)."""
        return self.device(device_id, "events")

    def telemetry(self, device_id: str) -> str:
        """Batched telemetry topic of a device."""
        return self.device(device_id, "telemetry")

    def cmd(self, device_id: str) -> str:
        """One-shot command topic of a device."""
        return self.device(device_id, "cmd")

    def manifest(self, sha256: str) -> str:
        """Retained manifest topic of an artifact."""
        return f"{self.root}/artifacts/{validate_sha256(sha256)}/manifest"

    def chunk(self, sha256: str, index: int) -> str:
        """Topic carrying chunk `index` of an artifact."""
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ProtocolError(f"Invalid chunk index: {index!r}")
        return f"{self.root}/artifacts/{validate_sha256(sha256)}/chunks/{index}"

    def chunks_filter(self, sha256: str) -> str:
        """Subscription filter for every chunk of one artifact."""
        return f"{self.root}/artifacts/{validate_sha256(sha256)}/chunks/+"

    def need(self, sha256: str) -> str:
        """Topic where agents ask for the chunks of an artifact they still lack."""
        return f"{self.root}/artifacts/{validate_sha256(sha256)}/need"

    def fleet_keys(self) -> str:
        """Retained topic of the fleet's signed verify-key list (key rotation)."""
        return f"{self.root}/fleet/keys"

    def all_devices(self, channel: str) -> str:
        """Controller subscription filter for one channel of every device."""
        if channel not in DEVICE_CHANNELS:
            raise ProtocolError(f"Invalid device channel: {channel!r}")
        return f"{self.root}/devices/+/{channel}"

    def all_needs(self) -> str:
        """Controller subscription filter for every artifact's repair requests."""
        return f"{self.root}/artifacts/+/need"

    def parse(self, topic: str) -> ParsedTopic:
        """Take a topic under this root apart; raise ProtocolError naming what does not fit."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            raise ProtocolError(f"Invalid topic: {topic!r} (not under {self.root!r})")
        parts = topic[len(prefix) :].split("/")
        if parts == ["fleet", "keys"]:
            return ParsedTopic("fleet", "keys", "keys")
        if len(parts) == 3 and parts[0] == "devices" and parts[2] in DEVICE_CHANNELS:
            return ParsedTopic("device", validate_device_id(parts[1]), parts[2])
        if len(parts) == 3 and parts[0] == "artifacts" and parts[2] in ("manifest", "need"):
            return ParsedTopic("artifact", validate_sha256(parts[1]), parts[2])
        if len(parts) == 4 and parts[0] == "artifacts" and parts[2] == "chunks":
            # isascii: str.isdigit() also accepts '²' and other digits int() refuses.
            if not (parts[3].isascii() and parts[3].isdigit()) or len(parts[3]) > 7:
                raise ProtocolError(f"Invalid topic: {topic!r} (bad chunk index {parts[3]!r})")
            return ParsedTopic("artifact", validate_sha256(parts[1]), "chunks", int(parts[3]))
        raise ProtocolError(f"Invalid topic: {topic!r}")

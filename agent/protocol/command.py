"""The one-shot command message: signed, addressed, expiring and counted (docs/security.md,
"Signed commands"). Kept apart from messages.py only to keep each module small."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from agent.protocol.errors import ProtocolError
from agent.protocol.limits import MAX_BENCHMARK_RUNS, MAX_BENCHMARK_WARMUP, SCHEMA_VERSION
from agent.protocol.messages import Signature, _bounded, _check_version, _name, _non_negative
from agent.protocol.schema import OMIT_DEFAULT
from agent.protocol.telemetry import SeqRange
from agent.protocol.topics import validate_device_id

__all__ = ["Command"]


@dataclass(frozen=True)
class Command:
    """One-shot command to a device; its id makes a repeated delivery have one effect.

    Signed like a desired state (docs/security.md, "Signed commands"): bound to one device,
    expiring, and carrying a per-fleet counter that only grows, so a captured command can be
    neither redirected, held back, nor replayed once a newer one was accepted.
    """

    command_id: str
    action: Literal["benchmark", "rollback", "resend_status", "resend_telemetry"]
    runs: int = 50
    warmup: int = 5
    # resend_telemetry: the sequence numbers the controller is missing (at most 200 ranges).
    seq_ranges: tuple[SeqRange, ...] = ()
    ts: float = field(default_factory=time.time)
    device_id: str | None = field(default=None, metadata={OMIT_DEFAULT: True})
    counter: int = field(default=0, metadata={OMIT_DEFAULT: True})
    expires: float | None = field(default=None, metadata={OMIT_DEFAULT: True})
    sig: Signature | None = field(default=None, metadata={OMIT_DEFAULT: True})
    v: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        """Validate id, device and counters (runs and warmup are bounded: they size work)."""
        _check_version(self.v)
        if not 1 <= len(self.command_id) <= 64:
            raise ProtocolError("$.command_id: must be 1-64 characters")
        _name("command_id", "command id", self.command_id)
        if self.device_id is not None:
            validate_device_id(self.device_id)
        _bounded("runs", self.runs, 1, MAX_BENCHMARK_RUNS)
        _bounded("warmup", self.warmup, 0, MAX_BENCHMARK_WARMUP)
        _non_negative("counter", self.counter)
        if len(self.seq_ranges) > 200:
            raise ProtocolError("$.seq_ranges: more than 200 ranges")
        if self.action == "resend_telemetry" and not self.seq_ranges:
            raise ProtocolError("$.seq_ranges: resend_telemetry needs at least one range")

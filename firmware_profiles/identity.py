"""Board identity in profile matching: what the device says it is, weighed against cores and RAM.

A device reports its device-tree model, SoC identifiers and CPU part numbers (agent/facts.py);
a profile lists what its boards report (`[match]`, schema.Match). Cores and RAM alone cannot
tell an 8 GB Raspberry Pi 4 from a Raspberry Pi 5 (same cores, same RAM); the board name can.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from firmware_profiles.schema import Match

__all__ = ["DeviceIdentity", "identity_score"]

# The board names itself: outweighs a 32× RAM spread (RAM variants, emulation hosts), so a
# named board is matched to its profile whatever the memory.
BOARD_BONUS: Final[float] = 5.0
# The same SoC: carriers and RAM differ, the silicon (and so the speed) does not.
SOC_BONUS: Final[float] = 3.0
# The same CPU core: weak, many boards share one (Cortex-A53: Pi 3, Coral, i.MX 8M Plus).
CPU_PART_BONUS: Final[float] = 1.0
# The profile names its boards and the device is another board on another SoC: another machine.
# As large as the match limit, so such a profile only wins where nothing else is close.
BOARD_CONFLICT_PENALTY: Final[float] = 5.0
# The device's cores are of another type than the profile's: its budgets were measured elsewhere.
CPU_PART_CONFLICT_PENALTY: Final[float] = 1.0


def _strings(value: object) -> tuple[str, ...]:
    """A list/tuple of strings from facts (anything else: empty)."""
    if not isinstance(value, list | tuple):
        return ()
    return tuple(v for v in value if isinstance(v, str) and v.strip())


@dataclass(frozen=True)
class DeviceIdentity:
    """The identity facts of one hello, normalised."""

    board: str | None = None
    socs: tuple[str, ...] = ()
    cpu_parts: tuple[str, ...] = ()
    emulated: bool = False

    @classmethod
    def from_facts(cls, facts: Mapping[str, object]) -> DeviceIdentity:
        """Read board, socs, cpu_parts and emulated from hello facts (missing: unknown)."""
        board = facts.get("board")
        return cls(
            board=board.strip() if isinstance(board, str) and board.strip() else None,
            socs=_strings(facts.get("socs")),
            cpu_parts=tuple(p.lower() for p in _strings(facts.get("cpu_parts"))),
            emulated=facts.get("emulated") is True,
        )

    @property
    def known(self) -> bool:
        """Whether the device reported anything that identifies its board."""
        return bool(self.board or self.socs or self.cpu_parts)

    def describe(self) -> str:
        """A short text for match reasons: board, SoC, cores, emulation."""
        parts = []
        if self.board:
            parts.append(f"board {self.board!r}")
        if self.socs:
            parts.append(f"SoC {', '.join(self.socs)}")
        if self.cpu_parts:
            parts.append(f"CPU part {', '.join(self.cpu_parts)}")
        if self.emulated:
            parts.append("emulated (qemu-user: cores and RAM are the host's)")
        return "; ".join(parts)

    def board_matches(self, rules: Match) -> str | None:
        """The profile's board pattern found in the device's board, if any."""
        if not self.board:
            return None
        board = self.board.lower()
        return next((b for b in rules.boards if b.lower() in board), None)

    def soc_matches(self, rules: Match) -> str | None:
        """The profile's SoC pattern found in one of the device's SoC identifiers, if any."""
        socs = [s.lower() for s in self.socs]
        return next((p for p in rules.socs if any(p.lower() in s for s in socs)), None)


def identity_score(rules: Match, device: DeviceIdentity) -> tuple[float, list[str]]:
    """(change to the distance, why) for a profile's [match] rules and the device's identity."""
    delta = 0.0
    why: list[str] = []
    board = device.board_matches(rules)
    soc = device.soc_matches(rules)
    if board:
        delta -= BOARD_BONUS
        why.append(f"board matches {board!r}")
    if soc:
        delta -= SOC_BONUS
        why.append(f"SoC matches {soc!r}")
    if device.board and rules.boards and not board and not soc:
        delta += BOARD_CONFLICT_PENALTY
        why.append("another board and SoC")
    if device.cpu_parts and rules.cpu_parts:
        if set(device.cpu_parts) & set(rules.cpu_parts):
            delta -= CPU_PART_BONUS
            why.append("same CPU core")
        else:
            delta += CPU_PART_CONFLICT_PENALTY
            why.append(f"other CPU core (expects {', '.join(rules.cpu_parts)})")
    return delta, why

"""Device profiles: load the TOML file per device class and match a device's hello to a profile."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from agent.protocol.names import validate_name
from firmware_profiles.identity import DeviceIdentity, identity_score
from firmware_profiles.schema import (
    ID_PATTERN,
    Accelerator,
    Budgets,
    Compiler,
    Cpu,
    Memory,
    Power,
    Profile,
    ProfileError,
    Quantization,
    Runtime,
    build,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "ENV_VAR",
    "PROFILE_DIR",
    "Accelerator",
    "Budgets",
    "Compiler",
    "Cpu",
    "Memory",
    "Power",
    "Profile",
    "ProfileError",
    "Quantization",
    "Runtime",
    "load",
    "load_all",
    "load_file",
    "match",
    "profile_dirs",
]

PROFILE_DIR: Final[Path] = Path(__file__).resolve().parent
ENV_VAR: Final[str] = "EDGEFLEET_PROFILES"

# Names platform.machine() gives on other OSes or in 32-bit userlands, mapped to the profile arch.
ARCH_ALIASES: Final[Mapping[str, str]] = {
    "arm64": "aarch64",
    "amd64": "x86_64",
    "x64": "x86_64",
    "armv8l": "armv7l",  # 32-bit userland on a 64-bit core (compat personality)
    "armhf": "armv7l",
}
# A device that cannot load a profile's accelerator delegate is probably another board: the
# penalty equals an 8× RAM mismatch, so it outweighs the RAM variants of one board.
MISSING_DELEGATE_PENALTY: Final[float] = 3.0
# Reporting a profile's delegate is strong evidence but should not beat a wrong core count.
MATCHED_DELEGATE_BONUS: Final[float] = 0.5
# Past this distance (≈ 8× RAM and 4× cores apart) the closest profile describes another kind
# of machine; saying "no match" is more useful than a wrong budget.
MAX_MATCH_DISTANCE: Final[float] = 5.0


def _dirs_from(entries: Sequence[Path | str], origin: str) -> list[Path]:
    """Check that each entry is an existing directory; a typo must not silently drop profiles."""
    dirs: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if not path.is_dir():
            raise ProfileError(f"profile directory {str(path)!r} from {origin} is not a directory")
        dirs.append(path)
    return dirs


def profile_dirs(extra_dirs: Sequence[Path | str] | None = None) -> list[Path]:
    """Directories searched, lowest priority first: built-ins, $EDGEFLEET_PROFILES, extra_dirs."""
    env_entries = [e for e in os.environ.get(ENV_VAR, "").split(os.pathsep) if e.strip()]
    return [
        PROFILE_DIR,
        *_dirs_from(env_entries, f"${ENV_VAR}"),
        *_dirs_from(list(extra_dirs or ()), "extra_dirs"),
    ]


def load_file(path: Path | str) -> Profile:
    """Parse and validate one profile file; every error names the file and the dotted key."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            table = tomllib.load(handle)
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: invalid TOML: {exc}") from None
    try:
        profile: Profile = build(Profile, table)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from None
    if profile.id != path.stem:
        raise ProfileError(
            f"{path}: 'id' must equal the file name stem {path.stem!r}, got {profile.id!r}"
        )
    object.__setattr__(profile, "path", str(path))
    return profile


def load_all(extra_dirs: Sequence[Path | str] | None = None) -> dict[str, Profile]:
    """Every profile by id; a file in a later directory replaces a built-in with the same id."""
    profiles: dict[str, Profile] = {}
    for directory in profile_dirs(extra_dirs):
        for path in sorted(directory.glob("*.toml")):
            profile = load_file(path)
            profiles[profile.id] = profile
    return dict(sorted(profiles.items()))


def _known_ids(dirs: Sequence[Path]) -> list[str]:
    """Ids of all profile files in `dirs`, without parsing them."""
    return sorted({p.stem for d in dirs for p in d.glob("*.toml") if ID_PATTERN.fullmatch(p.stem)})


def load(profile_id: str, extra_dirs: Sequence[Path | str] | None = None) -> Profile:
    """The profile with this id from the highest-priority directory that has it.

    The id becomes a file name: one with a path separator, `..` or a control character is
    refused naming the character before any path is built from it.
    """
    dirs = profile_dirs(extra_dirs)
    try:
        validate_name("profile id", profile_id)
    except ValueError as exc:
        why = f" ({exc})"
    else:
        why = ""
        if ID_PATTERN.fullmatch(profile_id):
            for directory in reversed(dirs):
                candidate = directory / f"{profile_id}.toml"
                if candidate.is_file():
                    return load_file(candidate)
    known = ", ".join(_known_ids(dirs)) or "none"
    raise ProfileError(f"unknown profile {profile_id!r}{why}; known profiles: {known}")


def _normalize_arch(value: object) -> str | None:
    """Lowercase the reported machine name and map aliases (arm64 -> aarch64)."""
    if not isinstance(value, str) or not value.strip():
        return None
    arch = value.strip().lower()
    return ARCH_ALIASES.get(arch, arch)


def _positive_int(value: object) -> int | None:
    """The value if it is a positive int (not a bool), else None (fact unknown)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def _log_distance(device: int | None, profile: float) -> float:
    """How far apart two sizes are on a log2 scale (2× apart = 1.0); 0 when the fact is unknown."""
    return 0.0 if device is None else abs(math.log2(device / profile))


def _distance(
    profile: Profile,
    cores: int | None,
    ram_mb: int | None,
    delegates: frozenset[str],
    identity: DeviceIdentity,
) -> tuple[float, str]:
    """Score of a profile for a device (lower is closer; 0 = same cores and RAM) and a short why."""
    distance = _log_distance(cores, profile.cpu.cores)
    distance += _log_distance(ram_mb, profile.memory.ram_mb)
    why = [f"{profile.cpu.cores} cores", f"{profile.memory.ram_mb} MB"]
    wanted = set(profile.delegates)
    if wanted:
        missing = sorted(wanted - delegates)
        distance += MISSING_DELEGATE_PENALTY * len(missing) / len(wanted)
        if wanted & delegates:
            distance -= MATCHED_DELEGATE_BONUS
            why.append(f"delegates {', '.join(sorted(wanted & delegates))} reported")
        if missing:
            why.append(f"delegates {', '.join(missing)} not reported")
    delta, identity_why = identity_score(profile.identity, identity)
    distance += delta
    why += identity_why
    return distance, f"{profile.id} ({'; '.join(why)}; score {distance:.2f})"


def _other_arch_boards(
    profiles: Mapping[str, Profile], arch: str, identity: DeviceIdentity, best: Profile
) -> str:
    """'; the board is also named by rpi4 (aarch64) ...' when another arch's profile names the
    board more specifically than the chosen one (a Pi 4 running a 32-bit userland)."""
    chosen = identity.board_matches(best.identity) or ""
    named = [
        p for p in profiles.values()
        if p.runs_agent and p.cpu.arch != arch
        and len(identity.board_matches(p.identity) or "") > len(chosen)
    ]  # fmt: skip
    if not named:
        return ""
    which = ", ".join(f"{p.id} ({p.cpu.arch})" for p in named)
    return f"; the board is also named by {which}, which needs that userland, not {arch}"


def match(
    facts: Mapping[str, object], profiles: Mapping[str, Profile] | None = None
) -> tuple[str | None, str]:
    """Pick the profile for a device's hello facts and say why (or why none fits).

    The userland arch must match (it decides the runtime). Among those profiles the closest by
    cores, RAM, delegates and board identity wins (firmware_profiles/identity.py), unless even
    it is further than MAX_MATCH_DISTANCE. An emulated device's cores and RAM are its host's and
    are ignored; without identity it matches only when its arch has a single profile.
    """
    if profiles is None:
        profiles = load_all()
    declared = facts.get("declared_profile")
    if declared is not None and declared != "":
        if isinstance(declared, str) and declared in profiles:
            return declared, "declared by device"
        known = ", ".join(sorted(profiles)) or "none"
        return None, f"device declared profile {declared!r}, which is unknown; known: {known}"

    arch = _normalize_arch(facts.get("arch"))
    if arch is None:
        return None, "device reported no arch, so no profile can be matched; declare one"
    identity = DeviceIdentity.from_facts(facts)
    cores = _positive_int(facts.get("cpu_count"))
    ram_mb = _positive_int(facts.get("ram_mb"))
    raw_delegates = facts.get("delegates")
    delegates = frozenset(
        d.strip().lower()
        for d in (raw_delegates if isinstance(raw_delegates, list | tuple) else ())
        if isinstance(d, str)
    )
    device = (
        f"{arch}, {cores if cores else 'unknown'} cores, {ram_mb if ram_mb else 'unknown'} MB RAM, "
        f"delegates {', '.join(sorted(delegates)) or 'none'}"
    )
    if identity.known or identity.emulated:
        device += f", {identity.describe()}"
    if identity.emulated:
        cores = ram_mb = None
    candidates = [p for p in profiles.values() if p.runs_agent and p.cpu.arch == arch]
    if not candidates:
        archs = sorted({p.cpu.arch for p in profiles.values() if p.runs_agent})
        return None, (
            f"no profile for a device running the agent on {arch} ({device}); "
            f"profiles exist for {', '.join(archs) or 'no arch'}"
        )
    ranked = sorted(
        ((*_distance(p, cores, ram_mb, delegates, identity), p.id) for p in candidates),
        key=lambda item: (item[0], item[2]),
    )
    best_distance, best_why, best_id = ranked[0]
    runner_up = f"; runner-up {ranked[1][1]}" if len(ranked) > 1 else ""
    elsewhere = _other_arch_boards(profiles, arch, identity, profiles[best_id])
    if identity.emulated and not identity.known and len(candidates) > 1:
        return None, (
            f"emulated device ({device}): its cores and RAM are the host's and it reports no "
            f"board, so {len(candidates)} {arch} profiles fit equally; declare a profile"
        )
    if best_distance > MAX_MATCH_DISTANCE:
        return None, (
            f"no close profile for {device}: nearest is {best_why}, "
            f"above the limit {MAX_MATCH_DISTANCE}{elsewhere}; declare a profile or add one"
        )
    basis = "arch alone (emulated)" if identity.emulated and not identity.known else (
        "cores, RAM, delegates and board identity"
    )
    return best_id, (
        f"matched by hardware ({device}): nearest {arch} profile by {basis} is "
        f"{best_why}{runner_up}{elsewhere}"
    )

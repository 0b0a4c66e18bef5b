"""Hardware and software facts the agent reports in its hello."""

from __future__ import annotations

import ctypes.util
import functools
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.protocol import DeviceFacts
from agent.runtime import runtime_info

# External TFLite delegates by the shared library that provides them (looked up, not loaded).
_DELEGATE_LIBRARIES = {
    "edgetpu": "edgetpu",
    "vx": "vx_delegate",
    "ethos-u": "ethosu_delegate",
    "gpu": "tensorflowlite_gpu_delegate",
    "hexagon": "hexagon_interface",
}


@functools.cache
def detect_delegates() -> tuple[str, ...]:
    """Delegates whose libraries are installed on this device (XNNPACK on CPU is always there).

    Looked up once per process: find_library spawns ldconfig, and hello is sent on every
    reconnect from paho's network thread. A delegate installed later shows after a restart.
    """
    found = ["xnnpack"]
    for name, library in _DELEGATE_LIBRARIES.items():
        if ctypes.util.find_library(library):
            found.append(name)
    return tuple(found)


def userland_arch(machine: str | None = None, pointer_bytes: int | None = None) -> str:
    """The architecture our binaries run as: a 32-bit userland on a 64-bit kernel is armv7l.

    platform.machine() reports the kernel (aarch64 on Raspberry Pi OS 32-bit with the default
    64-bit kernel); wheels, runtimes and profiles care about the userland.
    """
    machine = machine or platform.machine()
    pointer_bytes = pointer_bytes or struct.calcsize("P")
    if pointer_bytes == 4 and machine in ("aarch64", "arm64", "armv8l"):
        return "armv7l"
    if pointer_bytes == 4 and machine == "x86_64":
        return "i686"
    return machine


# Where Linux exposes the flattened device tree (ARM boards); the /proc path is a symlink to it.
DEVICE_TREE_DIRS = (Path("/proc/device-tree"), Path("/sys/firmware/devicetree/base"))
CPUINFO = Path("/proc/cpuinfo")
# Identity strings longer than this are cut (protocol limit: agent/protocol/messages.py).
_MAX_CHARS = 128
_MAX_ITEMS = 8


@dataclass(frozen=True)
class BoardIdentity:
    """What identifies the board: model, SoC identifiers, CPU part numbers, emulation."""

    board: str | None = None
    socs: tuple[str, ...] = ()
    cpu_parts: tuple[str, ...] = ()
    emulated: bool = False


def parse_cpuinfo(text: str) -> dict[str, object]:
    """The identity lines of /proc/cpuinfo: Model, Hardware, distinct CPU parts, x86-ness.

    Pi kernels add `Model` (the board) and, 32-bit ones, `Hardware : BCM2835` on every Pi;
    arm64 kernels list `CPU part` per core (0xd03 Cortex-A53, 0xd08 A72, 0xd0b A76, ...).
    """
    model = hardware = None
    parts: list[str] = []
    x86 = False
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "model" and value and not value.isdigit():  # x86 "model : 154" is a number
            model = value
        elif key == "hardware" and value:
            hardware = value
        elif key == "cpu part" and value:
            part = value.lower()
            if part not in parts:
                parts.append(part)
        elif key in ("vendor_id", "flags"):
            x86 = True
    return {"model": model, "hardware": hardware, "cpu_parts": tuple(parts), "x86": x86}


def board_identity(
    cpuinfo: str, dt_model: str | None, dt_compatible: str | None, arch: str
) -> BoardIdentity:
    """Identity from /proc/cpuinfo text and the device tree's model and compatible (NUL lists).

    An ARM userland reading an x86 cpuinfo runs under qemu-user: its cores and RAM are the
    host's, which the controller then ignores when it matches a profile.
    """
    info = parse_cpuinfo(cpuinfo)
    model = (dt_model or "").replace("\x00", "").strip() or info["model"]
    socs = [c.strip() for c in (dt_compatible or "").split("\x00") if c.strip()]
    if isinstance(info["hardware"], str):
        socs.append(info["hardware"])
    parts = info["cpu_parts"] if isinstance(info["cpu_parts"], tuple) else ()
    emulated = arch in ("aarch64", "armv7l") and bool(info["x86"]) and not parts
    return BoardIdentity(
        board=str(model)[:_MAX_CHARS] if model else None,
        socs=tuple(s[:_MAX_CHARS] for s in dict.fromkeys(socs))[:_MAX_ITEMS],
        cpu_parts=tuple(parts)[:_MAX_ITEMS],
        emulated=emulated,
    )


def _read_text(path: Path) -> str | None:
    """A small text file's content, or None when it cannot be read."""
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return None


@functools.cache
def local_identity() -> BoardIdentity:
    """This device's identity (read once per process: the board does not change)."""
    dt_model = dt_compatible = None
    for base in DEVICE_TREE_DIRS:
        dt_model = _read_text(base / "model")
        dt_compatible = _read_text(base / "compatible")
        if dt_model or dt_compatible:
            break
    return board_identity(_read_text(CPUINFO) or "", dt_model, dt_compatible, userland_arch())


def device_facts() -> DeviceFacts:
    """Collect arch, OS, cores, RAM, the TFLite runtime and delegates, and the board identity."""
    info = runtime_info()
    identity = local_identity()
    return DeviceFacts(
        arch=userland_arch(),
        system=platform.system(),
        cpu_count=psutil.cpu_count(logical=True) or 1,
        ram_mb=int(psutil.virtual_memory().total // (1024 * 1024)),
        runtime=info.name,
        runtime_version=info.version,
        python=platform.python_version(),
        delegates=detect_delegates(),
        board=identity.board,
        socs=identity.socs,
        cpu_parts=identity.cpu_parts,
        emulated=identity.emulated,
    )

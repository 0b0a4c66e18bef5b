"""Hardware and software facts the agent reports in its hello."""

from __future__ import annotations

import ctypes.util
import functools
import platform
import struct

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


def device_facts() -> DeviceFacts:
    """Collect arch, OS, cores, RAM, the TFLite runtime and delegates."""
    info = runtime_info()
    return DeviceFacts(
        arch=userland_arch(),
        system=platform.system(),
        cpu_count=psutil.cpu_count(logical=True) or 1,
        ram_mb=int(psutil.virtual_memory().total // (1024 * 1024)),
        runtime=info.name,
        runtime_version=info.version,
        python=platform.python_version(),
        delegates=detect_delegates(),
    )

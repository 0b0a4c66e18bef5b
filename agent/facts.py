"""Hardware and software facts the agent reports in its hello."""

from __future__ import annotations

import ctypes.util
import platform

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


def detect_delegates() -> tuple[str, ...]:
    """Delegates whose libraries are installed on this device (XNNPACK on CPU is always there)."""
    found = ["xnnpack"]
    for name, library in _DELEGATE_LIBRARIES.items():
        if ctypes.util.find_library(library):
            found.append(name)
    return tuple(found)


def device_facts() -> DeviceFacts:
    """Collect arch, OS, cores, RAM, the TFLite runtime and delegates."""
    info = runtime_info()
    return DeviceFacts(
        arch=platform.machine(),
        system=platform.system(),
        cpu_count=psutil.cpu_count(logical=True) or 1,
        ram_mb=int(psutil.virtual_memory().total // (1024 * 1024)),
        runtime=info.name,
        runtime_version=info.version,
        python=platform.python_version(),
        delegates=detect_delegates(),
    )

"""Process memory figures that mean what they say on Linux and elsewhere.

getrusage's ru_maxrss is preserved across execve on Linux, so a process started by a big parent
(a controller that loaded TensorFlow) would report the parent's peak. VmHWM in /proc/self/status
belongs to the current address space and starts afresh at exec; it is used when present.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    """A `Vm*` figure in KiB from /proc/self/status, or None where there is no procfs."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process image in MiB."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024.0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # macOS reports bytes, Linux and the BSDs KiB.
    return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0


def rss_mb() -> float:
    """Current resident set size in MiB."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024.0
    import psutil

    rss: int = psutil.Process().memory_info().rss
    return rss / (1024.0 * 1024.0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, looked up once (find_library runs ldconfig in a subprocess), or None elsewhere."""
    name = ctypes.util.find_library("c") if sys.platform == "linux" else None
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim).

    Downloads leave the heap fragmented with freed chunk buffers; on a device with little RAM an
    idle agent should not keep them. A no-op where glibc is not the allocator.
    """
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)

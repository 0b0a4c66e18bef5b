"""Memory figures: the peak belongs to this process image, not to the parent that spawned it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.memory import peak_rss_mb, rss_mb

pytestmark = pytest.mark.agent


def test_rss_and_peak_are_plausible() -> None:
    assert 1.0 < rss_mb() <= peak_rss_mb() + 0.5


def test_peak_grows_with_allocation() -> None:
    """In a fresh process: this one's peak may already lie far above its current RSS (an
    earlier test's allocation), and then 64 MiB more would not move it."""
    code = (
        "from agent.memory import peak_rss_mb\n"
        "before = peak_rss_mb()\n"
        "block = bytearray(64 * 1024 * 1024)\n"
        "block[::4096] = b'x' * len(block[::4096])  # touch every page so it is resident\n"
        "print(before, peak_rss_mb())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split())
    assert after >= before + 48, (before, after)


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM is Linux-specific")
def test_child_peak_is_not_inherited_from_a_big_parent() -> None:
    """ru_maxrss survives execve on Linux; our figure must not."""
    ballast = bytearray(300 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = "from agent.memory import peak_rss_mb; print(peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 200, "the child's peak must not include the parent's 300 MiB"
    del ballast


def test_release_memory_runs_and_looks_libc_up_once() -> None:
    from agent.memory import _libc, release_memory

    _libc.cache_clear()
    release_memory()
    release_memory()
    assert _libc.cache_info().misses == 1

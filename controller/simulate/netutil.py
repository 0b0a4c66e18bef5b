"""Socket helpers of the simulation's epoll loop."""

from __future__ import annotations

import fcntl
import struct
import termios


def unread_bytes(fd: int) -> int:
    """Bytes waiting in a socket's receive buffer (FIONREAD); 0 if it cannot be asked.

    Non-zero means the simulation's one thread has not read them yet: it is behind (starved of
    CPU), so timeouts and silences measured in wall time do not mean the broker is silent.
    """
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return 0

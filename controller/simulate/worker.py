"""One shard of a sharded simulation: a child process running a Simulation over its share of
the fleet (one epoll loop), driven by its parent over its stdin/stdout (shard.py).

The channel carries pickled messages, parent to child: the Simulation's keyword arguments
first, then (op, args, request id) tuples; child to parent: dicts with a `kind`. The child
stops cleanly (offline statuses, DISCONNECTs) on the `stop` op, on SIGTERM, and on EOF of its
stdin: a parent that dies, even by SIGKILL, closes that pipe, so no shard outlives it.
"""

from __future__ import annotations

import logging
import os
import pickle
import resource
import signal
import sys
import threading
from dataclasses import asdict
from typing import IO, Any

import psutil

from controller.simulate.faults import Faults
from controller.simulate.loop import Simulation

log = logging.getLogger("controller.simulate")

# How often a shard sends its counters unasked (the parent's wait_connected and counters).
PUSH_INTERVAL_S = 0.25


class _Stop(Exception):
    """SIGTERM: leave the command loop and stop the simulation cleanly."""


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM handler: interrupt the blocking read of the next command."""
    raise _Stop


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit (one socket per agent)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Channel:
    """The pickled message stream to the parent; writes from two threads are serialized."""

    def __init__(self, out: IO[bytes]) -> None:
        """Write to `out`."""
        self.out = out
        self.lock = threading.Lock()
        self.broken = False

    def send(self, message: dict[str, Any]) -> None:
        """One message; a parent that is gone turns later sends into no-ops."""
        if self.broken:
            return
        with self.lock:
            try:
                pickle.dump(message, self.out, protocol=pickle.HIGHEST_PROTOCOL)
                self.out.flush()
            except (OSError, ValueError):
                self.broken = True


def shard_snapshot(sim: Simulation) -> dict[str, Any]:
    """The Simulation's snapshot plus what the parent merges: pid, CPU, raw latency buckets."""
    times = psutil.Process().cpu_times()
    return {
        **sim.snapshot(),
        "pid": os.getpid(),
        "cpu_s": round(times.user + times.system, 2),
        "update_latency_raw": sim.update_latency.to_json(),
    }


def _handle(sim: Simulation, op: str, args: tuple[Any, ...]) -> Any:
    """Run one request of the parent on this shard's Simulation."""
    if op == "snapshot":
        return shard_snapshot(sim)
    if op == "device":
        return sim.device(args[0])
    if op == "devices_with":
        return sim.devices_with(args[0])
    if op == "set_faults":
        ids, faults = args
        assert isinstance(faults, Faults)
        sim.set_faults(ids, faults)
        return None
    if op == "drop_connections":
        sim.drop_connections(args[0], args[1])
        return None
    raise ValueError(f"unknown shard request {op!r}")


def _push(sim: Simulation, channel: Channel, done: threading.Event) -> None:
    """Send the counters every PUSH_INTERVAL_S until done."""
    while not done.wait(PUSH_INTERVAL_S) and not channel.broken:
        channel.send({"kind": "counters", "counters": asdict(sim.counters)})


def main() -> int:
    """Build the shard from the first message, run it, serve the parent's requests."""
    # Ctrl-C in a terminal reaches the whole process group: the parent decides and stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminate)
    inp = sys.stdin.buffer
    channel = Channel(os.fdopen(os.dup(sys.stdout.fileno()), "wb"))
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print must not corrupt it
    logging.basicConfig(level=logging.WARNING, format=f"shard {os.getpid()}: %(message)s")
    raise_fd_limit()
    try:
        options = pickle.load(inp)
        sim = Simulation(**options)
    except (_Stop, EOFError):
        return 0
    except Exception as exc:  # a bad option: the parent reports it
        channel.send({"kind": "error", "error": f"{type(exc).__name__}: {exc}"})
        return 2
    done = threading.Event()
    try:
        sim.start()
        channel.send({"kind": "ready", "pid": os.getpid(), "devices": len(sim.agents)})
        threading.Thread(target=_push, args=(sim, channel, done), daemon=True).start()
        while True:
            try:
                op, args, ident = pickle.load(inp)
            except (EOFError, pickle.UnpicklingError, OSError):
                break  # the parent is gone: stop cleanly, never linger as an orphan
            if op == "stop":
                break
            try:
                channel.send({"kind": "reply", "id": ident, "result": _handle(sim, op, args)})
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                channel.send({"kind": "reply", "id": ident, "error": error})
    except _Stop:
        pass
    finally:
        done.set()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the goodbye below runs to its end
        final = shard_snapshot(sim)  # before stop(): the counts of the run, not of the goodbye
        sim.stop()
        channel.send({"kind": "final", "snapshot": final})
    return 0


if __name__ == "__main__":
    sys.exit(main())

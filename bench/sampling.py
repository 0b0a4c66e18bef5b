"""Resource sampling shared by the scale benches: RSS and CPU of processes, sampled in a thread.

Every scale bench samples the broker (and the controller, when it runs as its own process) all
through the run, so the figure that breaks first (usually the broker's memory) is on record even
when the run times out. Sizes are MiB (2**20 bytes) everywhere, labelled as such.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

MIB = 2**20
# Sampling period: fine enough to catch a broker growing by GBs within seconds, coarse enough
# that psutil's /proc reads cost nothing measurable next to the processes being measured.
SAMPLE_INTERVAL_S = 0.5


@dataclass
class Series:
    """RSS and CPU samples of one process: peak, last, CPU seconds used since the first sample."""

    name: str
    pid: int
    peak_rss_mib: float = 0.0
    last_rss_mib: float = 0.0
    cpu_s: float = 0.0
    cpu_first: float | None = None
    peak_fds: int = 0  # open file descriptors (a broker holds one per connection)
    samples: list[tuple[float, float, float]] = field(default_factory=list)  # (t, rss, cpu)
    gone: bool = False

    def take(self, t: float) -> None:
        """One sample; a process that exited is marked gone (its last figures stay)."""
        try:
            proc = psutil.Process(self.pid)
            rss = proc.memory_info().rss / MIB
            times = proc.cpu_times()
            self.peak_fds = max(self.peak_fds, proc.num_fds())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self.gone = True
            return
        cpu = times.user + times.system
        if self.cpu_first is None:
            self.cpu_first = cpu
        self.cpu_s = cpu - self.cpu_first
        self.last_rss_mib = rss
        self.peak_rss_mib = max(self.peak_rss_mib, rss)
        self.samples.append((t, rss, cpu))

    def cpu_between(self, t0: float, t1: float) -> float:
        """CPU seconds used between two bench times (nearest samples); 0 without samples."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return 0.0
        return inside[-1][2] - inside[0][2]

    def peak_between(self, t0: float, t1: float) -> float:
        """Peak RSS (MiB) sampled between two bench times."""
        inside = [s[1] for s in self.samples if t0 <= s[0] <= t1]
        return max(inside, default=0.0)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "last_rss_mib": round(self.last_rss_mib, 1),
            "cpu_s": round(self.cpu_s, 1),
            "peak_fds": self.peak_fds,
            "exited": self.gone,
        }


class Sampler:
    """Samples named processes every SAMPLE_INTERVAL_S in a daemon thread until stop()."""

    def __init__(self, **pids: int | None) -> None:
        """`name=pid` pairs; a None pid (e.g. an in-process broker) is skipped."""
        self.t0 = time.monotonic()
        self.series = {name: Series(name, pid) for name, pid in pids.items() if pid is not None}
        self.loadavg: list[tuple[float, float]] = []  # (bench time, 1-minute load average)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def watch(self, name: str, pid: int) -> None:
        """Sample one more process (before start(): the thread reads the series unlocked)."""
        assert not self._thread.is_alive(), "watch() before start()"
        self.series[name] = Series(name, pid)

    def start(self) -> Sampler:
        """Start sampling (returns self for chaining)."""
        self._thread.start()
        return self

    def now(self) -> float:
        """Seconds since the sampler was made: the time axis of every sample."""
        return time.monotonic() - self.t0

    def _run(self) -> None:
        """Sample until stopped."""
        while not self._stop.is_set():
            t = self.now()
            for series in self.series.values():
                series.take(t)
            self.loadavg.append((t, os.getloadavg()[0]))
            self._stop.wait(SAMPLE_INTERVAL_S)

    def load_between(self, t0: float, t1: float) -> tuple[float, float] | None:
        """(min, max) of the 1-minute load average sampled between two bench times."""
        inside = [load for t, load in self.loadavg if t0 <= t <= t1]
        return (round(min(inside), 1), round(max(inside), 1)) if inside else None

    def stop(self) -> None:
        """Take a last sample and stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        t = self.now()
        for series in self.series.values():
            series.take(t)

    def summary(self) -> dict[str, Any]:
        """Figures of every process, by name."""
        return {name: s.summary() for name, s in self.series.items()}


class BrokerSys:
    """mosquitto's own accounting, from its $SYS topics (start it with `sys_interval 1`): heap
    bytes it allocated (current and maximum) and bytes in its message store, sampled over time.

    Next to the process RSS this tells memory mosquitto holds from memory its allocator kept
    after freeing it (RSS is a high-water mark; the heap figures are not).
    """

    TOPICS = ("$SYS/broker/heap/current", "$SYS/broker/heap/maximum",
              "$SYS/broker/store/messages/bytes", "$SYS/broker/store/messages/count",
              "$SYS/broker/retained messages/count", "$SYS/broker/bytes/sent")  # fmt: skip

    def __init__(self, host: str, port: int, clock: Any) -> None:
        """Subscribe on a paho client of its own; `clock()` stamps each value (Sampler.now)."""
        self.clock = clock
        self.values: dict[str, list[tuple[float, int]]] = {t: [] for t in self.TOPICS}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sys-{os.getpid()}")
        self.client.on_message = self._message
        self.client.connect(host, port, keepalive=60)
        for topic in self.TOPICS:
            self.client.subscribe(topic, 0)
        self.client.loop_start()

    def _message(self, _client: Any, _userdata: Any, message: Any) -> None:
        """Record one value."""
        try:
            value = int(message.payload.decode().split()[0])
        except (ValueError, IndexError):
            return
        self.values.setdefault(message.topic, []).append((self.clock(), value))

    def peak_between(self, topic: str, t0: float, t1: float) -> int | None:
        """Largest value of one topic reported between two bench times (+1 s: the interval)."""
        inside = [v for t, v in self.values.get(topic, []) if t0 <= t <= t1 + 1.0]
        return max(inside) if inside else None

    def delta_between(self, topic: str, t0: float, t1: float) -> int | None:
        """How much a counter topic grew between two bench times (+1 s: the interval)."""
        inside = [v for t, v in self.values.get(topic, []) if t0 - 1.0 <= t <= t1 + 1.0]
        return inside[-1] - inside[0] if len(inside) >= 2 else None

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def phase_memory(
    sampler: Sampler, broker_sys: BrokerSys, phases: list[tuple[int, str, float, float]]
) -> list[dict[str, Any]]:
    """Print and return, per (round, phase, t0, t1), the broker's RSS (at start, peak) and its
    own heap and message-store peaks from $SYS: what it holds, against what its allocator kept."""
    series = sampler.series["broker"]
    print("round phase  broker RSS at start MiB  peak MiB  heap peak MiB  store peak MiB"
          "  sent MiB")  # fmt: skip
    out = []
    for round_no, name, t0, t1 in phases:
        start = next((rss for t, rss, _ in series.samples if t >= t0), float("nan"))
        heap = broker_sys.peak_between("$SYS/broker/heap/current", t0, t1)
        store = broker_sys.peak_between("$SYS/broker/store/messages/bytes", t0, t1)
        sent = broker_sys.delta_between("$SYS/broker/bytes/sent", t0, t1)
        row = {
            "round": round_no, "phase": name, "rss_start_mib": round(start, 1),
            "rss_peak_mib": round(series.peak_between(t0, t1), 1),
            "heap_peak_mib": None if heap is None else round(heap / MIB, 1),
            "store_peak_mib": None if store is None else round(store / MIB, 1),
            "sent_mib": None if sent is None else round(sent / MIB, 1),
        }  # fmt: skip
        out.append(row)
        print(f"{round_no:5d} {name:>5}  {row['rss_start_mib']:23}  {row['rss_peak_mib']:8}  "
              f"{row['heap_peak_mib']!s:>13}  {row['store_peak_mib']!s:>14}"
              f"  {row['sent_mib']!s:>8}")  # fmt: skip
    return out

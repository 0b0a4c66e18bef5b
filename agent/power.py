"""Power sources for benchmarks: RAPL, battery, hwmon rail monitors, else a labelled estimate.

Each source is a small plugin with `start()` / `stop(token)` around a measurement window and
returns the energy used in that window. Counter sources (RAPL) read twice; sampled sources
(battery, hwmon) poll in a background thread and integrate. `detect_power_source` picks the
first that works on this machine, in the order of `MEASURED_SOURCES`.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import psutil


@dataclass(frozen=True)
class PowerModel:
    """Watts a device class draws idle and per busy core/accelerator (from its profile)."""

    idle_w: float
    active_w_per_core: float
    accelerator_active_w: float = 0.0


# Generic guess for a device without a profile: a small quad-core ARM board idles near 2 W and
# each busy Cortex-A core adds roughly 1 W. Always labelled as an estimate.
DEFAULT_POWER_MODEL = PowerModel(idle_w=2.0, active_w_per_core=1.0)

# Sampled sensors: 50 Hz sees a 100 ms window at least 5 times; each sample is a few small sysfs
# reads (tens of µs), far below 1% of one core even on a Cortex-A53.
SAMPLE_INTERVAL_S = 0.02

# Sampled sensors over a telemetry interval (10 s by default, the whole time the agent runs):
# 4 Hz still sees a 1 s load burst 4 times, and costs the device 40 readings per interval
# instead of 500 at the benchmark rate.
TELEMETRY_SAMPLE_INTERVAL_S = 0.25


@dataclass(frozen=True)
class EnergyReading:
    """Energy used over one measurement window and where the number came from."""

    joules: float
    seconds: float
    source: str
    estimated: bool

    @property
    def watts(self) -> float:
        """Average power over the window (0.0 for an empty window)."""
        return self.joules / self.seconds if self.seconds > 0 else 0.0


@runtime_checkable
class PowerSource(Protocol):
    """Anything that can measure (or estimate) energy between start() and stop()."""

    name: str
    estimated: bool

    def start(self) -> object:
        """Begin a window; return an opaque token for stop()."""

    def stop(self, token: object) -> EnergyReading:
        """End the window begun by start() and return its energy."""


def _read_text(path: Path) -> str:
    """A sysfs attribute as stripped text."""
    return path.read_text(encoding="ascii", errors="replace").strip()


def _read_int(path: Path) -> int:
    """A sysfs attribute as an integer."""
    return int(_read_text(path))


# --- RAPL ----------------------------------------------------------------------------------------

# Top-level zones only: intel-rapl:0, intel-rapl:1 ... Subzones (intel-rapl:0:0 core, :0:1 uncore or
# dram) are parts of their package and intel-rapl-mmio:N mirrors a package, so both would double
# count.
_RAPL_ZONE = re.compile(r"intel-rapl:\d+")


@dataclass(frozen=True)
class _RaplDomain:
    """One RAPL package zone: its directory, name and counter range."""

    path: Path
    name: str
    max_range_uj: int

    def energy_uj(self) -> int:
        """Current value of the zone's energy counter in µJ."""
        return _read_int(self.path / "energy_uj")


class _CounterToken(NamedTuple):
    """What start() saw: when, and the counters (µJ for RAPL, ns of CPU for the estimate)."""

    started_ns: int
    values: tuple[int, ...]


class RaplSource:
    """Intel/AMD RAPL package energy counters under /sys/class/powercap (CPU package only)."""

    name = "rapl"
    estimated = False

    def __init__(self, domains: Sequence[_RaplDomain]) -> None:
        """Use these package domains; see discover()."""
        if not domains:
            raise ValueError("RaplSource needs at least one package domain")
        self.domains = tuple(domains)
        self.label = "rapl:" + "+".join(d.name for d in self.domains)

    @classmethod
    def discover(cls, sysfs_root: str | Path = "/sys") -> RaplSource | None:
        """Readable package domains (name package-N; psys and dram excluded), or None."""
        base = Path(sysfs_root) / "class" / "powercap"
        domains = []
        try:
            zones = sorted(p for p in base.iterdir() if _RAPL_ZONE.fullmatch(p.name))
            for zone in zones:
                name = _read_text(zone / "name")
                if not name.startswith("package"):
                    continue  # psys covers the whole platform incl. the package: double count
                domain = _RaplDomain(zone, name, _read_int(zone / "max_energy_range_uj"))
                domain.energy_uj()  # root-only since Linux 5.10 (CVE-2020-8694): prove we can read
                domains.append(domain)
        except (OSError, ValueError):
            return None
        return cls(domains) if domains else None

    def start(self) -> object:
        """Read every package counter."""
        return _CounterToken(time.perf_counter_ns(), tuple(d.energy_uj() for d in self.domains))

    def stop(self, token: object) -> EnergyReading:
        """Sum each package's counter delta, allowing for one wraparound per package."""
        if not isinstance(token, _CounterToken):
            raise TypeError("stop() needs the token returned by start()")
        after = [d.energy_uj() for d in self.domains]
        seconds = (time.perf_counter_ns() - token.started_ns) / 1e9
        total_uj = 0
        for domain, b, a in zip(self.domains, token.values, after, strict=True):
            # The counter wraps to 0 after max_energy_range_uj (~262 kJ: minutes at 100s of W).
            total_uj += a - b if a >= b else domain.max_range_uj - b + a
        return EnergyReading(total_uj / 1e6, seconds, self.label, estimated=False)


# --- sampled sources (battery, hwmon) ------------------------------------------------------------


class _Sampler(threading.Thread):
    """Background thread that records (time, watts) until finish(); integrates by trapezoids."""

    def __init__(self, read_watts: Callable[[], float], interval_s: float) -> None:
        """Prepare to sample read_watts every interval_s."""
        super().__init__(name="edgefleet-power-sampler", daemon=True)
        self._read_watts = read_watts
        self._interval_s = interval_s
        self._done = threading.Event()
        self.samples: list[tuple[int, float]] = []
        self.started_ns = time.perf_counter_ns()

    def sample(self) -> None:
        """Record one reading; a transient sysfs error just skips it."""
        try:
            watts = self._read_watts()
        except (OSError, ValueError):
            return
        self.samples.append((time.perf_counter_ns(), watts))

    def run(self) -> None:
        """Sample until finish() is called."""
        while not self._done.wait(self._interval_s):
            self.sample()

    def finish(self) -> tuple[float, float]:
        """Stop sampling, take the closing sample and return (joules, seconds)."""
        self._done.set()
        self.join()
        self.sample()
        ended_ns = time.perf_counter_ns()
        if not self.samples:
            raise RuntimeError("power sensor gave no readable sample during the window")
        if len(self.samples) == 1:  # every other read failed: hold the one value for the window
            seconds = (ended_ns - self.started_ns) / 1e9
            return self.samples[0][1] * seconds, seconds
        joules = 0.0
        for (t0, w0), (t1, w1) in zip(self.samples, self.samples[1:], strict=False):
            joules += (w0 + w1) / 2 * (t1 - t0) / 1e9
        return joules, (self.samples[-1][0] - self.samples[0][0]) / 1e9


class _SampledSource:
    """Shared start/stop for sources that poll an instantaneous power reading."""

    name = "sampled"
    estimated = False
    label = "sampled"

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        """Remember the sampling interval."""
        self.interval_s = interval_s

    def read_watts(self) -> float:
        """Instantaneous power in watts (implemented by each source)."""
        raise NotImplementedError

    def start(self) -> object:
        """Take the opening sample and start the sampler thread."""
        sampler = _Sampler(self.read_watts, self.interval_s)
        sampler.sample()
        sampler.start()
        return sampler

    def stop(self, token: object) -> EnergyReading:
        """Stop the sampler and integrate its samples."""
        if not isinstance(token, _Sampler):
            raise TypeError("stop() needs the token returned by start()")
        joules, seconds = token.finish()
        return EnergyReading(joules, seconds, self.label, estimated=False)


def _battery_watts(battery: Path) -> float:
    """One battery's draw: power_now µW, else voltage_now µV × current_now µA."""
    power = battery / "power_now"
    if power.exists():
        return abs(_read_int(power)) / 1e6
    # Some fuel gauges report discharge current as negative; the magnitude is what we want.
    return abs(_read_int(battery / "voltage_now") * _read_int(battery / "current_now")) / 1e12


class PowerSupplySource(_SampledSource):
    """Discharging batteries under /sys/class/power_supply: the whole device's draw."""

    name = "power_supply"

    def __init__(self, batteries: Sequence[Path], interval_s: float = SAMPLE_INTERVAL_S) -> None:
        """Sample these battery directories (see discover())."""
        super().__init__(interval_s)
        if not batteries:
            raise ValueError("PowerSupplySource needs at least one battery")
        self.batteries = tuple(batteries)
        self.label = "power_supply:" + "+".join(b.name for b in self.batteries)

    @classmethod
    def discover(
        cls, sysfs_root: str | Path = "/sys", interval_s: float = SAMPLE_INTERVAL_S
    ) -> PowerSupplySource | None:
        """Batteries of type Battery that are Discharging and readable, or None.

        On mains power (Charging, Full, Not charging) the battery sees only part of the flow.
        """
        base = Path(sysfs_root) / "class" / "power_supply"
        batteries = []
        try:
            for supply in sorted(base.iterdir()):
                try:
                    if _read_text(supply / "type") != "Battery":
                        continue
                    if _read_text(supply / "status") != "Discharging":
                        continue
                    _battery_watts(supply)
                except (OSError, ValueError):
                    continue
                batteries.append(supply)
        except OSError:
            return None
        return cls(batteries, interval_s) if batteries else None

    def read_watts(self) -> float:
        """Total draw of all discharging batteries."""
        return sum(_battery_watts(b) for b in self.batteries)


# Drivers whose power channel is one component (a GPU, a CPU package estimate), not the board: using
# them as "device power" would understate it.
_COMPONENT_ONLY_HWMON = frozenset({"amdgpu", "radeon", "nouveau", "i915", "xe", "fam15h_power"})
# Rail labels that mean "total input to the board/module" (Jetson INA3221: VDD_IN on Orin/Xavier NX,
# POM_5V_IN on Nano). When present, the other rails are subrails of it and are not added.
_TOTAL_RAIL = re.compile(r"(^|_)IN$|^VIN", re.IGNORECASE)


@dataclass(frozen=True)
class HwmonChannel:
    """One hwmon power channel: power{N}_input (µW) or curr{N}_input (mA) × in{N}_input (mV)."""

    label: str
    power: Path | None = None
    current: Path | None = None
    voltage: Path | None = None

    def watts(self) -> float:
        """Instantaneous power of this channel in watts."""
        if self.power is not None:
            return _read_int(self.power) / 1e6
        assert self.current is not None and self.voltage is not None
        return _read_int(self.current) * _read_int(self.voltage) / 1e6


def _hwmon_channels(hwmon: Path) -> list[HwmonChannel]:
    """Power channels of one hwmon device (attributes in hwmonN/ or, on old kernels, device/)."""
    chip = _read_text(hwmon / "name")
    if chip in _COMPONENT_ONLY_HWMON:
        return []
    channels = []
    for folder in (hwmon, hwmon / "device"):
        for power in sorted(folder.glob("power*_input")):
            n = power.name[len("power") : -len("_input")]
            label = _channel_label(folder, ("power", "curr", "in"), n)
            channels.append(HwmonChannel(f"{chip}/{label}", power=power))
        for current in sorted(folder.glob("curr*_input")):
            n = current.name[len("curr") : -len("_input")]
            voltage = folder / f"in{n}_input"
            if (folder / f"power{n}_input").exists() or not voltage.exists():
                continue
            label = _channel_label(folder, ("in", "curr"), n)
            channels.append(HwmonChannel(f"{chip}/{label}", current=current, voltage=voltage))
        if channels:
            break
    return channels


def _channel_label(folder: Path, prefixes: Sequence[str], n: str) -> str:
    """The first {prefix}{n}_label found, else 'channel{n}'."""
    for prefix in prefixes:
        label = folder / f"{prefix}{n}_label"
        if label.exists():
            return _read_text(label)
    return f"channel{n}"


class HwmonSource(_SampledSource):
    """Board power monitors under /sys/class/hwmon (INA2xx, INA3221 on Jetson), sampled."""

    name = "hwmon"

    def __init__(
        self, channels: Sequence[HwmonChannel], interval_s: float = SAMPLE_INTERVAL_S
    ) -> None:
        """Sample and sum these channels (see discover())."""
        super().__init__(interval_s)
        if not channels:
            raise ValueError("HwmonSource needs at least one channel")
        self.channels = tuple(channels)
        self.label = "hwmon:" + "+".join(c.label for c in self.channels)

    @classmethod
    def discover(
        cls, sysfs_root: str | Path = "/sys", interval_s: float = SAMPLE_INTERVAL_S
    ) -> HwmonSource | None:
        """Readable power channels; only the total-input rails when a board labels one."""
        base = Path(sysfs_root) / "class" / "hwmon"
        channels: list[HwmonChannel] = []
        try:
            hwmons = sorted(base.iterdir(), key=lambda p: (len(p.name), p.name))
        except OSError:
            return None
        for hwmon in hwmons:
            try:
                found = _hwmon_channels(hwmon)
                for channel in found:
                    channel.watts()
            except (OSError, ValueError):
                continue
            channels.extend(found)
        totals = [c for c in channels if _TOTAL_RAIL.search(c.label.rpartition("/")[2])]
        chosen = totals or channels
        return cls(chosen, interval_s) if chosen else None

    def read_watts(self) -> float:
        """Sum of the chosen channels."""
        return sum(c.watts() for c in self.channels)


# --- estimate ------------------------------------------------------------------------------------


def _usable_cores() -> int:
    """CPUs this process may run on (affinity mask when the OS has one)."""
    try:
        return len(psutil.Process().cpu_affinity() or []) or (psutil.cpu_count() or 1)
    except (AttributeError, psutil.Error, OSError):  # macOS has no cpu_affinity
        return psutil.cpu_count() or 1


class EstimatedSource:
    """Power from a device profile's PowerModel and this process's CPU use; labelled estimated."""

    name = "estimated"
    estimated = True

    def __init__(
        self,
        power_model: PowerModel | None = None,
        threads: int = 1,
        accelerator_in_use: bool = False,
    ) -> None:
        """Estimate with power_model for a workload of `threads` threads."""
        self.power_model = power_model or DEFAULT_POWER_MODEL
        self.active_cores = max(1, min(threads, _usable_cores()))
        self.accelerator_in_use = accelerator_in_use

    def start(self) -> object:
        """Remember wall clock and process CPU time."""
        # process_time (CLOCK_PROCESS_CPUTIME_ID: all threads, ns) rather than psutil's
        # cpu_times, which counts in 10 ms ticks and reads 0 for short windows.
        return _CounterToken(time.perf_counter_ns(), (time.process_time_ns(),))

    def stop(self, token: object) -> EnergyReading:
        """idle + per-core watts × active cores × measured busy fraction, over the window."""
        if not isinstance(token, _CounterToken):
            raise TypeError("stop() needs the token returned by start()")
        cpu_s = (time.process_time_ns() - token.values[0]) / 1e9
        seconds = (time.perf_counter_ns() - token.started_ns) / 1e9
        busy = min(1.0, cpu_s / (seconds * self.active_cores)) if seconds > 0 else 0.0
        model = self.power_model
        watts = model.idle_w + model.active_w_per_core * self.active_cores * busy
        if self.accelerator_in_use:
            watts += model.accelerator_active_w
        return EnergyReading(watts * seconds, seconds, "estimated", estimated=True)


# Tried in this order; the first one whose discover() succeeds is used.
MEASURED_SOURCES: tuple[type[RaplSource] | type[PowerSupplySource] | type[HwmonSource], ...] = (
    RaplSource,
    PowerSupplySource,
    HwmonSource,
)


def detect_power_source(
    sysfs_root: str | Path = "/sys",
    power_model: PowerModel | None = None,
    threads: int = 1,
    *,
    sample_interval_s: float = SAMPLE_INTERVAL_S,
) -> PowerSource:
    """First readable of RAPL, discharging battery, hwmon; else an EstimatedSource.

    `sample_interval_s` is how often sampled sensors (battery, hwmon) are polled; telemetry
    passes TELEMETRY_SAMPLE_INTERVAL_S for its long windows. RAPL counters need no polling.
    """
    for source_class in MEASURED_SOURCES:
        source: PowerSource | None
        if issubclass(source_class, _SampledSource):
            source = source_class.discover(sysfs_root, interval_s=sample_interval_s)
        else:
            source = source_class.discover(sysfs_root)
        if source is not None:
            return source
    return EstimatedSource(power_model, threads)

"""Conditions a measurement ran under, read from sysfs: CPU governor, frequency, temperature.

A slow benchmark or a latency spike is often explained by the device, not the model: a
`powersave` governor, a clock throttled by heat. Every reader takes `sysfs_root` so tests pass a
fake tree laid out like the kernel's; every missing or unreadable file gives None, never an
exception (a VM has no sensors at all).
"""

from __future__ import annotations

from pathlib import Path

from agent.protocol import Environment

# Readings outside this range (°C) are sensor errors, not temperatures: disabled ACPI zones
# report -273.2 °C and some drivers report 0 or 255 °C placeholders above it.
_PLAUSIBLE_C = (-40.0, 150.0)

# Thermal zone types that measure the CPU or the SoC it sits in, best first. x86_pkg_temp is
# the Intel package sensor (acpitz zones are motherboard sensors); cpu-thermal / cpu_thermal are
# the Raspberry Pi and most ARM SoCs; CPU-therm the Jetson Nano/TX2; soc the rest of ARM.
_ZONE_PREFERENCE: tuple[tuple[str, ...], ...] = (
    ("x86_pkg_temp",),
    ("cpu",),  # substring: cpu-thermal, cpu_thermal, CPU-therm, cpu0-thermal ...
    ("soc",),  # substring: soc_thermal, soc0-thermal ...
)

# hwmon chips that measure the CPU, and the channel label that means the whole package.
_HWMON_CPU_CHIPS = {
    "coretemp": ("Package id",),
    "k10temp": ("Tdie", "Tctl"),
    "zenpower": ("Tdie", "Tctl"),
    "cpu_thermal": (),
}


def _read_text(path: Path) -> str | None:
    """A sysfs attribute as stripped text, or None when it is missing or unreadable."""
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def _read_number(path: Path) -> float | None:
    """A numeric sysfs attribute, or None when missing, unreadable or not a number."""
    text = _read_text(path)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _millidegrees(path: Path) -> float | None:
    """A temperature attribute in m°C as °C, or None when absent or implausible."""
    value = _read_number(path)
    if value is None:
        return None
    celsius = value / 1000.0
    low, high = _PLAUSIBLE_C
    return celsius if low <= celsius <= high else None


def _thermal_zone_temperature(sysfs_root: Path) -> float | None:
    """The CPU/SoC zone's temperature (the hottest of the best-ranked kind), else the hottest."""
    base = sysfs_root / "class" / "thermal"
    try:
        zones = sorted(base.glob("thermal_zone*"))
    except OSError:
        return None
    readings: list[tuple[str, float]] = []
    for zone in zones:
        kind = _read_text(zone / "type")
        celsius = _millidegrees(zone / "temp")
        if kind is not None and celsius is not None:
            readings.append((kind.lower(), celsius))
    if not readings:
        return None
    for needles in _ZONE_PREFERENCE:
        preferred = [c for kind, c in readings if any(n in kind for n in needles)]
        if preferred:
            return max(preferred)
    return max(c for _, c in readings)


def _hwmon_temperature(sysfs_root: Path) -> float | None:
    """The CPU package temperature from a coretemp/k10temp/cpu_thermal hwmon chip, or None."""
    base = sysfs_root / "class" / "hwmon"
    try:
        hwmons = sorted(base.iterdir(), key=lambda p: (len(p.name), p.name))
    except OSError:
        return None
    for hwmon in hwmons:
        chip = _read_text(hwmon / "name")
        if chip not in _HWMON_CPU_CHIPS:
            continue
        labelled: list[tuple[str, float]] = []
        for folder in (hwmon, hwmon / "device"):  # old kernels keep attributes in device/
            for sensor in sorted(folder.glob("temp*_input")):
                celsius = _millidegrees(sensor)
                if celsius is None:
                    continue
                label = _read_text(sensor.with_name(sensor.name.replace("_input", "_label")))
                labelled.append((label or "", celsius))
            if labelled:
                break
        if not labelled:
            continue
        for wanted in _HWMON_CPU_CHIPS[chip]:
            package = [c for label, c in labelled if label.startswith(wanted)]
            if package:
                return max(package)
        return max(c for _, c in labelled)
    return None


def read_temperature_c(sysfs_root: Path = Path("/sys")) -> float | None:
    """CPU/SoC temperature in °C: thermal zones first, then hwmon sensors; None without any."""
    zone = _thermal_zone_temperature(sysfs_root)
    return zone if zone is not None else _hwmon_temperature(sysfs_root)


def _cpufreq_dir(sysfs_root: Path) -> Path:
    """cpufreq policy0 (kernels since 4.x), else the older per-CPU cpu0/cpufreq directory."""
    cpu = sysfs_root / "devices" / "system" / "cpu"
    policy = cpu / "cpufreq" / "policy0"
    return policy if policy.is_dir() else cpu / "cpu0" / "cpufreq"


def _khz_to_mhz(path: Path) -> float | None:
    """A cpufreq frequency attribute (kHz) in MHz, or None."""
    value = _read_number(path)
    return value / 1000.0 if value is not None and value > 0 else None


def environment_snapshot(
    *,
    threads: int | None = None,
    delegate: str | None = None,
    sysfs_root: Path = Path("/sys"),
) -> Environment:
    """Governor, current and maximum CPU clock (policy0 = CPU 0's cluster), temperature."""
    cpufreq = _cpufreq_dir(sysfs_root)
    return Environment(
        governor=_read_text(cpufreq / "scaling_governor") or None,
        cpu_freq_mhz=_khz_to_mhz(cpufreq / "scaling_cur_freq"),
        cpu_max_freq_mhz=_khz_to_mhz(cpufreq / "cpuinfo_max_freq"),
        temperature_c=read_temperature_c(sysfs_root),
        threads=threads,
        delegate=delegate,
    )

"""Tests for agent.environment on fake sysfs trees laid out like a Pi, a laptop and a Jetson."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.environment import environment_snapshot, read_temperature_c
from agent.protocol import Environment

pytestmark = pytest.mark.agent


def write_attr(path: Path, value: object) -> None:
    """Write one sysfs attribute (newline-terminated, as the kernel prints them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n", encoding="ascii")


def class_link(root: Path, cls: str, name: str, device_dir: Path) -> None:
    """/sys/class/<cls>/<name> as a relative symlink into /sys/devices, as the kernel does."""
    link = root / "class" / cls / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(device_dir, link.parent))


def add_zone(root: Path, index: int, kind: str, millidegrees: int) -> Path:
    """/sys/devices/virtual/thermal/thermal_zoneN with type and temp."""
    path = root / "devices" / "virtual" / "thermal" / f"thermal_zone{index}"
    write_attr(path / "type", kind)
    write_attr(path / "temp", millidegrees)
    write_attr(path / "mode", "enabled")
    class_link(root, "thermal", f"thermal_zone{index}", path)
    return path


def add_cooling_device(root: Path, index: int) -> None:
    """A cooling_deviceN next to the zones: it must not be mistaken for a zone."""
    path = root / "devices" / "virtual" / "thermal" / f"cooling_device{index}"
    write_attr(path / "type", "Processor")
    write_attr(path / "cur_state", 0)
    class_link(root, "thermal", f"cooling_device{index}", path)


def add_hwmon(root: Path, index: int, chip: str, device: str, **attrs: object) -> Path:
    """An hwmonN device under its parent device, with arbitrary attributes."""
    path = root / "devices" / "platform" / device / "hwmon" / f"hwmon{index}"
    write_attr(path / "name", chip)
    for attr, value in attrs.items():
        write_attr(path / attr, value)
    class_link(root, "hwmon", f"hwmon{index}", path)
    return path


def add_cpufreq(
    root: Path, cpus: range, policy: int, governor: str, cur_khz: int, max_khz: int
) -> None:
    """devices/system/cpu/cpufreq/policyN plus cpuK/cpufreq -> ../cpufreq/policyN symlinks."""
    cpu = root / "devices" / "system" / "cpu"
    path = cpu / "cpufreq" / f"policy{policy}"
    write_attr(path / "scaling_governor", governor)
    write_attr(path / "scaling_cur_freq", cur_khz)
    write_attr(path / "cpuinfo_max_freq", max_khz)
    write_attr(path / "cpuinfo_min_freq", max_khz // 4)
    write_attr(path / "scaling_available_governors", "conservative ondemand userspace powersave")
    write_attr(path / "affected_cpus", " ".join(str(c) for c in cpus))
    for c in cpus:
        (cpu / f"cpu{c}").mkdir(parents=True, exist_ok=True)
        (cpu / f"cpu{c}" / "cpufreq").symlink_to(f"../cpufreq/policy{policy}")


def make_raspberry_pi(root: Path) -> None:
    """Raspberry Pi 4: a cpu-thermal zone (with its hwmon), cpufreq policy0 for all four cores."""
    zone = add_zone(root, 0, "cpu-thermal", 48_686)
    hwmon = zone / "hwmon0"
    write_attr(hwmon / "name", "cpu_thermal")
    write_attr(hwmon / "temp1_input", 48_686)
    class_link(root, "hwmon", "hwmon0", hwmon)
    add_cooling_device(root, 0)
    add_cpufreq(root, range(4), 0, "ondemand", 600_000, 1_800_000)


def make_x86_laptop(root: Path) -> None:
    """Intel laptop: acpitz zones (one hotter than the CPU), x86_pkg_temp, coretemp hwmon."""
    add_zone(root, 0, "acpitz", 25_000)
    add_zone(root, 1, "acpitz", 78_000)  # a chassis sensor near the charger: not the CPU
    add_zone(root, 2, "INT3400 Thermal", 20_000)
    add_zone(root, 3, "SEN1", 44_050)
    add_zone(root, 4, "x86_pkg_temp", 61_000)
    add_cooling_device(root, 0)
    add_hwmon(
        root,
        3,
        "coretemp",
        "coretemp.0",
        temp1_label="Package id 0", temp1_input=61_000, temp1_crit=100_000,
        temp2_label="Core 0", temp2_input=63_000,
        temp3_label="Core 1", temp3_input=58_000,
    )  # fmt: skip
    add_hwmon(root, 0, "acpitz", "LNXTHERM:00", temp1_input=25_000)
    add_cpufreq(root, range(0, 1), 0, "powersave", 2_400_123, 4_700_000)
    add_cpufreq(root, range(1, 2), 1, "powersave", 800_000, 4_700_000)


def make_jetson_nano(root: Path) -> None:
    """Jetson Nano: several -therm zones; PMIC-Die reads a constant 100 °C placeholder."""
    for index, (kind, temp) in enumerate(
        [
            ("AO-therm", 41_500),
            ("CPU-therm", 39_500),
            ("GPU-therm", 42_000),
            ("PLL-therm", 37_000),
            ("PMIC-Die", 100_000),
            ("thermal-fan-est", 39_700),
        ]
    ):
        add_zone(root, index, kind, temp)
    add_cpufreq(root, range(4), 0, "schedutil", 1_479_000, 1_479_000)


def test_raspberry_pi(tmp_path: Path) -> None:
    """cpu-thermal zone and policy0: governor, clock, max clock, temperature."""
    make_raspberry_pi(tmp_path)
    assert read_temperature_c(tmp_path) == pytest.approx(48.686)
    env = environment_snapshot(threads=4, delegate=None, sysfs_root=tmp_path)
    assert env == Environment(
        governor="ondemand",
        cpu_freq_mhz=600.0,
        cpu_max_freq_mhz=1800.0,
        temperature_c=pytest.approx(48.686),
        threads=4,
        delegate=None,
    )


def test_x86_laptop_prefers_the_package_sensor_over_hotter_acpi_zones(tmp_path: Path) -> None:
    """x86_pkg_temp wins over a hotter acpitz; policy0 is CPU 0's policy."""
    make_x86_laptop(tmp_path)
    assert read_temperature_c(tmp_path) == pytest.approx(61.0)
    env = environment_snapshot(threads=2, delegate="xnnpack", sysfs_root=tmp_path)
    assert env.governor == "powersave"
    assert env.cpu_freq_mhz == pytest.approx(2400.123)
    assert env.cpu_max_freq_mhz == pytest.approx(4700.0)
    assert (env.threads, env.delegate) == (2, "xnnpack")


def test_x86_without_thermal_zones_falls_back_to_coretemp_package(tmp_path: Path) -> None:
    """No thermal class (thermal driver not loaded): coretemp's Package id 0, not a hotter core."""
    make_x86_laptop(tmp_path)
    for link in (tmp_path / "class" / "thermal").iterdir():
        link.unlink()
    assert read_temperature_c(tmp_path) == pytest.approx(61.0)


def test_amd_k10temp_tctl(tmp_path: Path) -> None:
    """k10temp: Tctl is the package figure; the CCD sensors are parts of it."""
    add_hwmon(
        tmp_path,
        1,
        "k10temp",
        "0000:00:18.3",
        temp1_label="Tctl", temp1_input=55_250,
        temp3_label="Tccd1", temp3_input=60_000,
    )  # fmt: skip
    assert read_temperature_c(tmp_path) == pytest.approx(55.25)


def test_jetson_prefers_cpu_zone_over_placeholder_pmic(tmp_path: Path) -> None:
    """CPU-therm, not the hottest zone (PMIC-Die's constant 100 °C)."""
    make_jetson_nano(tmp_path)
    assert read_temperature_c(tmp_path) == pytest.approx(39.5)
    env = environment_snapshot(threads=4, delegate="gpu", sysfs_root=tmp_path)
    assert env.governor == "schedutil"
    assert env.cpu_freq_mhz == env.cpu_max_freq_mhz == pytest.approx(1479.0)


def test_jetson_orin_cpu_zones_hottest_of_the_preferred_kind(tmp_path: Path) -> None:
    """Orin names zones cpu-thermal, gpu-thermal, soc0-thermal ...: the CPU one is used."""
    for index, (kind, temp) in enumerate(
        [("cpu-thermal", 51_000), ("gpu-thermal", 49_000), ("soc0-thermal", 53_000)]
    ):
        add_zone(tmp_path, index, kind, temp)
    assert read_temperature_c(tmp_path) == pytest.approx(51.0)


def test_no_preferred_zone_takes_the_hottest_plausible_one(tmp_path: Path) -> None:
    """Unknown zone types: the hottest; a disabled zone reading -273 °C is ignored."""
    add_zone(tmp_path, 0, "board", 35_000)
    add_zone(tmp_path, 1, "ambient", 28_000)
    add_zone(tmp_path, 2, "broken", -273_200)
    assert read_temperature_c(tmp_path) == pytest.approx(35.0)


def test_unreadable_files_are_none_not_errors(tmp_path: Path) -> None:
    """Garbage, empty and directory-instead-of-file attributes all read as missing."""
    zone = add_zone(tmp_path, 0, "cpu-thermal", 0)
    write_attr(zone / "temp", "N/A")
    add_cpufreq(tmp_path, range(1), 0, "", 0, 0)
    policy = tmp_path / "devices" / "system" / "cpu" / "cpufreq" / "policy0"
    (policy / "scaling_cur_freq").unlink()
    (policy / "scaling_cur_freq").mkdir()  # read fails with EISDIR, even as root
    env = environment_snapshot(threads=None, delegate=None, sysfs_root=tmp_path)
    assert env == Environment()


def test_old_kernel_cpu0_cpufreq_without_policy_dirs(tmp_path: Path) -> None:
    """Before policyN directories, cpufreq lived in cpu0/cpufreq itself."""
    cpufreq = tmp_path / "devices" / "system" / "cpu" / "cpu0" / "cpufreq"
    write_attr(cpufreq / "scaling_governor", "performance")
    write_attr(cpufreq / "scaling_cur_freq", 1_200_000)
    write_attr(cpufreq / "cpuinfo_max_freq", 1_200_000)
    env = environment_snapshot(sysfs_root=tmp_path)
    assert (env.governor, env.cpu_freq_mhz, env.cpu_max_freq_mhz) == ("performance", 1200.0, 1200.0)


def test_nothing_at_all(tmp_path: Path) -> None:
    """A VM without sensors or cpufreq: every field None (threads/delegate passed through)."""
    assert read_temperature_c(tmp_path) is None
    assert read_temperature_c(tmp_path / "missing") is None
    env = environment_snapshot(threads=3, delegate=None, sysfs_root=tmp_path / "missing")
    assert env == Environment(threads=3)


def test_this_machine_does_not_raise() -> None:
    """The real /sys, whatever it holds, gives values or None."""
    env = environment_snapshot(threads=1, delegate=None)
    assert env.threads == 1
    assert env.temperature_c is None or -40.0 <= env.temperature_c <= 150.0

"""Tests for agent.power against fake sysfs trees laid out like the kernel's."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent.power import (
    DEFAULT_POWER_MODEL,
    EnergyReading,
    EstimatedSource,
    HwmonSource,
    PowerModel,
    PowerSource,
    PowerSupplySource,
    RaplSource,
    detect_power_source,
)

pytestmark = pytest.mark.agent

FAST_INTERVAL_S = 0.005  # sample every 5 ms so each test window needs only ~0.2 s
RAPL_MAX_UJ = 262_143_328_850  # max_energy_range_uj of a real Intel package zone


def write_attr(path: Path, value: object) -> None:
    """Write a sysfs-style attribute atomically (a sampler never sees a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{value}\n", encoding="ascii")
    os.replace(tmp, path)


def class_link(root: Path, cls: str, name: str, device_dir: Path) -> None:
    """Add /sys/class/<cls>/<name> as a symlink into /sys/devices, as the kernel does."""
    link = root / "class" / cls / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(device_dir, link.parent))


# --- fake trees -------------------------------------------------------------------------------


def add_rapl_zone(root: Path, zone: str, name: str, energy_uj: int) -> Path:
    """One powercap zone; subzones (intel-rapl:0:0) nest inside their package's directory."""
    parts = zone.split(":")
    control = "intel-rapl-mmio" if zone.startswith("intel-rapl-mmio") else "intel-rapl"
    base = root / "devices" / "virtual" / "powercap" / control
    path = base / ":".join(parts[:2]) if len(parts) == 2 else base / ":".join(parts[:2]) / zone
    for attr, value in {
        "name": name,
        "energy_uj": energy_uj,
        "max_energy_range_uj": RAPL_MAX_UJ,
        "enabled": 1,
        "constraint_0_name": "long_term",
    }.items():
        write_attr(path / attr, value)
    class_link(root, "powercap", zone, path)
    return path


def make_rapl(root: Path) -> dict[str, Path]:
    """Two packages with core/uncore/dram subzones, a psys zone and an MMIO mirror."""
    control = root / "devices" / "virtual" / "powercap" / "intel-rapl"
    write_attr(control / "enabled", 1)
    class_link(root, "powercap", "intel-rapl", control)
    zones = {
        "intel-rapl:0": ("package-0", 10_000_000),
        "intel-rapl:0:0": ("core", 5_000_000),
        "intel-rapl:0:1": ("uncore", 1_000_000),
        "intel-rapl:1": ("package-1", 20_000_000),
        "intel-rapl:1:0": ("dram", 3_000_000),
        "intel-rapl:2": ("psys", 50_000_000),
        "intel-rapl-mmio:0": ("package-0", 10_000_000),
    }
    return {zone: add_rapl_zone(root, zone, *spec) for zone, spec in zones.items()}


def add_battery(root: Path, name: str, status: str, **values: int) -> Path:
    """A power_supply entry of type Battery with the given *_now attributes."""
    path = root / "devices" / "LNXSYSTM:00" / "PNP0C0A:00" / "power_supply" / name
    write_attr(path / "type", "Battery")
    write_attr(path / "status", status)
    write_attr(path / "present", 1)
    for attr, value in values.items():
        write_attr(path / attr, value)
    class_link(root, "power_supply", name, path)
    return path


def add_mains(root: Path) -> None:
    """The AC adapter entry every laptop also has."""
    path = root / "devices" / "LNXSYSTM:00" / "ACPI0003:00" / "power_supply" / "AC"
    write_attr(path / "type", "Mains")
    write_attr(path / "online", 1)
    class_link(root, "power_supply", "AC", path)


def add_hwmon(root: Path, index: int, chip: str, **attrs: object) -> Path:
    """An hwmonN device with a name and arbitrary attributes."""
    path = root / "devices" / "platform" / f"{chip}.{index}" / "hwmon" / f"hwmon{index}"
    write_attr(path / "name", chip)
    for attr, value in attrs.items():
        write_attr(path / attr, value)
    class_link(root, "hwmon", f"hwmon{index}", path)
    return path


def add_jetson_ina3221(root: Path, index: int = 1) -> Path:
    """INA3221 as on a Jetson Orin: VDD_IN is the total, the other rails are parts of it."""
    return add_hwmon(
        root,
        index,
        "ina3221",
        in1_label="VDD_IN", in1_input=5000, curr1_input=2000,  # 10 W total
        in2_label="VDD_CPU_GPU_CV", in2_input=5000, curr2_input=800,
        in3_label="VDD_SOC", in3_input=5000, curr3_input=400,
        in4_input=12, in5_input=5, in6_input=2,  # shunt voltages: no matching curr channel
    )  # fmt: skip


# --- RAPL -------------------------------------------------------------------------------------


def test_rapl_sums_package_zones_only(tmp_path: Path) -> None:
    """Subzones, psys and the MMIO mirror change too but must not be counted."""
    zones = make_rapl(tmp_path)
    source = RaplSource.discover(tmp_path)
    assert source is not None
    assert source.label == "rapl:package-0+package-1"
    token = source.start()
    bumps = {"intel-rapl:0": 1_000_000, "intel-rapl:1": 500_000}
    for zone, path in zones.items():
        before = int((path / "energy_uj").read_text())
        write_attr(path / "energy_uj", before + bumps.get(zone, 7_000_000))
    reading = source.stop(token)
    assert reading.joules == pytest.approx(1.5)
    assert reading.seconds > 0
    assert (reading.source, reading.estimated) == ("rapl:package-0+package-1", False)


def test_rapl_counter_wraparound(tmp_path: Path) -> None:
    """energy_uj after < before means the counter wrapped at max_energy_range_uj."""
    package = add_rapl_zone(tmp_path, "intel-rapl:0", "package-0", RAPL_MAX_UJ - 100)
    source = RaplSource.discover(tmp_path)
    assert source is not None
    token = source.start()
    write_attr(package / "energy_uj", 400)
    assert source.stop(token).joules == pytest.approx(500e-6)


def test_rapl_unreadable_or_absent_is_not_used(tmp_path: Path) -> None:
    """No powercap, or a counter that cannot be read (root-only on Linux >= 5.10) -> None."""
    assert RaplSource.discover(tmp_path) is None
    package = add_rapl_zone(tmp_path, "intel-rapl:0", "package-0", 1)
    (package / "energy_uj").unlink()
    (package / "energy_uj").mkdir()  # tests run as root, which ignores modes: EISDIR fails reads
    assert RaplSource.discover(tmp_path) is None


# --- battery ----------------------------------------------------------------------------------


def test_discharging_battery_voltage_times_current(tmp_path: Path) -> None:
    """12 V × 1.5 A = 18 W; the sign of current_now does not matter."""
    add_mains(tmp_path)
    add_battery(tmp_path, "BAT0", "Discharging", voltage_now=12_000_000, current_now=-1_500_000)
    source = PowerSupplySource.discover(tmp_path, interval_s=FAST_INTERVAL_S)
    assert source is not None
    token = source.start()
    time.sleep(0.02)
    reading = source.stop(token)
    assert reading.watts == pytest.approx(18.0)
    assert (reading.source, reading.estimated) == ("power_supply:BAT0", False)


def test_two_batteries_power_now_and_v_times_i_are_summed(tmp_path: Path) -> None:
    """power_now (µW) is preferred when present; all discharging batteries add up."""
    add_battery(tmp_path, "BAT0", "Discharging", voltage_now=12_000_000, current_now=1_000_000)
    add_battery(tmp_path, "BAT1", "Discharging", power_now=7_000_000, voltage_now=1, current_now=1)
    source = PowerSupplySource.discover(tmp_path, interval_s=FAST_INTERVAL_S)
    assert source is not None
    assert source.read_watts() == pytest.approx(19.0)


@pytest.mark.parametrize("status", ["Charging", "Full", "Not charging", "Unknown"])
def test_battery_not_discharging_is_not_used(tmp_path: Path, status: str) -> None:
    """On mains power a battery sees only part of the flow, so it is skipped."""
    add_mains(tmp_path)
    add_battery(tmp_path, "BAT0", status, voltage_now=12_000_000, current_now=1_500_000)
    assert PowerSupplySource.discover(tmp_path) is None


# --- hwmon ------------------------------------------------------------------------------------


def test_hwmon_power_channel_is_sampled_during_the_window(tmp_path: Path) -> None:
    """A 9 W burst in the middle of a 1 W window shows up only if sampling really runs."""
    chip = add_hwmon(tmp_path, 0, "ina226", power1_input=1_000_000, curr1_input=1, in1_input=1)
    source = HwmonSource.discover(tmp_path, interval_s=FAST_INTERVAL_S)
    assert source is not None
    assert source.label == "hwmon:ina226/channel1"
    token = source.start()
    time.sleep(0.05)
    write_attr(chip / "power1_input", 9_000_000)
    time.sleep(0.1)
    write_attr(chip / "power1_input", 1_000_000)
    time.sleep(0.05)
    reading = source.stop(token)
    # Start and stop samples alone would give exactly 1 W; the burst lifts it to about 5 W.
    assert 2.0 < reading.watts < 9.0
    assert reading.seconds == pytest.approx(0.2, abs=0.15)
    assert reading.estimated is False


def test_hwmon_jetson_uses_the_total_input_rail_only(tmp_path: Path) -> None:
    """curr × in of VDD_IN (5 V × 2 A); the CPU/GPU and SOC subrails are not added."""
    add_hwmon(tmp_path, 0, "coretemp", temp1_input=45000)  # no power channels: ignored
    add_jetson_ina3221(tmp_path, 1)
    source = HwmonSource.discover(tmp_path, interval_s=FAST_INTERVAL_S)
    assert source is not None
    assert source.label == "hwmon:ina3221/VDD_IN"
    assert source.read_watts() == pytest.approx(10.0)
    token = source.start()
    reading = source.stop(token)
    assert reading.watts == pytest.approx(10.0)


def test_hwmon_without_total_rail_sums_channels_once(tmp_path: Path) -> None:
    """power1_input wins over curr1 × in1 of the same channel; separate chips add up."""
    add_hwmon(tmp_path, 0, "ina219", power1_input=2_500_000, curr1_input=500, in1_input=5000)
    add_hwmon(tmp_path, 1, "ina260", power1_input=1_500_000)
    source = HwmonSource.discover(tmp_path)
    assert source is not None
    assert source.read_watts() == pytest.approx(4.0)


def test_hwmon_component_sensors_are_not_device_power(tmp_path: Path) -> None:
    """A GPU's power channel is not the board's draw; no usable chip -> None."""
    add_hwmon(tmp_path, 0, "amdgpu", power1_input=45_000_000)
    add_hwmon(tmp_path, 1, "nvme", temp1_input=40000)
    assert HwmonSource.discover(tmp_path) is None


# --- estimate ---------------------------------------------------------------------------------


def _spin(seconds: float) -> None:
    """Keep one core busy for `seconds` of wall time."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_estimate_follows_cpu_use() -> None:
    """A busy window costs about idle + one core; a sleeping one about idle; both labelled."""
    model = PowerModel(idle_w=1.0, active_w_per_core=2.0, accelerator_active_w=5.0)
    source = EstimatedSource(model, threads=1)
    token = source.start()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    _spin(0.05)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    busy = source.stop(token)
    # What the core actually gave us (less than 1.0 when the machine is contended).
    fraction = min(1.0, (cpu1 - cpu0) / (wall1 - wall0))
    assert busy.watts == pytest.approx(1.0 + 2.0 * fraction, abs=0.15)
    assert busy.watts <= 3.0 + 1e-9
    idle = source.stop(_timed(source, lambda: time.sleep(0.05)))
    assert 1.0 <= idle.watts < 1.5
    assert busy.watts > idle.watts
    assert (busy.source, busy.estimated) == ("estimated", True)
    assert busy.joules == pytest.approx(busy.watts * busy.seconds)
    npu = EstimatedSource(model, threads=1, accelerator_in_use=True)
    assert npu.stop(_timed(npu, lambda: time.sleep(0.01))).watts >= 6.0


def _timed(source: PowerSource, work: object) -> object:
    """start(), run work(), return the token for stop()."""
    token = source.start()
    work()  # type: ignore[operator]
    return token


def test_estimate_caps_threads_at_usable_cores() -> None:
    """More threads than cores cannot burn more than all cores."""
    assert EstimatedSource(threads=10_000).active_cores == len(os.sched_getaffinity(0))
    assert EstimatedSource(threads=0).active_cores == 1


def test_energy_reading_watts_of_empty_window() -> None:
    """No time, no power (instead of a division by zero)."""
    assert EnergyReading(1.0, 0.0, "x", estimated=False).watts == 0.0
    assert EnergyReading(3.0, 2.0, "x", estimated=False).watts == 1.5


def test_stop_rejects_foreign_tokens(tmp_path: Path) -> None:
    """Mixing tokens between sources is a programming error."""
    add_hwmon(tmp_path, 0, "ina260", power1_input=1_000_000)
    hwmon = HwmonSource.discover(tmp_path)
    assert hwmon is not None
    with pytest.raises(TypeError):
        hwmon.stop(EstimatedSource().start())
    with pytest.raises(TypeError):
        EstimatedSource().stop(object())


# --- detection order --------------------------------------------------------------------------


def test_detect_order_rapl_then_battery_then_hwmon_then_estimate(tmp_path: Path) -> None:
    """Each measured source wins over the ones after it; nothing usable -> labelled estimate."""
    add_jetson_ina3221(tmp_path)
    add_battery(tmp_path, "BAT0", "Discharging", power_now=5_000_000)
    make_rapl(tmp_path)
    assert isinstance(detect_power_source(tmp_path), RaplSource)

    for link in (tmp_path / "class" / "powercap").iterdir():
        link.unlink()
    assert isinstance(detect_power_source(tmp_path), PowerSupplySource)

    write_attr(tmp_path / "class" / "power_supply" / "BAT0" / "status", "Charging")
    assert isinstance(detect_power_source(tmp_path), HwmonSource)

    for link in (tmp_path / "class" / "hwmon").iterdir():
        link.unlink()
    fallback = detect_power_source(tmp_path, threads=2)
    assert isinstance(fallback, EstimatedSource)
    assert fallback.estimated is True
    assert fallback.power_model == DEFAULT_POWER_MODEL == PowerModel(2.0, 1.0)

    profile_model = PowerModel(idle_w=0.5, active_w_per_core=0.3)
    chosen = detect_power_source(tmp_path / "nonexistent", power_model=profile_model)
    assert isinstance(chosen, EstimatedSource)
    assert chosen.power_model is profile_model
    assert isinstance(chosen, PowerSource)


def test_detect_passes_the_sampling_interval_to_sampled_sources(tmp_path: Path) -> None:
    """Telemetry polls sensors slower than a benchmark; RAPL needs no polling at all."""
    from agent.power import SAMPLE_INTERVAL_S, TELEMETRY_SAMPLE_INTERVAL_S

    add_battery(tmp_path, "BAT0", "Discharging", power_now=5_000_000)
    default = detect_power_source(tmp_path)
    slow = detect_power_source(tmp_path, sample_interval_s=TELEMETRY_SAMPLE_INTERVAL_S)
    assert isinstance(default, PowerSupplySource) and isinstance(slow, PowerSupplySource)
    assert default.interval_s == SAMPLE_INTERVAL_S
    assert slow.interval_s == TELEMETRY_SAMPLE_INTERVAL_S > SAMPLE_INTERVAL_S
    write_attr(tmp_path / "class" / "power_supply" / "BAT0" / "status", "Full")
    add_jetson_ina3221(tmp_path)
    hwmon = detect_power_source(tmp_path, sample_interval_s=0.5)
    assert isinstance(hwmon, HwmonSource) and hwmon.interval_s == 0.5
    make_rapl(tmp_path)
    assert isinstance(detect_power_source(tmp_path, sample_interval_s=0.5), RaplSource)

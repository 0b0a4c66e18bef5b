"""Profile matching from what real boards report: /proc/cpuinfo and the device tree's model and
compatible, parsed as the agent parses them, matched against the shipped profiles.

The strings are those the boards' kernels print (Raspberry Pi OS bookworm 32- and 64-bit,
L4T for Jetson, Mendel for Coral, NXP's BSP for the i.MX EVKs); RAM is what `free` shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import firmware_profiles
from agent.facts import board_identity, parse_cpuinfo
from agent.protocol import DeviceFacts, Hello, dump, parse

pytestmark = [pytest.mark.agent]


def _arm64_cpuinfo(part: str, cores: int, revision: int, model: str | None = None) -> str:
    """An arm64 kernel's /proc/cpuinfo (Pi kernels add Revision/Serial/Model at the end)."""
    blocks = [
        f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
        f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
        f"CPU part\t: {part}\nCPU revision\t: {revision}\n"
        for i in range(cores)
    ]
    tail = f"Revision\t: c03114\nSerial\t\t: 10000000a1b2\nModel\t\t: {model}\n" if model else ""
    return "\n".join(blocks) + "\n" + tail


def _compat_cpuinfo(part: str, cores: int, model: str) -> str:
    """What a 32-bit (armhf) process reads on a Pi's 64-bit kernel: compat names, no Hardware."""
    blocks = [
        f"processor\t: {i}\nmodel name\t: ARMv8 Processor rev 3 (v8l)\nBogoMIPS\t: 108.00\n"
        "Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt lpae "
        "evtstrm crc32\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
        f"CPU part\t: {part}\nCPU revision\t: 3\n"
        for i in range(cores)
    ]
    return "\n".join(blocks) + f"\nRevision\t: c03114\nSerial\t\t: 1000000\nModel\t\t: {model}\n"


def _armv7_kernel_cpuinfo(part: str, cores: int, model: str, revision: str) -> str:
    """A 32-bit Pi kernel's /proc/cpuinfo: `Hardware : BCM2835` on every Pi model."""
    blocks = [
        f"processor\t: {i}\nmodel name\t: ARMv7 Processor rev 4 (v7l)\nBogoMIPS\t: 38.40\n"
        "Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 "
        "lpae evtstrm crc32\nCPU implementer\t: 0x41\nCPU architecture: 7\nCPU variant\t: 0x0\n"
        f"CPU part\t: {part}\nCPU revision\t: 4\n"
        for i in range(cores)
    ]
    return (
        "\n".join(blocks)
        + f"\nHardware\t: BCM2835\nRevision\t: {revision}\nSerial\t\t: 00000000a1b2c3d4\n"
        + f"Model\t\t: {model}\n"
    )


X86_CPUINFO = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
    "model name\t: AMD EPYC 7B13\nflags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep\n"
)


@dataclass(frozen=True)
class Board:
    """One real device: what it reports, and the profile it should get (None: no match)."""

    name: str
    arch: str
    cores: int
    ram_mb: int
    cpuinfo: str
    dt_model: str | None
    dt_compatible: str | None
    expected: str | None
    reason_has: tuple[str, ...] = ()
    delegates: tuple[str, ...] = ("xnnpack",)


PI4_MODEL = "Raspberry Pi 4 Model B Rev 1.4"
PI4_COMPAT = "raspberrypi,4-model-b\x00brcm,bcm2711\x00"
PI5_MODEL = "Raspberry Pi 5 Model B Rev 1.0"
PI5_COMPAT = "raspberrypi,5-model-b\x00brcm,bcm2712\x00"

BOARDS = [
    Board(
        "Pi 3 B+, Pi OS 32-bit, 32-bit kernel",
        "armv7l", 4, 906,
        _armv7_kernel_cpuinfo("0xd03", 4, "Raspberry Pi 3 Model B Plus Rev 1.3", "a020d3"),
        "Raspberry Pi 3 Model B Plus Rev 1.3\x00",
        "raspberrypi,3-model-b-plus\x00brcm,bcm2837\x00",
        "rpi3b-plus", ("board matches 'Raspberry Pi'", "SoC matches"),
    ),
    Board(
        "Pi 4 B 4 GB, Pi OS 32-bit (armhf userland, 64-bit kernel)",
        "armv7l", 4, 3796, _compat_cpuinfo("0xd08", 4, PI4_MODEL), PI4_MODEL + "\x00", PI4_COMPAT,
        "rpi3b-plus", ("also named by rpi4 (aarch64)",),
    ),
    Board(
        "Pi 4 B 2 GB, Pi OS 32-bit with arm_64bit=0 (32-bit kernel)",
        "armv7l", 4, 1849, _armv7_kernel_cpuinfo("0xd08", 4, PI4_MODEL, "b03114"),
        PI4_MODEL + "\x00", PI4_COMPAT, "rpi3b-plus",
    ),
    Board(
        "Pi 4 B 4 GB, Pi OS 64-bit",
        "aarch64", 4, 3796, _arm64_cpuinfo("0xd08", 4, 3, PI4_MODEL), PI4_MODEL + "\x00",
        PI4_COMPAT, "rpi4", ("board matches 'Raspberry Pi 4'", "same CPU core"),
    ),
    Board(
        # Cores and RAM alone put this 8 GB Pi 4 on rpi5 (8 GB); the board says rpi4.
        "Pi 4 B 8 GB, Pi OS 64-bit",
        "aarch64", 4, 7809, _arm64_cpuinfo("0xd08", 4, 3, PI4_MODEL), PI4_MODEL + "\x00",
        PI4_COMPAT, "rpi4", ("board matches 'Raspberry Pi 4'",),
    ),
    Board(
        "Pi 5 8 GB, Pi OS 64-bit",
        "aarch64", 4, 8052, _arm64_cpuinfo("0xd0b", 4, 1, PI5_MODEL), PI5_MODEL + "\x00",
        PI5_COMPAT, "rpi5", ("board matches 'Raspberry Pi 5'",),
    ),
    Board(
        "Pi 5 4 GB, Pi OS 32-bit userland",
        "armv7l", 4, 4044, _compat_cpuinfo("0xd0b", 4, PI5_MODEL), PI5_MODEL + "\x00", PI5_COMPAT,
        "rpi3b-plus", ("also named by rpi5 (aarch64)",),
    ),
    Board(
        "Jetson Orin Nano 8 GB developer kit, L4T 36",
        "aarch64", 6, 7620, _arm64_cpuinfo("0xd42", 6, 1),
        "NVIDIA Jetson Orin Nano Developer Kit\x00",
        "nvidia,p3768-0000+p3767-0005\x00nvidia,p3767-0005\x00nvidia,tegra234\x00",
        "jetson-orin-nano-cpu", ("board matches 'Jetson Orin Nano'",),
    ),
    Board(
        # The original Jetson Nano (Tegra X1, Cortex-A57) has no profile: 4 cores and 4 GB
        # like a Pi 4, but it is not one, and the match says so instead of borrowing rpi4.
        "Jetson Nano 4 GB developer kit, L4T 32",
        "aarch64", 4, 3956, _arm64_cpuinfo("0xd07", 4, 1),
        "NVIDIA Jetson Nano Developer Kit\x00",
        "nvidia,p3450-0000\x00nvidia,jetson-nano\x00nvidia,tegra210\x00",
        None, ("NVIDIA Jetson Nano Developer Kit", "above the limit"),
    ),
    Board(
        "Coral Dev Board 1 GB, Mendel",
        "aarch64", 4, 974, _arm64_cpuinfo("0xd03", 4, 4), "Freescale i.MX8MQ Phanbell\x00",
        "fsl,imx8mq-phanbell\x00fsl,imx8mq\x00", "coral-dev-board", ("board matches 'Phanbell'",),
        ("xnnpack", "edgetpu"),
    ),
    Board(
        "i.MX 8M Plus EVK 6 GB, NXP BSP",
        "aarch64", 4, 5712, _arm64_cpuinfo("0xd03", 4, 4), "NXP i.MX8MPlus EVK board\x00",
        "fsl,imx8mp-evk\x00fsl,imx8mp\x00", "imx8mp", ("board matches 'i.MX8MPlus'",),
        ("xnnpack", "vx"),
    ),
    Board(
        "i.MX 93 EVK 2 GB, NXP BSP",
        "aarch64", 2, 1843, _arm64_cpuinfo("0xd05", 2, 0), "NXP i.MX93 11X11 EVK board\x00",
        "fsl,imx93-11x11-evk\x00fsl,imx93\x00", "imx93", ("board matches 'i.MX93'",),
        ("xnnpack", "ethos-u"),
    ),
    Board(
        # qemu-user armhf chroot on a 2-core x86 host with 24 GB: before identity this matched
        # nothing ("nearest is rpi3b-plus ... score 5.56, above the limit 5.0").
        "armhf userland under qemu-user on x86",
        "armv7l", 2, 24105, X86_CPUINFO, None, None, "rpi3b-plus", ("arch alone (emulated)",),
    ),
    Board(
        "arm64 userland under qemu-user on x86, no board",
        "aarch64", 2, 24105, X86_CPUINFO, None, None, None, ("declare a profile",),
    ),
]  # fmt: skip


def _facts(board: Board) -> dict[str, object]:
    """The facts the controller matches, as the agent would report them for this board."""
    ident = board_identity(board.cpuinfo, board.dt_model, board.dt_compatible, board.arch)
    facts = DeviceFacts(
        board.arch, "Linux", board.cores, board.ram_mb, "tflite-runtime", "2.14.0", "3.11.2",
        board.delegates, board=ident.board, socs=ident.socs, cpu_parts=ident.cpu_parts,
        emulated=ident.emulated,
    )  # fmt: skip
    # Through the wire format, as the controller receives it.
    hello = parse(dump(Hello("dev-1", "0.1.0", facts)), Hello)
    got = hello.facts
    return {
        "arch": got.arch,
        "cpu_count": got.cpu_count,
        "ram_mb": got.ram_mb,
        "delegates": list(got.delegates),
        "board": got.board,
        "socs": list(got.socs),
        "cpu_parts": list(got.cpu_parts),
        "emulated": got.emulated,
    }


@pytest.mark.parametrize("board", BOARDS, ids=[b.name for b in BOARDS])
def test_real_boards_get_a_sensible_profile_with_the_reason(board: Board) -> None:
    profile, reason = firmware_profiles.match(_facts(board))
    assert profile == board.expected, reason
    for text in board.reason_has:
        assert text in reason, reason
    if board.dt_model:
        assert board.dt_model.rstrip("\x00") in reason, "the reason names the board"


def test_cpuinfo_parsing() -> None:
    text = _armv7_kernel_cpuinfo("0xd03", 4, "Raspberry Pi 3 Model B Rev 1.2", "a02082")
    pi3 = parse_cpuinfo(text)
    assert pi3 == {
        "model": "Raspberry Pi 3 Model B Rev 1.2",
        "hardware": "BCM2835",
        "cpu_parts": ("0xd03",),
        "x86": False,
    }
    x86 = parse_cpuinfo(X86_CPUINFO)
    assert x86["x86"] is True and x86["model"] is None, "x86 'model : 1' is not a board"
    big_little = _arm64_cpuinfo("0xd05", 2, 0) + _arm64_cpuinfo("0xd0d", 2, 0)
    assert parse_cpuinfo(big_little)["cpu_parts"] == ("0xd05", "0xd0d")


def test_identity_without_device_tree_falls_back_to_cpuinfo_model() -> None:
    ident = board_identity(
        _armv7_kernel_cpuinfo("0xd03", 4, "Raspberry Pi 3 Model B Plus Rev 1.3", "a020d3"),
        None,
        None,
        "armv7l",
    )
    assert ident.board == "Raspberry Pi 3 Model B Plus Rev 1.3" and ident.socs == ("BCM2835",)
    assert not ident.emulated
    # A bind-mounted ARM cpuinfo in an emulator is taken at its word (not "emulated").
    assert not board_identity(_arm64_cpuinfo("0xd08", 4, 3), None, None, "aarch64").emulated


def test_declared_and_unknown_cases_are_unchanged() -> None:
    assert firmware_profiles.match({"arch": "aarch64", "declared_profile": "rpi4"}) == (
        "rpi4",
        "declared by device",
    )
    profile, reason = firmware_profiles.match({"arch": "aarch64", "cpu_count": 4, "ram_mb": 4096})
    assert profile == "rpi4" and "board matches" not in reason, "no identity: as before"


def test_the_board_tells_an_8gb_pi4_from_a_pi5() -> None:
    """Same cores, same RAM: without the board an 8 GB Pi 4 lands on rpi5."""
    pi4 = next(b for b in BOARDS if b.name == "Pi 4 B 8 GB, Pi OS 64-bit")
    facts = _facts(pi4)
    assert firmware_profiles.match(facts)[0] == "rpi4"
    anonymous = {k: v for k, v in facts.items() if k not in ("board", "socs", "cpu_parts")}
    assert firmware_profiles.match(anonymous)[0] == "rpi5"


def test_a_pi_on_a_32_bit_userland_is_not_the_64_bit_profile() -> None:
    pi4 = next(b for b in BOARDS if b.name.startswith("Pi 4 B 4 GB, Pi OS 32-bit"))
    profile, reason = firmware_profiles.match(_facts(pi4))
    assert profile == "rpi3b-plus"
    assert "also named by rpi4 (aarch64), which needs that userland, not armv7l" in reason

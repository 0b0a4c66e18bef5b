"""Check that the agent's requirements install on the devices we name without a compiler.

For each target (Debian 12 / Raspberry Pi OS bookworm, CPython 3.11, on aarch64 and armv7l) it
evaluates the environment markers of a requirement file for that target, then walks the
dependency tree: every package must either have a binary wheel on PyPI for the target
(`pip download --only-binary=:all: --platform ...`), or be provided by a Debian package whose
bookworm version satisfies every specifier on it. pip evaluates markers for the machine it runs
on, not for --platform, hence the walk here. Usage:

    python scripts/check_device_wheels.py [--target aarch64|armv7l] [requirements/agent.txt ...]

Exit 0 when everything resolves; 1 with one line per missing wheel otherwise.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# Debian 12 (bookworm) and Raspberry Pi OS bookworm ship CPython 3.11.2 and glibc 2.36, so any
# manylinux tag up to 2_36 runs there.
PYTHON_VERSION = "3.11"
PYTHON_FULL = "3.11.2"
GLIBC_MINOR_MAX = 36
# What bookworm provides where PyPI has no wheel (apt-get install; the venv is created with
# --system-site-packages): package -> (Debian package, bookworm version).
DEBIAN_ARMV7L: dict[str, tuple[str, str]] = {
    "numpy": ("python3-numpy", "1.24.2"),
    "psutil": ("python3-psutil", "5.9.4"),
    "cffi": ("python3-cffi", "1.15.1"),
    "pycparser": ("python3-pycparser", "2.21"),
}


@dataclass(frozen=True)
class Target:
    """One device architecture: its wheel platform tags, marker values and Debian fallbacks."""

    machine: str
    platforms: tuple[str, ...]
    debian: dict[str, tuple[str, str]] = field(default_factory=dict)

    def environment(self) -> dict[str, str]:
        """Marker environment of CPython 3.11 on Linux on this machine."""
        env = default_environment()
        env.update(
            platform_machine=self.machine,
            platform_system="Linux",
            sys_platform="linux",
            os_name="posix",
            python_version=PYTHON_VERSION,
            python_full_version=PYTHON_FULL,
            implementation_name="cpython",
            implementation_version=PYTHON_FULL,
            platform_python_implementation="CPython",
            extra="",
        )
        return env


def _platforms(arch: str) -> tuple[str, ...]:
    """Every wheel platform tag a bookworm `arch` system accepts."""
    legacy = {"aarch64": "manylinux2014_aarch64", "armv7l": "manylinux2014_armv7l"}[arch]
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(17, GLIBC_MINOR_MAX + 1)]
    return (f"linux_{arch}", legacy, *tags)


TARGETS = {
    "aarch64": Target("aarch64", _platforms("aarch64")),
    "armv7l": Target("armv7l", _platforms("armv7l"), DEBIAN_ARMV7L),
}


def read_requirements(path: Path) -> list[Requirement]:
    """The requirement lines of a pip requirements file (comments and blanks skipped)."""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.append(Requirement(line))
    return out


def _download(requirement: str, target: Target, dest: Path) -> Path | None:
    """The wheel pip picks for `requirement` on `target` (no deps), or None when there is none."""
    args = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    for platform in target.platforms:
        args += ["--platform", platform]
    args += ["--python-version", PYTHON_VERSION, "--implementation", "cp"]
    args += ["--abi", "cp311", "--abi", "abi3", "--abi", "none", "-d", str(dest), requirement]
    before = set(dest.glob("*.whl"))
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    new = set(dest.glob("*.whl")) - before
    name = canonicalize_name(Requirement(requirement).name)
    for wheel in sorted(new or dest.glob("*.whl")):
        if canonicalize_name(wheel.name.split("-")[0]) == name:
            return wheel
    return None


def _wheel_requires(wheel: Path) -> list[Requirement]:
    """Requires-Dist of a wheel."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(zf.read(meta).decode())
    return [Requirement(r) for r in message.get_all("Requires-Dist") or []]


def check(requirements: list[Requirement], target: Target) -> tuple[list[str], list[str]]:
    """(lines describing what each package resolves to, problems) for one target."""
    env = target.environment()
    queue = [r for r in requirements if r.marker is None or r.marker.evaluate(env)]
    seen: dict[str, list[Requirement]] = {}
    report: list[str] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp)
        while queue:
            req = queue.pop(0)
            name = canonicalize_name(req.name)
            if name in seen:
                seen[name].append(req)
                continue
            seen[name] = [req]
            if name in target.debian:
                package, version = target.debian[name]
                continue  # checked below against every specifier collected
            wheel = _download(f"{req.name}{req.specifier}", target, dest)
            if wheel is None:
                problems.append(
                    f"{target.machine}: no wheel on PyPI for {req} (needs a compiler, or a "
                    "Debian package)"
                )
                continue
            report.append(f"{target.machine}: {req} -> {wheel.name}")
            for dep in _wheel_requires(wheel):
                if dep.marker is None or dep.marker.evaluate(env):
                    queue.append(dep)
    for name, reqs in seen.items():
        if name not in target.debian:
            continue
        package, version = target.debian[name]
        bad = [str(r) for r in reqs if not r.specifier.contains(Version(version), prereleases=True)]
        if bad:
            problems.append(
                f"{target.machine}: Debian {package} {version} does not satisfy {', '.join(bad)}"
            )
        else:
            report.append(f"{target.machine}: {name} -> Debian {package} {version} (apt)")
    return report, problems


def main(argv: list[str] | None = None) -> int:
    """Check each requirement file on each target; print the resolution; exit 1 on a gap."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--target", choices=sorted(TARGETS), action="append")
    args = parser.parse_args(argv)
    files = args.files or [REPO / "requirements" / "agent.txt"]
    failed = False
    for path in files:
        for name in args.target or sorted(TARGETS):
            report, problems = check(read_requirements(path), TARGETS[name])
            print(f"# {path.relative_to(REPO) if path.is_relative_to(REPO) else path} on {name}")
            for line in report:
                print(f"  ok  {line}")
            for line in problems:
                print(f"  MISSING  {line}")
            failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

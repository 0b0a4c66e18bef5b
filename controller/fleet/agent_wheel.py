"""The agent as a wheel of its own (`edgefleet_agent-VERSION-py3-none-any.whl`) for device bundles.

edgefleet is not on PyPI and its full install is the controller (TensorFlow and all), so a
device gets this wheel in its bundle: only the `agent` package, the `edgefleet-agent` script,
and pyproject's `agent` extra as its requirements, environment markers included (armv7l gets
tflite-runtime 2.14 and cryptography<46). `pip install` of the one file installs everything.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import re
import sys
import zipfile
from pathlib import Path

import agent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["WHEEL_DIST", "agent_requirements", "build_agent_wheel", "wheel_name"]

WHEEL_DIST = "edgefleet_agent"
# Zip entries get this fixed timestamp (the earliest zip can store): the same code always makes
# the same wheel bytes, so two bundles of one version carry an identical file.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Files of the agent package that ship: code, the systemd unit, nothing generated.
_SHIPPED_SUFFIXES = (".py", ".service", ".txt")
_EXTRA_MARKER = re.compile(r"""\s*(?:and\s+)?extra\s*==\s*["']agent["']""")


def wheel_name(version: str | None = None) -> str:
    """The wheel's file name for `version` (default: the agent's)."""
    return f"{WHEEL_DIST}-{version or agent.__version__}-py3-none-any.whl"


def agent_requirements() -> list[str]:
    """pyproject's `agent` extra: from the source tree's pyproject.toml, else the installed dist."""
    pyproject = Path(agent.__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        data = tomllib.loads(pyproject.read_text())
        return list(data["project"]["optional-dependencies"]["agent"])
    requires = importlib.metadata.requires("edgefleet") or []
    out = []
    for line in requires:
        if not _EXTRA_MARKER.search(line):
            continue
        text = _EXTRA_MARKER.sub("", line).strip()
        out.append(text[:-1].strip() if text.endswith(";") else text)
    return out


def _record_hash(data: bytes) -> str:
    """RECORD's ``sha256=<urlsafe b64, no padding>`` digest of `data`."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def _metadata(version: str, requirements: list[str]) -> str:
    """The wheel's METADATA (core metadata 2.1)."""
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {WHEEL_DIST.replace('_', '-')}",
        f"Version: {version}",
        "Summary: edgefleet on-device agent (built by `edgefleet devices register`)",
        "Requires-Python: >=3.10",
        *(f"Requires-Dist: {r}" for r in requirements),
    ]
    return "\n".join(lines) + "\n"


def build_agent_wheel(out_dir: Path) -> Path:
    """Write the agent wheel into `out_dir` (0600, like the rest of a bundle); its path."""
    version = agent.__version__
    package = Path(agent.__file__).resolve().parent
    dist_info = f"{WHEEL_DIST}-{version}.dist-info"
    files: dict[str, bytes] = {}
    for path in sorted(package.rglob("*")):
        if path.is_file() and path.suffix in _SHIPPED_SUFFIXES and "__pycache__" not in path.parts:
            files[f"agent/{path.relative_to(package).as_posix()}"] = path.read_bytes()
    files[f"{dist_info}/METADATA"] = _metadata(version, agent_requirements()).encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: edgefleet\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{dist_info}/entry_points.txt"] = (
        b"[console_scripts]\nedgefleet-agent = agent.cli:console_main\n"
    )
    record = [f"{name},{_record_hash(data)},{len(data)}" for name, data in files.items()]
    files[f"{dist_info}/RECORD"] = ("\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / wheel_name(version)
    partial = target.with_suffix(".part")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    partial.chmod(0o600)
    partial.replace(target)
    return target

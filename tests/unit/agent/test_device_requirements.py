"""The device requirement files select an installable, signing-capable stack per architecture
(markers evaluated as on the device), and pyproject's `agent` extra says the same thing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.paths import REPO_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from scripts.check_device_wheels import DEBIAN_ARMV7L, TARGETS, read_requirements

pytestmark = [pytest.mark.agent]

REPO = REPO_ROOT
AGENT = REPO / "requirements" / "agent.txt"
TFLITE214 = REPO / "requirements" / "agent-tflite214.txt"


def _selected(path: Path, machine: str) -> dict[str, str]:
    """name -> specifier of what pip would install from `path` on a bookworm `machine`."""
    env = TARGETS[machine].environment()
    return {
        r.name: str(r.specifier)
        for r in read_requirements(path)
        if r.marker is None or r.marker.evaluate(env)
    }


def test_armv7l_gets_the_tflite214_stack_with_signing_that_needs_no_compiler() -> None:
    chosen = _selected(AGENT, "armv7l")
    assert chosen["tflite-runtime"] == "==2.14.0" and "ai-edge-litert" not in chosen
    assert Requirement(f"numpy{chosen['numpy']}").specifier.contains("1.24.2")
    assert not Requirement(f"numpy{chosen['numpy']}").specifier.contains("2.0.0")
    crypto = Requirement(f"cryptography{chosen['cryptography']}").specifier
    assert crypto.contains("45.0.7"), "the last release before cffi>=2 (no armv7l wheel)"
    assert not crypto.contains("46.0.0")


def test_aarch64_gets_litert_and_current_cryptography() -> None:
    chosen = _selected(AGENT, "aarch64")
    assert "ai-edge-litert" in chosen and "tflite-runtime" not in chosen
    assert Requirement(f"cryptography{chosen['cryptography']}").specifier.contains("51.0.1")


@pytest.mark.parametrize("machine", ["aarch64", "armv7l"])
def test_tflite214_stack_signs_too(machine: str) -> None:
    chosen = _selected(TFLITE214, machine)
    assert "cryptography" in chosen, "without it tflite-runtime 2.14 devices run unsigned"
    assert chosen["numpy"] == "<2"


def test_pyproject_agent_extra_matches_requirements_agent_txt() -> None:
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["agent"]
    assert {str(Requirement(r)) for r in extra} == {str(r) for r in read_requirements(AGENT)}


def test_debian_fallbacks_satisfy_the_armv7l_pins() -> None:
    chosen = _selected(AGENT, "armv7l")
    for name, (_, version) in DEBIAN_ARMV7L.items():
        if name in chosen:
            assert Requirement(f"{name}{chosen[name]}").specifier.contains(version), name

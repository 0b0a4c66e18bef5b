"""The profile schema as pydantic models: one-line errors naming file and key, the JSON Schema."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firmware_profiles import PROFILE_DIR, Profile, ProfileError, load, load_all, load_file
from firmware_profiles.schema import Accelerator, Match, build, json_schema
from tests.paths import REPO_ROOT

REPO = REPO_ROOT


@pytest.fixture(autouse=True)
def _no_user_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's own EDGEFLEET_PROFILES out of every test."""
    monkeypatch.delenv("EDGEFLEET_PROFILES", raising=False)


def _inline(value: Any) -> str:
    """A value as inline TOML (JSON scalars are TOML scalars; tables become `{k = v}`)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return "true" if value is True else "false" if value is False else json.dumps(value)


def _profile_dict(base: str = "imx93") -> dict[str, Any]:
    """A built-in profile as a plain dict to break in a test."""
    return load(base).to_dict()


def _write(directory: Path, data: dict[str, Any]) -> Path:
    """Write a profile dict as `<id>.toml`, every table inline."""
    path = directory / f"{data['id']}.toml"
    path.write_text("".join(f"{k} = {_inline(v)}\n" for k, v in data.items()), encoding="utf-8")
    return path


def _error(tmp_path: Path, data: dict[str, Any]) -> str:
    """Load the profile dict from a file; return the one-line error, checked to name the file."""
    path = _write(tmp_path, data)
    with pytest.raises(ProfileError) as info:
        load_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, f"not one line: {message!r}"
    assert "pydantic" not in message and "validation error" not in message, message
    return message


@pytest.mark.parametrize(
    ("where", "dotted"),
    [
        (("match",), "match.colour"),
        (("compiler",), "compiler.colour"),
        (("accelerators", 0), "accelerators[0].colour"),
        (("sources",), "sources.colour"),
    ],
)
def test_unknown_key_is_refused_naming_it(
    tmp_path: Path, where: tuple[str | int, ...], dotted: str
) -> None:
    """A key the schema does not know is an error that names it, at any depth."""
    data = _profile_dict()
    table: Any = data
    for step in where:
        table = table[step]
    table["colour"] = "red"
    message = _error(tmp_path, data)
    assert f"'{dotted}'" in message


def test_path_is_not_a_toml_key(tmp_path: Path) -> None:
    """`path` is where the loader found the file: a file cannot set it."""
    data = _profile_dict()
    data["path"] = "/etc/passwd"
    assert "unknown key 'path'" in _error(tmp_path, data)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("memory", "ram_mb", "4 GB", "'memory.ram_mb' must be an integer, got '4 GB'"),
        ("memory", "ram_mb", 2048.0, "'memory.ram_mb' must be an integer, got 2048.0"),
        ("power", "idle_w", "2 W", "'power.idle_w' must be a number, got '2 W'"),
        ("power", "idle_w", True, "'power.idle_w' must be a number, got True"),
        (None, "runs_agent", "yes", "'runs_agent' must be true or false, got 'yes'"),
        ("cpu", "description", 4, "'cpu.description' must be a non-empty string, got 4"),
        ("cpu", "description", "  ", "'cpu.description' must be a non-empty string"),
        ("cpu", "cores", 0, "'cpu.cores' must be >= 1, got 0"),
        ("budgets", "latency_ms", 0, "'budgets.latency_ms' must be > 0, got 0"),
        (None, "cpu", 3, "'cpu' must be a table, got 3"),
        ("quantization", "allowed", "int8", "'quantization.allowed' must be an array"),
        ("quantization", "allowed", [], "'quantization.allowed' must not be empty"),
    ],
)
def test_wrong_type_or_value_names_the_path(
    tmp_path: Path, section: str | None, key: str, value: object, expected: str
) -> None:
    """A wrong type or an out-of-range value is one line naming the dotted key and the value."""
    data = _profile_dict()
    (data if section is None else data[section])[key] = value
    assert expected in _error(tmp_path, data)


def test_errors_inside_arrays_name_the_index(tmp_path: Path) -> None:
    """Items of arrays and tables of arrays are named by index; enums list what is allowed."""
    data = _profile_dict()
    data["accelerators"][0]["kind"] = "fpga"
    message = _error(tmp_path, data)
    assert "'accelerators[0].kind' must be one of npu, gpu, tpu, dsp; got 'fpga'" in message
    data = _profile_dict("rpi4")
    data["match"]["cpu_parts"] = ["0xd08", "D08"]
    message = _error(tmp_path, data)
    assert "'match.cpu_parts[1]' must be lowercase hex like 0xd08, got 'D08'" in message


def test_compiler_options_name_the_option(tmp_path: Path) -> None:
    """An option value of the wrong type names the option; booleans are not integers."""
    data = _profile_dict()
    data["compiler"]["options"]["memory_mode"] = True
    message = _error(tmp_path, data)
    assert "'compiler.options.memory_mode' must be a string or an integer, got True" in message


def test_cross_section_rules_name_the_key(tmp_path: Path) -> None:
    """Rules across sections name the key to change, as the checks by hand did."""
    data = _profile_dict()
    data["accelerators"] = []
    message = _error(tmp_path, data)
    assert "'compiler.kind' 'vela' needs an accelerator with delegate 'ethos-u'" in message
    data = _profile_dict()
    data["accelerators"].append(dict(data["accelerators"][0]))
    assert "'accelerators' names must be unique" in _error(tmp_path, data)
    data = _profile_dict()
    data["cpu"]["big_cores"] = data["cpu"]["cores"] + 1
    assert "'cpu.big_cores' must be <= cpu.cores" in _error(tmp_path, data)


def test_several_problems_report_the_first_and_count_the_rest(tmp_path: Path) -> None:
    """Pydantic finds every problem; the user reads the first, in file order, and a count."""
    data = _profile_dict()
    data["name"] = 1
    data["cpu"]["cores"] = "x"
    data["power"]["idle_w"] = -1
    message = _error(tmp_path, data)
    assert message.endswith("'name' must be a non-empty string, got 1 (and 2 more problems)")


def test_every_shipped_profile_loads_and_round_trips() -> None:
    """Each TOML file in firmware_profiles/ validates, and to_dict rebuilds an equal profile."""
    files = sorted(PROFILE_DIR.glob("*.toml"))
    assert len(files) >= 10
    for path in files:
        profile = load_file(path)
        assert profile.id == path.stem
        assert build(Profile, json.loads(json.dumps(profile.to_dict()))) == profile


def test_sections_built_in_code_are_validated_and_frozen() -> None:
    """Objects built in code (or by dataclasses.replace) are validated: one-line ProfileError."""
    profile = load("coral-dev-board")
    with pytest.raises(ProfileError, match=r"^'accelerators\.kind' must be one of npu"):
        Accelerator("Edge TPU", "fpga", "edgetpu")
    with pytest.raises(ProfileError, match=r"^'match\.cpu_parts\[0\]' must be lowercase hex"):
        dataclasses.replace(profile.identity, cpu_parts=["D08"])
    with pytest.raises(ProfileError, match=r"'compiler\.kind' 'edgetpu' needs an accelerator"):
        dataclasses.replace(profile, accelerators=())
    with pytest.raises(ProfileError, match=r"^unknown key 'match\.colour'"):
        Match(colour=("red",))  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.identity.boards = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        profile.sources["power"] = "a guess"  # type: ignore[index]
    replaced = dataclasses.replace(profile, name="Coral, ours")
    assert replaced.path == profile.path and replaced.name == "Coral, ours"


def test_json_schema_documents_every_key() -> None:
    """Every key of every section has a description, and the schema refuses unknown keys."""
    schema = json_schema()
    tables = [schema, *schema["$defs"].values()]
    for table in tables:
        assert table["additionalProperties"] is False, table["title"]
        for key, prop in table["properties"].items():
            assert prop.get("description") or "$ref" in prop, f"{table['title']}.{key}"
    assert "class" in schema["properties"] and "device_class" not in schema["properties"]
    assert "path" not in schema["properties"]
    assert set(schema["required"]) >= {"id", "class", "cpu", "sources"}


def test_agent_imports_no_pydantic() -> None:
    """Every agent module imports without pydantic or the profile models (a device's RSS)."""
    code = (
        "import importlib, pkgutil, sys, agent\n"
        "for m in pkgutil.walk_packages(agent.__path__, 'agent.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in "
        "('pydantic', 'pydantic_core', 'firmware_profiles'))\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_load_all_profiles_are_profiles() -> None:
    """load_all still returns the Profile class callers use (attribute names unchanged)."""
    for profile in load_all().values():
        assert isinstance(profile, Profile)
        assert profile.device_class in ("phone", "sbc", "npu-board", "mcu-npu", "x86")
        assert isinstance(profile.identity, Match)

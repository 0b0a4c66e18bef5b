"""Tests for firmware_profiles: built-in profiles, schema validation, directories and match()."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

import firmware_profiles
from firmware_profiles import (
    ENV_VAR,
    PROFILE_DIR,
    Profile,
    ProfileError,
    Runtime,
    load,
    load_all,
    load_file,
    match,
)

BUILTIN_STEMS = sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))
REQUIRED_IDS = {
    "rpi4",
    "rpi5",
    "jetson-orin-nano-cpu",
    "coral-dev-board",
    "imx8mp",
    "imx93",
    "corstone-300-u55",
    "pixel-8",
    "galaxy-s24-snapdragon",
    "x86-64-gateway",
}


@pytest.fixture(autouse=True)
def _no_user_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's own EDGEFLEET_PROFILES out of every test."""
    monkeypatch.delenv(ENV_VAR, raising=False)


def _toml_value(value: Any) -> str:
    """Render a scalar or a list of scalars as TOML (JSON strings are valid TOML strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r}")


def _toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for a profile dict: scalars, tables, a nested table, table arrays."""

    def is_table_array(value: object) -> bool:
        """True for a list of tables, written as [[key]] blocks."""
        return isinstance(value, list) and any(isinstance(i, dict) for i in value)

    lines = [
        f"{k} = {_toml_value(v)}"
        for k, v in data.items()
        if not isinstance(v, dict) and not is_table_array(v)
    ]
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [
                f"{k} = {_toml_value(v)}" for k, v in value.items() if not isinstance(v, dict)
            ]
            for sub, table in value.items():
                if isinstance(table, dict):
                    lines.append(f"[{key}.{sub}]")
                    lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        elif is_table_array(value):
            for item in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def _profile_dict(base: str = "imx93", new_id: str | None = None) -> dict[str, Any]:
    """A built-in profile as a plain dict, optionally renamed, to mutate in a test."""
    data = load(base).to_dict()
    if new_id is not None:
        data["id"] = new_id
    return data


def _write(directory: Path, data: dict[str, Any], stem: str | None = None) -> Path:
    """Write a profile dict as `<stem or id>.toml` in `directory`."""
    path = directory / f"{stem or data['id']}.toml"
    path.write_text(_toml(data), encoding="utf-8")
    return path


def _load_error(tmp_path: Path, data: dict[str, Any], stem: str | None = None) -> str:
    """Write the profile and return the ProfileError message that loading it raises."""
    path = _write(tmp_path, data, stem)
    with pytest.raises(ProfileError) as info:
        load_file(path)
    message = str(info.value)
    assert str(path) in message, f"error does not name the file: {message}"
    return message


# --- the built-in profiles -------------------------------------------------------------------


@pytest.mark.parametrize("stem", BUILTIN_STEMS)
def test_builtin_profile_loads_with_id_equal_to_stem(stem: str) -> None:
    """Every shipped TOML file is a valid profile whose id is its file name."""
    profile = load(stem)
    assert isinstance(profile, Profile)
    assert profile.id == stem
    assert profile.path == str(PROFILE_DIR / f"{stem}.toml")


@pytest.mark.parametrize("stem", BUILTIN_STEMS)
def test_builtin_profile_cites_sources(stem: str) -> None:
    """Each profile says where its cpu, memory, power and runtime figures come from."""
    sources = load(stem).sources
    for key in ("cpu", "memory", "power", "runtime"):
        assert len(sources.get(key, "").strip()) > 10, f"{stem}: weak source for {key}"


def test_builtin_ids_unique_and_required_present() -> None:
    """load_all returns one profile per file, keyed by id, including every required class."""
    profiles = load_all()
    assert list(profiles) == BUILTIN_STEMS
    assert set(profiles) >= REQUIRED_IDS
    assert any(p.cpu.arch == "x86_64" for p in profiles.values())
    configs = [str(p.compiler.options.get("accelerator_config", "")) for p in profiles.values()]
    assert any(c.startswith("ethos-u85") for c in configs)


def test_microcontrollers_run_no_agent_and_use_vela() -> None:
    """MCU profiles carry artifacts only: no agent, tflite-micro, a Vela target."""
    mcus = [p for p in load_all().values() if p.device_class == "mcu-npu"]
    assert len(mcus) >= 2
    for profile in mcus:
        assert profile.runs_agent is False
        assert profile.runtime.name == "tflite-micro"
        assert profile.compiler.kind == "vela"


def test_to_dict_is_json_with_schema_keys_and_round_trips() -> None:
    """to_dict uses TOML key names, serializes to JSON and rebuilds an equal Profile."""
    for profile in load_all().values():
        data = profile.to_dict()
        assert data["class"] == profile.device_class and "device_class" not in data
        assert "path" not in data
        json.dumps(data)
        rebuilt = firmware_profiles.schema.build(Profile, json.loads(json.dumps(data)))
        assert rebuilt == profile


def test_profile_is_frozen_and_hashable() -> None:
    """Profiles cannot be changed after loading and can be used in sets."""
    profile = load("imx93")
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.id = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        profile.compiler.options["accelerator_config"] = "ethos-u55-32"  # type: ignore[index]
    assert len({profile, load("imx93")}) == 1


def test_profile_validates_itself_when_built_directly() -> None:
    """A Profile or section built in code is validated by __post_init__, not only by the loader."""
    profile = load("rpi4")
    with pytest.raises(ProfileError, match=r"'class' must be one of .*phone"):
        dataclasses.replace(profile, device_class="laptop")
    with pytest.raises(ProfileError, match=r"memory\.model_ram_budget_mb"):
        dataclasses.replace(profile.memory, model_ram_budget_mb=profile.memory.ram_mb + 1)
    assert issubclass(ProfileError, ValueError)


def test_runtime_version_tuple_and_power_estimate() -> None:
    """Helpers other modules use: numeric runtime version and the linear power model."""
    rpi4 = load("rpi4")
    assert rpi4.runtime.version_tuple == (2, 14, 0)
    assert Runtime("tflite-runtime", "2.5.0.post1").version_tuple == (2, 5, 0)
    assert Runtime("tflite-micro", "0.dev20261023182759").version_tuple == (0,)
    with pytest.raises(ProfileError, match=r"'runtime\.version'"):
        Runtime("tflite-runtime", "latest")
    assert rpi4.power.estimate_w(4) == pytest.approx(2.7 + 4 * 0.925)
    assert load("coral-dev-board").power.estimate_w(0, accelerator_busy=2.0) == pytest.approx(5.0)


@pytest.mark.skipif(importlib.util.find_spec("ethosu") is None, reason="ethos-u-vela not installed")
def test_vela_options_accepted_by_installed_vela() -> None:
    """Every Vela profile's accelerator, config file, system config and memory mode load in Vela."""
    from ethosu.vela import architecture_features as af

    vela_profiles = [p for p in load_all().values() if p.compiler.kind == "vela"]
    assert len(vela_profiles) >= 3
    for profile in vela_profiles:
        options = profile.compiler.options
        config = os.path.join(af.CONFIG_FILES_PATH, str(options["config"]))
        arch = af.ArchitectureFeatures(
            vela_config_files=[config],
            accelerator_config=str(options["accelerator_config"]),
            system_config=str(options["system_config"]),
            memory_mode=str(options["memory_mode"]),
            max_blockdep=af.ArchitectureFeatures.MAX_BLOCKDEP,
            verbose_config=False,
            arena_cache_size=None,
        )
        assert arch.accelerator_config.value == options["accelerator_config"]


# --- validation errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "dotted"),
    [(None, "colour"), ("cpu", "cpu.colour"), ("compiler", "compiler.colour")],
)
def test_unknown_key_names_file_and_dotted_key(
    tmp_path: Path, section: str | None, dotted: str
) -> None:
    """A typo anywhere is an error naming the file and the dotted key."""
    data = _profile_dict()
    (data if section is None else data[section])["colour"] = "red"
    assert f"unknown key '{dotted}'" in _load_error(tmp_path, data)


def test_unknown_key_in_accelerator_names_index(tmp_path: Path) -> None:
    """Unknown keys inside [[accelerators]] say which entry."""
    data = _profile_dict()
    data["accelerators"][0]["tops"] = 0.5
    assert "unknown key 'accelerators[0].tops'" in _load_error(tmp_path, data)


@pytest.mark.parametrize(("section", "key"), [("memory", "ram_mb"), (None, "power"), (None, "id")])
def test_missing_key_names_file_and_key(tmp_path: Path, section: str | None, key: str) -> None:
    """Leaving out a required key or section is an error naming both."""
    data = _profile_dict()
    del (data if section is None else data[section])[key]
    dotted = key if section is None else f"{section}.{key}"
    assert f"missing required key '{dotted}'" in _load_error(tmp_path, data, stem="imx93")


def test_bad_enum_lists_allowed_values(tmp_path: Path) -> None:
    """A value outside an enum names the key and every allowed value."""
    data = _profile_dict()
    data["runtime"]["name"] = "onnxruntime"
    message = _load_error(tmp_path, data)
    assert "'runtime.name'" in message
    for allowed in ("tflite-runtime", "ai-edge-litert", "tflite-micro", "android-litert"):
        assert allowed in message


def test_wrong_type_names_key(tmp_path: Path) -> None:
    """A string where an integer belongs is rejected with the key; bools are not integers."""
    data = _profile_dict()
    data["cpu"]["cores"] = "two"
    assert "'cpu.cores' must be an integer" in _load_error(tmp_path, data)
    data["cpu"]["cores"] = True
    assert "'cpu.cores' must be an integer" in _load_error(tmp_path, data)


def test_preferred_must_be_allowed(tmp_path: Path) -> None:
    """The preferred recipe has to be one of the allowed ones."""
    data = _profile_dict()
    data["quantization"]["preferred"] = "fp16"
    message = _load_error(tmp_path, data)
    assert "'quantization.preferred' must be one of quantization.allowed" in message


def test_vela_requires_accelerator_config(tmp_path: Path) -> None:
    """Vela cannot compile without knowing the Ethos-U configuration."""
    data = _profile_dict()
    del data["compiler"]["options"]["accelerator_config"]
    assert "'compiler.options.accelerator_config' is required" in _load_error(tmp_path, data)


def test_vela_accelerator_config_must_exist(tmp_path: Path) -> None:
    """An accelerator_config Vela does not know is rejected with the known ones."""
    data = _profile_dict()
    data["compiler"]["options"]["accelerator_config"] = "ethos-u66-256"
    message = _load_error(tmp_path, data)
    assert "'compiler.options.accelerator_config'" in message and "ethos-u65-256" in message


def test_id_must_equal_file_stem(tmp_path: Path) -> None:
    """A file whose id differs from its name is rejected: ids are looked up by file name."""
    data = _profile_dict(new_id="my-board")
    assert "'id' must equal the file name stem 'other'" in _load_error(tmp_path, data, "other")


def test_mcu_cannot_run_agent(tmp_path: Path) -> None:
    """Microcontroller profiles must say runs_agent = false."""
    data = _profile_dict("corstone-300-u55")
    data["runs_agent"] = True
    assert "'runs_agent' must be false" in _load_error(tmp_path, data)


def test_required_source_missing(tmp_path: Path) -> None:
    """A profile without a source for its power figures is rejected."""
    data = _profile_dict()
    del data["sources"]["power"]
    assert "'sources.power' is required" in _load_error(tmp_path, data)


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    """A syntax error is reported as a ProfileError with the file, not a raw TOMLDecodeError."""
    path = tmp_path / "broken.toml"
    path.write_text('id = "broken\n', encoding="utf-8")
    with pytest.raises(ProfileError, match=r"broken\.toml: invalid TOML"):
        load_file(path)


# --- directories, overrides and lookup -------------------------------------------------------


def test_env_dir_adds_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Profiles in $EDGEFLEET_PROFILES are added, and replace built-ins with the same id."""
    _write(tmp_path, _profile_dict("imx93", new_id="my-board"))
    override = _profile_dict("rpi4")
    override["name"] = "Pi 4 as deployed in our factory"
    _write(tmp_path, override)
    monkeypatch.setenv(ENV_VAR, os.pathsep.join([str(tmp_path), ""]))

    profiles = load_all()
    assert "my-board" in profiles and "imx93" in profiles
    assert profiles["rpi4"].name == "Pi 4 as deployed in our factory"
    assert profiles["rpi4"].path == str(tmp_path / "rpi4.toml")
    assert load("rpi4").name == "Pi 4 as deployed in our factory"
    assert load("my-board").id == "my-board"


def test_extra_dirs_take_priority_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """extra_dirs come last, so they override both built-ins and $EDGEFLEET_PROFILES."""
    env_dir, extra_dir = tmp_path / "env", tmp_path / "extra"
    env_dir.mkdir()
    extra_dir.mkdir()
    for directory in (env_dir, extra_dir):
        data = _profile_dict("rpi4")
        data["name"] = f"from {directory.name}"
        _write(directory, data)
    monkeypatch.setenv(ENV_VAR, str(env_dir))
    assert load("rpi4", extra_dirs=[extra_dir]).name == "from extra"
    assert load_all(extra_dirs=[extra_dir])["rpi4"].name == "from extra"
    assert load("rpi4").name == "from env"


def test_missing_env_dir_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in $EDGEFLEET_PROFILES must not silently drop the user's profiles."""
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nope"))
    with pytest.raises(ProfileError, match=r"nope.*EDGEFLEET_PROFILES"):
        load_all()


def test_broken_user_profile_fails_load_all(tmp_path: Path) -> None:
    """load_all reports a bad file in a user directory instead of skipping it."""
    data = _profile_dict(new_id="bad")
    data["cpu"]["arch"] = "mips"
    _write(tmp_path, data)
    with pytest.raises(ProfileError, match=r"bad\.toml: 'cpu\.arch' must be one of"):
        load_all(extra_dirs=[tmp_path])


@pytest.mark.parametrize("profile_id", ["rpi9", "../rpi4", "RPI4", ""])
def test_unknown_id_lists_known_ids(profile_id: str) -> None:
    """An unknown (or path-like) id is a ProfileError naming it and listing the known ids."""
    with pytest.raises(ProfileError) as info:
        load(profile_id)
    message = str(info.value)
    assert repr(profile_id) in message
    for known in ("rpi4", "imx93", "x86-64-gateway"):
        assert known in message
    assert isinstance(info.value, ValueError)


# --- match() ---------------------------------------------------------------------------------


def _facts(**overrides: object) -> dict[str, object]:
    """A hello's facts for a 4-core 4 GB aarch64 board that declares nothing."""
    facts: dict[str, object] = {
        "arch": "aarch64",
        "cpu_count": 4,
        "ram_mb": 4096,
        "declared_profile": None,
        "delegates": [],
    }
    facts.update(overrides)
    return facts


@pytest.fixture(scope="module")
def builtins() -> dict[str, Profile]:
    """The built-in profiles, loaded once for the match tests."""
    return load_all()


def test_match_declared_profile(builtins: dict[str, Profile]) -> None:
    """A device that declares a known profile gets it, whatever its hardware says."""
    facts = _facts(arch="x86_64", declared_profile="imx93")
    assert match(facts, builtins) == ("imx93", "declared by device")


def test_match_declared_unknown(builtins: dict[str, Profile]) -> None:
    """Declaring an unknown profile is not silently replaced by a hardware guess."""
    profile_id, reason = match(_facts(declared_profile="rpi9"), builtins)
    assert profile_id is None
    assert "'rpi9'" in reason and "rpi4" in reason


@pytest.mark.parametrize("ram_mb", [4096, 3796])
def test_match_by_hardware_picks_rpi4(builtins: dict[str, Profile], ram_mb: int) -> None:
    """aarch64 with 4 cores and about 4 GB (nominal or as the OS reports it) is a Pi 4."""
    profile_id, reason = match(_facts(ram_mb=ram_mb), builtins)
    assert profile_id == "rpi4"
    assert "rpi4" in reason and f"{ram_mb} MB" in reason and "runner-up" in reason


def test_match_x86_64(builtins: dict[str, Profile]) -> None:
    """An x86_64 device (also reported as AMD64) matches the x86 gateway."""
    assert match(_facts(arch="x86_64", cpu_count=4, ram_mb=7800), builtins)[0] == "x86-64-gateway"
    assert match(_facts(arch="AMD64", cpu_count=8, ram_mb=16384), builtins)[0] == "x86-64-gateway"


def test_match_no_candidate_for_unknown_arch(builtins: dict[str, Profile]) -> None:
    """No profile for riscv64: no id, and the reason names the arch."""
    profile_id, reason = match(_facts(arch="riscv64"), builtins)
    assert profile_id is None
    assert "riscv64" in reason


def test_match_uses_delegates(builtins: dict[str, Profile]) -> None:
    """Reported delegates pick the accelerator board among boards of similar size."""
    assert match(_facts(ram_mb=980, delegates=["edgetpu"]), builtins)[0] == "coral-dev-board"
    assert match(_facts(ram_mb=5900, delegates=["vx"]), builtins)[0] == "imx8mp"
    assert match(_facts(ram_mb=5900), builtins)[0] != "imx8mp"


def test_match_arch_aliases_and_armv7(builtins: dict[str, Profile]) -> None:
    """arm64 means aarch64; a 32-bit Arm board matches the armv7l profile."""
    assert match(_facts(arch="arm64"), builtins)[0] == "rpi4"
    assert match(_facts(arch="armv7l", ram_mb=926), builtins)[0] == "rpi3b-plus"


def test_match_never_picks_microcontrollers(builtins: dict[str, Profile]) -> None:
    """MCU profiles run no agent, so no hello can match them by hardware."""
    profile_id, reason = match(_facts(arch="cortex-m", cpu_count=1, ram_mb=2), builtins)
    assert profile_id is None
    assert "cortex-m" in reason


def test_match_refuses_far_hardware(builtins: dict[str, Profile]) -> None:
    """A 128-core 512 GB aarch64 server is not any edge profile; the reason says so."""
    profile_id, reason = match(_facts(cpu_count=128, ram_mb=524288), builtins)
    assert profile_id is None
    assert "above the limit" in reason


def test_match_loads_builtins_by_default() -> None:
    """Without a profiles argument, match() uses load_all()."""
    assert match(_facts())[0] == "rpi4"

"""Tests for controller/simulate/speed.py: --speed parsing and the per-profile latency factors."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

import firmware_profiles
from controller.cli.simulate import simulate_command
from controller.simulate import (
    NO_SPEED,
    Simulation,
    SimulationError,
    SpeedModel,
    SpeedSpec,
    parse_speed,
    synth_report,
)
from controller.simulate.fallback import requests_in, served_p95
from controller.simulate.speed import THREAD_EXPONENT, recipe_keys


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("rpi4:int8=3.0", SpeedSpec("rpi4", {"int8": 3.0}, "rpi4:int8=3.0")),
        ("rpi4:int8=3,t4=0.5", SpeedSpec("rpi4", {"int8": 3.0, "t4": 0.5}, "rpi4:int8=3,t4=0.5")),
        (
            "pixel-8:int8+pruned50=0.8, fp16=1.5",
            SpeedSpec(
                "pixel-8",
                {"int8+pruned50": 0.8, "fp16": 1.5},
                "pixel-8:int8+pruned50=0.8, fp16=1.5",
            ),
        ),
    ],
)
def test_parse_speed_accepts_the_documented_forms(spec: str, expected: SpeedSpec) -> None:
    """PROFILE:KEY=FACTOR[,KEY=FACTOR...] with recipe and tN keys."""
    assert parse_speed(spec) == expected


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("rpi4", "expected PROFILE:KEY=FACTOR"),
        (":int8=3", "expected PROFILE:KEY=FACTOR"),
        ("rpi4:", "expected PROFILE:KEY=FACTOR"),
        ("rpi4:int8", "'int8' is not KEY=FACTOR"),
        ("rpi4:int8=3,=2", "'=2' is not KEY=FACTOR"),
        ("rpi4:int8=fast", "factor of 'int8' must be a number > 0, got 'fast'"),
        ("rpi4:int8=0", "factor of 'int8' must be a number > 0, got '0'"),
        ("rpi4:fp16=-1", "factor of 'fp16' must be a number > 0"),
        ("rpi4:fp16=inf", "factor of 'fp16' must be a number > 0"),
        ("rpi4:t0=2", "thread key 't0' must be t1..t64"),
        ("rpi4:t65=2", "thread key 't65' must be t1..t64"),
        ("rpi4:int8=2,int8=3", "'int8' given twice"),
        ("rpi4:in t8=2", "Invalid recipe name"),
        ("rp/i4:int8=2", "Invalid profile id"),
    ],
)
def test_parse_speed_rejects_bad_specs_naming_the_bad_part(spec: str, needle: str) -> None:
    """A bad spec raises with the spec itself and its bad part in the message."""
    with pytest.raises(SimulationError) as err:
        parse_speed(spec)
    assert repr(spec) in str(err.value)
    assert needle in str(err.value)


def test_recipe_factor_matches_the_base_recipe_unless_given_explicitly() -> None:
    """int8+pruned50 and dynamic-pt fall back to int8 and dynamic; an explicit key wins."""
    assert recipe_keys("dynamic-pt+pruned50") == ("dynamic-pt+pruned50", "dynamic-pt", "dynamic")
    model = SpeedModel.parse(["rpi4:int8=3,dynamic=2", "rpi4:int8+pruned50=1.5"])
    assert model.recipe_factor("rpi4", "int8") == 3.0
    assert model.recipe_factor("rpi4", "int8+pruned75") == 3.0
    assert model.recipe_factor("rpi4", "int8+pruned50") == 1.5
    assert model.recipe_factor("rpi4", "dynamic-pt") == 2.0
    assert model.recipe_factor("rpi4", "fp16") == 1.0
    assert model.recipe_factor("rpi5", "int8") == 1.0  # another profile is unaffected
    assert NO_SPEED.recipe_factor("rpi4", "int8") == 1.0


def test_thread_factor_defaults_to_a_capped_power_law_and_tN_overrides_it() -> None:
    """No tN: 1/threads**0.7 with threads capped at the cores; tN replaces it for that count."""
    profiles = firmware_profiles.load_all()
    rpi4 = profiles["rpi4"]  # 4 cores
    assert NO_SPEED.thread_factor(rpi4, None) == 1.0
    assert NO_SPEED.thread_factor(rpi4, 1) == 1.0
    assert NO_SPEED.thread_factor(rpi4, 2) == pytest.approx(2**-THREAD_EXPONENT)
    assert NO_SPEED.thread_factor(rpi4, 8) == NO_SPEED.thread_factor(rpi4, 4)
    model = SpeedModel.parse(["rpi4:t4=0.9,int8=3"])
    assert model.thread_factor(rpi4, 4) == 0.9
    assert model.thread_factor(rpi4, 2) == pytest.approx(2**-THREAD_EXPONENT)
    assert model.factor(rpi4, "int8", 4) == pytest.approx(2.7)
    assert model.factor(profiles["rpi5"], "int8", 4) == pytest.approx(4**-THREAD_EXPONENT)


def test_report_threads_drive_power_and_energy() -> None:
    """The report names its threads; the power estimate keeps that many cores (≤ cores) busy."""
    rpi4 = firmware_profiles.load("rpi4")
    one = synth_report(rpi4, "a" * 64, 1 << 20, 10.0, 50.0, runs=10, warmup=1)
    four = synth_report(rpi4, "a" * 64, 1 << 20, 10.0, 50.0, runs=10, warmup=1, threads=4)
    many = synth_report(rpi4, "a" * 64, 1 << 20, 10.0, 50.0, runs=10, warmup=1, threads=16)
    assert (one.threads, four.threads, many.threads) == (1, 4, 16)
    assert one.power_w == pytest.approx(rpi4.power.estimate_w(busy_cores=1), abs=1e-3)
    assert four.power_w == pytest.approx(rpi4.power.estimate_w(busy_cores=4), abs=1e-3)
    assert many.power_w == four.power_w
    assert four.energy_mj_per_inference > one.energy_mj_per_inference  # same p50: more watts


def test_served_p95_and_request_count_follow_the_telemetry_model() -> None:
    """p95 of the log-normal served latencies; requests capped by one core's capacity."""
    assert served_p95(1.0) == pytest.approx(1.3895, abs=1e-3)
    assert requests_in(0.4, 30.0, 1.0) == 12
    assert requests_in(0.4, 30.0, 100.0) == 3  # 90 % of 400 ms holds 3 requests of 100 ms


def test_simulation_rejects_a_speed_spec_for_an_unknown_profile() -> None:
    """The profile of a --speed must exist; the error names the spec."""
    with pytest.raises(SimulationError, match=r"bad --speed 'nope:int8=2': unknown profile"):
        Simulation("mqtt://127.0.0.1:1", 2, speed=SpeedModel.parse(["nope:int8=2"]))


def test_cli_rejects_a_bad_speed_spec() -> None:
    """A bad --speed exits 2 naming the spec and its bad part, before any connection."""
    app = typer.Typer()
    app.command("simulate")(simulate_command)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["simulate", "--devices", "2", "--speed", "rpi4:int8=x"])
    assert result.exit_code == 2
    assert "'rpi4:int8=x'" in result.output and "factor of 'int8'" in result.output

"""Closed loop on a real SQLite file: candidates registered, trialed, decided and explained.

Devices are played by feeding Fleet the events agents send (as in test_rollout.py), with chosen
on-device numbers, so the expected winner is known before the rollout starts.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from agent.protocol import BenchmarkReport, Environment, Event, Status
from controller.cli.main import app
from controller.fleet.registry import Fleet, FleetError
from controller.fleet.rollout.decide import Candidate, Trial, decide
from controller.fleet.rollout.outliers import classify, environment_anomaly, robust_z
from controller.fleet.rollout.policy import Gate, Policy, PolicyError, Threshold, parse_waves
from tests.closed_loop_helpers import write_candidates_dir
from tests.paths import TEST_DATA

DATA = TEST_DATA
OLD = DATA / "tiny_int16x8.tflite"


def bench(
    sha: str, p95: float, rss: float = 50.0, energy: float = 1.0, env: Environment | None = None
) -> BenchmarkReport:
    """A benchmark report with the given p95, peak RSS, energy and environment."""
    return BenchmarkReport(
        model_sha256=sha, runtime="litert", runtime_version="2.3.0", threads=1, runs=50,
        warmup=5, init_ms=1.0, first_inference_ms=1.0, p50_ms=p95 * 0.8, p90_ms=p95 * 0.95,
        p95_ms=p95, p99_ms=p95 * 1.1, mean_ms=p95 * 0.85, std_ms=0.1, min_ms=p95 * 0.5,
        max_ms=p95 * 1.2, peak_rss_mb=rss, rss_mb=rss, power_w=3.0,
        energy_mj_per_inference=energy, power_source="estimated:profile", power_estimated=True,
        environment=env,
    )  # fmt: skip


# ----------------------------------------------------------------------------- decide()
def _cand(rank: int, p95: float, rss: float, energy: float, drop: float = 0.0, **kw: Any) -> Any:
    """A candidate measured once on canary c1."""
    result = {
        "p95_ms": p95,
        "p50_ms": p95 * 0.8,
        "peak_rss_mb": rss,
        "energy_mj_per_inference": energy,
    }
    trials = kw.pop("trials", None) or [Trial("c1", "measured", result)]
    return Candidate(
        rank, f"{rank:064x}", kw.pop("recipe", "int8"), kw.pop("threads", 1),
        {"accuracy_drop_points": drop}, trials,
    )  # fmt: skip


def test_pareto_front_objective_and_reasons() -> None:
    cands = [
        _cand(1, p95=10.0, rss=40, energy=2.0),  # fastest, more energy
        _cand(2, p95=14.0, rss=30, energy=1.0),  # on the front: less energy and memory
        _cand(3, p95=15.0, rss=45, energy=2.5),  # dominated by 1
        _cand(4, p95=9.0, rss=35, energy=0.9, drop=3.0),  # over the accuracy budget
    ]
    result = decide(cands, Policy(candidates=4, max_accuracy_drop=1.0))
    verdicts = {c["rank"]: c["verdict"] for c in result["candidates"]}
    assert result["winner"] == 1 and result["front"] == [1, 2]
    assert verdicts == {1: "won", 2: "front", 3: "dominated", 4: "accuracy"}
    why = {c["rank"]: c["why"] for c in result["candidates"]}
    assert why[3].startswith("dominated by #1 int8 t1")
    assert "accuracy drop 3.00 points over the budget of 1" in why[4]
    # The same measurements under another objective pick the other end of the front.
    assert (
        decide(cands, Policy(candidates=4, objective="energy", max_accuracy_drop=1))["winner"] == 2
    )
    # Without the accuracy budget, #4 dominates everything on latency, memory and energy; on
    # the accuracy objective #1 and #2 (drop 0) tie and the other metrics pick #1.
    assert decide(cands, Policy(candidates=4))["winner"] == 4
    assert decide(cands, Policy(candidates=4, objective="accuracy"))["winner"] == 1


def test_gates_failures_and_unmeasured_candidates_are_not_eligible() -> None:
    def on_both(p95: float, rss: float) -> list[Trial]:
        """Measured on canaries c1 and c2."""
        result = {"p95_ms": p95, "p50_ms": p95, "peak_rss_mb": rss, "energy_mj_per_inference": 1}
        return [Trial("c1", "measured", result), Trial("c2", "measured", result)]

    failed = _cand(2, 5.0, 30, 1.0, trials=[Trial("c1", "failed", None, "self-test: NaN"),
                                           on_both(5.0, 30)[1]])  # fmt: skip
    timeout = Trial("c2", "failed", None, "timed out after 600 s in state fetching")
    half = _cand(3, 5.0, 30, 1.0, trials=[on_both(5.0, 30)[0], timeout])
    slow = _cand(1, 50.0, 30, 1.0, trials=on_both(50.0, 30))
    ok = _cand(4, 8.0, 80, 1.0, trials=on_both(8.0, 80))
    result = decide([slow, failed, half, ok], Policy(candidates=4, gates=(Gate("p95_ms", 20),)))
    by_rank = {c["rank"]: c for c in result["candidates"]}
    assert result["winner"] == 4
    assert by_rank[1]["verdict"] == "gate" and "p95_ms 50.000 over 20" in by_rank[1]["why"]
    assert by_rank[2]["verdict"] == "failed" and "self-test: NaN" in by_rank[2]["why"]
    assert by_rank[3]["verdict"] == "failed" and "c2" in by_rank[3]["why"]
    assert decide([slow], Policy(candidates=2, gates=(Gate("p95_ms", 20),)))["winner"] is None
    # A canary that measured nothing at all (offline the whole time) is left out, not fatal.
    gone = [Trial("c3", "failed", None, "timed out after 600 s in state fetching")]
    for c in (slow, ok):
        c.trials += gone
    result = decide([slow, ok], Policy(candidates=2, gates=(Gate("p95_ms", 20),)))
    assert result["winner"] == 4 and any("c3" in n for n in result["notes"])


def test_fallback_is_the_lightest_candidate_by_energy_per_inference() -> None:
    accurate = _cand(1, p95=20.0, rss=40, energy=2.0, drop=0.0, recipe="fp32")
    light = _cand(2, p95=8.0, rss=20, energy=0.8, drop=0.8)
    tied = _cand(3, p95=19.5, rss=40, energy=2.0, drop=0.5)
    policy = Policy(candidates=3, objective="accuracy", fallback=True)
    result = decide([accurate, light, tied], policy, fallback_budget_ms=25.0)
    assert (result["winner"], result["fallback"]) == (1, 2)
    assert "shipped as the fallback" in result["candidates"][1]["why"]
    # Nothing needs meaningfully less energy than the winner: no fallback, and it says why.
    only = decide([accurate, tied], policy, fallback_budget_ms=25.0)
    assert only["fallback"] is None and any("no fallback" in n for n in only["notes"])
    assert decide([accurate, light], policy)["fallback"] is None  # no budget to hold


def test_outlier_canary_measurements_are_left_out_of_the_medians() -> None:
    cool = {"governor": "performance", "cpu_freq_mhz": 1800, "cpu_max_freq_mhz": 1800}
    hot = {**cool, "temperature_c": 86.0}

    def res(p95: float, env: dict[str, Any]) -> dict[str, Any]:
        """A measured trial result."""
        return {"p95_ms": p95, "p50_ms": p95, "peak_rss_mb": 30, "energy_mj_per_inference": 1.0,
                "environment": env}  # fmt: skip

    # Candidate 1 is really faster; its trial on c3 ran on a throttling board.
    one = _cand(1, 0, 0, 0, trials=[Trial("c1", "measured", res(5.0, cool)),
                                   Trial("c2", "measured", res(5.2, cool)),
                                   Trial("c3", "measured", res(40.0, hot))])  # fmt: skip
    two = _cand(2, 0, 0, 0, trials=[Trial("c1", "measured", res(6.0, cool)),
                                   Trial("c2", "measured", res(6.1, cool)),
                                   Trial("c3", "measured", res(6.2, cool))])  # fmt: skip
    result = decide([one, two], Policy(candidates=2, gates=(Gate("p95_ms", 10),)))
    assert result["winner"] == 1
    assert result["candidates"][0]["metrics"]["p95_ms"] == pytest.approx(5.1)
    assert any("c3" in n and "temperature 86.0" in n for n in result["notes"])


def test_outlier_rules() -> None:
    peers = [{"environment": {"governor": "performance", "cpu_freq_mhz": 1800}}] * 3
    assert environment_anomaly({"environment": {"governor": "powersave"}}, peers) == (
        "CPU governor powersave (peers: performance)"
    )
    assert "clock 600 MHz of 1800 MHz max" in str(
        environment_anomaly(
            {
                "environment": {
                    "governor": "performance",
                    "cpu_freq_mhz": 600,
                    "cpu_max_freq_mhz": 1800,
                }
            }
        )
    )
    assert "vs peers' 1800 MHz" in str(
        environment_anomaly({"environment": {"cpu_freq_mhz": 900}}, peers)
    )
    assert environment_anomaly({"environment": {"governor": "performance"}}, peers) is None
    base = {"environment": {"governor": "performance"}}
    assert "was performance" in str(
        environment_anomaly({"environment": {"governor": "ondemand"}}, [], base)
    )
    assert robust_z(10.0, [5.0, 5.1]) is None  # too few peers to judge
    assert robust_z(10.0, [5.0, 5.1, 4.9, 5.0]) > 3.5
    plain = [{"p95_ms": v, "environment": {"governor": "performance"}} for v in (5.0, 5.1, 4.9)]
    slow_hot = {"p95_ms": 9.0, "environment": {"governor": "performance", "temperature_c": 85}}
    assert classify(slow_hot, plain).explained  # type: ignore[union-attr]
    slow = {"p95_ms": 9.0, "environment": {"governor": "performance"}}
    verdict = classify(slow, plain)
    assert verdict is not None and not verdict.explained and "robust SDs" in verdict.reason
    assert classify({"p95_ms": 5.05, "environment": {}}, plain) is None
    assert classify(slow, plain[:1], breached=True) is None  # breach, nothing explains it


def test_policy_validates_the_closed_loop_options() -> None:
    for kw, match in (
        ({"candidates": 1}, "--candidates"),
        ({"candidates": 2, "canaries": 0}, "--canaries"),
        ({"candidates": 2, "objective": "speed"}, "--objective"),
        ({"fallback": True}, "--fallback"),
        ({"candidates": 2, "fallback_window_s": 0.5}, "--fallback-window"),
        ({"candidates": 2, "max_accuracy_drop": -1}, "--max-accuracy-drop"),
    ):
        with pytest.raises(PolicyError, match=match):
            Policy(**kw)
    p = Policy(candidates=3, canaries=2, objective="energy", fallback=True, max_accuracy_drop=1.0)
    assert Policy.from_json(p.to_json()) == p


# ----------------------------------------------------------------------------- engine
class Devices:
    """Plays the agents: events for whatever generation the controller last gave the device."""

    def __init__(self, fleet: Fleet) -> None:
        """Drive `fleet`."""
        self.fleet = fleet

    def desired(self) -> dict[str, Any]:
        """Device -> the newest desired state written for it (published or not)."""
        return {d: dv for d, dv, _ in self.fleet.unpublished_desired()}

    def event(self, device: str, kind: str, rollout: str, generation: int, **kw: Any) -> None:
        """One event as an agent sends it."""
        self.fleet.record_event(
            Event(
                device_id=device,
                event_id=uuid.uuid4().hex,
                kind=kind,  # type: ignore[arg-type]
                message=kw.pop("message", kind),
                deployment_id=rollout,
                generation=generation,
                **kw,
            )
        )

    def install(self, device: str, p95: float, **kw: Any) -> str:
        """Activate what the device's desired state says, benchmark it, report the status."""
        desired = self.desired()[device]
        assert desired.artifact is not None
        sha = desired.artifact.sha256
        self.fleet.mark_published(device, desired.generation)
        self.event(device, "update", desired.deployment_id, desired.generation, state="active")
        self.event(device, "benchmark", desired.deployment_id, desired.generation,
                   benchmark=bench(sha, p95, **kw))  # fmt: skip
        self.fleet.record_status(Status(device_id=device, online=True, model_sha256=sha))
        return sha


@pytest.fixture
def ranked_fleet(fleet: Fleet, tmp_path: Path) -> Fleet:
    """Three rpi4 devices on an old model, and digits:2 with 3 ranked rpi4 candidates."""
    fleet.add_model(OLD, name="digits", version="1", profile="rpi4")
    old = fleet.model("digits:1")["artifacts"][0]["sha256"]
    for i in range(3):
        fleet.register_device(f"d{i}", "rpi4")
        fleet.record_status(Status(device_id=f"d{i}", online=True, model_sha256=old))
    out = write_candidates_dir(tmp_path / "opt", "rpi4", [("int8", 1), ("int8", 4), ("fp32", 1)])
    fleet.add_model(out, name="digits", version="2")
    return fleet


def test_models_add_registers_ranked_candidates(ranked_fleet: Fleet, tmp_path: Path) -> None:
    model = ranked_fleet.model("digits:2")
    assert len(model["artifacts"]) == 1, "only rank 1 is the profile's default artifact"
    rows = ranked_fleet.db.query("SELECT rank, recipe, threads FROM model_candidates ORDER BY rank")
    assert [(r["rank"], r["recipe"], r["threads"]) for r in rows] == [
        (1, "int8", 1), (2, "int8", 4), (3, "fp32", 1)
    ]  # fmt: skip
    bad = tmp_path / "bad"
    write_candidates_dir(bad, "rpi4", [("int8", 1)])
    doc = json.loads((bad / "rpi4/candidates.json").read_text())
    doc["candidates"][0]["threads"] = 0
    (bad / "rpi4/candidates.json").write_text(json.dumps(doc))
    with pytest.raises(FleetError, match=r"candidates\[0\]: 'threads' must be null or 1..64"):
        ranked_fleet.add_model(bad, name="digits", version="3")
    doc["candidates"][0].update(threads=1, manifest="../../escape.manifest.json")
    (bad / "rpi4/candidates.json").write_text(json.dumps(doc))
    with pytest.raises(FleetError, match="outside"):
        ranked_fleet.add_model(bad, name="digits", version="3")


def test_candidates_trialed_on_a_canary_then_the_winner_rolls_out(ranked_fleet: Fleet) -> None:
    devices = Devices(ranked_fleet)
    policy = Policy(
        waves=parse_waves("1d,100"), max_failures=Threshold(percent=50), device_timeout_s=600,
        gates=(Gate("p95_ms", 20.0),), candidates=3, canaries=1, fallback=True,
        fallback_window_s=30,
    )  # fmt: skip
    ro = ranked_fleet.start_rollout("digits:2", "all", policy)
    assert ro["phase"] == "selecting"
    canary = next(d["device_id"] for d in ro["devices"] if d["state"] == "trialing")
    assert set(devices.desired()) == set(), "trials start at the first tick"
    ranked_fleet.rollouts.tick()
    assert set(devices.desired()) == {canary}, "only the canary gets candidates"
    # On the device, 4 threads (#2) beat the host's pick (#1); fp32 (#3) is lighter on memory
    # but slow.
    measured = {1: (9.0, 40.0, 1.0), 2: (4.0, 42.0, 1.5), 3: (15.0, 30.0, 2.0)}
    seen = []
    for rank in (1, 2, 3):
        desired = devices.desired()[canary]
        seen.append((desired.artifact.sha256[:8], desired.threads))  # type: ignore[union-attr]
        p95, rss, energy = measured[rank]
        devices.install(canary, p95, rss=rss, energy=energy)
        ranked_fleet.rollouts.tick()
    assert seen[0][0] == seen[1][0] and [t for _, t in seen] == [1, 4, 1]
    status = ranked_fleet.deployment(ro["id"])
    assert status["phase"] == "waves"
    (decision,) = status["decisions"]
    assert (decision["winner_rank"], decision["threads"], decision["fallback_rank"]) == (2, 4, 1)
    verdicts = {c["rank"]: c["verdict"] for c in decision["explanation"]["candidates"]}
    assert verdicts == {1: "front", 2: "won", 3: "front"}
    # Wave 0 is the canary itself: it gets the winner with its threads and the fallback.
    desired = devices.desired()[canary]
    assert desired.threads == 4 and desired.fallback is not None
    assert desired.fallback.threads == 1 and desired.fallback.latency_ms == 20.0
    assert desired.fallback.window_s == 30
    winner_sha = desired.artifact.sha256  # type: ignore[union-attr]
    devices.install(canary, 4.1)
    ranked_fleet.rollouts.tick()
    others = [d for d in ("d0", "d1", "d2") if d != canary]
    for d in others:
        assert devices.desired()[d].artifact.sha256 == winner_sha  # type: ignore[union-attr]
        devices.install(d, 4.2)
    ranked_fleet.rollouts.tick()
    status = ranked_fleet.deployment(ro["id"])
    assert status["state"] == "completed" and status["counts"] == {"succeeded": 3}
    # The fallback event is recorded on the device's row and shown by explain.
    gen = next(d["generation"] for d in status["devices"] if d["device_id"] == others[0])
    devices.event(others[0], "fallback", ro["id"], gen, message="p95 31 ms > 20 ms for 30 s")
    result = CliRunner().invoke(
        app, ["models", "explain", "digits:2", "--home", str(ranked_fleet.home)]
    )
    assert result.exit_code == 0, result.output
    assert "won" in result.output and "front" in result.output
    assert f"fell back: {others[0]}: p95 31 ms" in result.output
    data = json.loads(
        CliRunner()
        .invoke(app, ["models", "explain", "digits", "--json", "--home", str(ranked_fleet.home)])
        .output
    )
    assert data["rollout"]["id"] == ro["id"] and data["decisions"][0]["winner_rank"] == 2


def test_abort_during_selection_returns_the_canary_and_restart_resumes(
    ranked_fleet: Fleet, tmp_path: Path
) -> None:
    devices = Devices(ranked_fleet)
    old = ranked_fleet.model("digits:1")["artifacts"][0]["sha256"]
    ro = ranked_fleet.start_rollout("digits:2", "all", Policy(candidates=3, device_timeout_s=600))[
        "id"
    ]
    ranked_fleet.rollouts.tick()
    canary = next(iter(devices.desired()))
    devices.install(canary, 5.0)
    # A controller restart mid-selection resumes from the database.
    ranked_fleet.close()
    ranked_fleet = Fleet(ranked_fleet.home)
    devices = Devices(ranked_fleet)
    ranked_fleet.rollouts.tick()
    trials = ranked_fleet.deployment(ro)["trials"]
    assert [t["state"] for t in trials] == ["measured", "running", "waiting"]
    ranked_fleet.rollouts.abort(ro)
    desired = devices.desired()[canary]
    assert desired.artifact is not None and desired.artifact.sha256 == old
    assert desired.threads is None and desired.fallback is None
    trials = ranked_fleet.deployment(ro)["trials"]
    assert [t["state"] for t in trials] == ["measured", "cancelled", "cancelled"]


def test_a_failing_candidate_loses_and_timeouts_end_trials(ranked_fleet: Fleet) -> None:
    devices = Devices(ranked_fleet)
    ro = ranked_fleet.start_rollout("digits:2", "all", Policy(candidates=2, device_timeout_s=600))[
        "id"
    ]
    ranked_fleet.rollouts.tick()
    canary = next(iter(devices.desired()))
    desired = devices.desired()[canary]
    devices.event(canary, "error", ro, desired.generation, stage="self-testing",
                  message="self-test failed: p95 over the 100 ms budget")  # fmt: skip
    ranked_fleet.rollouts.tick()
    ranked_fleet.db.conn.execute("UPDATE candidate_trials SET deadline = 1 WHERE state = 'running'")
    ranked_fleet.rollouts.tick()
    (decision,) = ranked_fleet.deployment(ro)["decisions"]
    assert decision["winner_rank"] is None
    whys = [c["why"] for c in decision["explanation"]["candidates"]]
    assert "self-test failed" in whys[0] and "timed out after 600 s" in whys[1]
    rows = {d["device_id"]: d for d in ranked_fleet.deployment(ro)["devices"]}
    assert rows[canary]["state"] == "rolling_back", "the canary goes back to its old model"
    assert {r["state"] for d, r in rows.items() if d != canary} == {"skipped"}
    assert "no candidate passed" in next(r for d, r in rows.items() if d != canary)["detail"]


def test_a_hot_device_breaking_a_gate_is_an_outlier_not_a_failure(ranked_fleet: Fleet) -> None:
    devices = Devices(ranked_fleet)
    policy = Policy(
        waves=parse_waves("100"), max_failures=Threshold(count=0), device_timeout_s=600,
        gates=(Gate("p95_ms", 10.0),),
    )  # fmt: skip
    ro = ranked_fleet.start_rollout("digits:2", "all", policy)["id"]
    cool = Environment(governor="performance", cpu_freq_mhz=1800, cpu_max_freq_mhz=1800)
    devices.install("d0", 5.0, env=cool)
    devices.install("d1", 5.1, env=cool)
    hot = Environment(governor="performance", cpu_freq_mhz=1000, cpu_max_freq_mhz=1800,
                      temperature_c=84.0)  # fmt: skip
    devices.install("d2", 14.0, env=hot)
    ranked_fleet.rollouts.tick()
    status = ranked_fleet.deployment(ro)
    rows = {d["device_id"]: d for d in status["devices"]}
    assert rows["d2"]["state"] == "outlier" and "temperature 84.0" in rows["d2"]["outlier"]
    assert "not a model failure" in rows["d2"]["detail"]
    assert status["state"] == "completed", "an outlier does not count against max-failures 0"
    # The same breach on a device in normal conditions is the model's: gate_failed.
    ro2 = ranked_fleet.start_rollout("digits:1", "all", policy)["id"]
    devices.install("d0", 5.0, env=cool)
    devices.install("d1", 5.0, env=cool)
    devices.install("d2", 14.0, env=cool)
    assert {d["device_id"]: d["state"] for d in ranked_fleet.deployment(ro2)["devices"]}["d2"] == (
        "gate_failed"
    )


def test_cli_starts_a_selection_and_shows_its_trials(ranked_fleet: Fleet) -> None:
    home = ["--home", str(ranked_fleet.home)]
    runner = CliRunner()
    bad = runner.invoke(app, ["rollout", "start", "digits:2", "--candidates", "3",
                              "--objective", "speed", *home])  # fmt: skip
    assert bad.exit_code == 2 and "--objective: 'speed' is not one of latency" in bad.output
    result = runner.invoke(app, ["rollout", "start", "digits:2", "--candidates", "3",
                                 "--fallback", "--fallback-window", "2m", *home])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "first 3 candidates per profile on 1 canary device(s)" in result.output
    rollout_id = result.output.split()[1].rstrip(":")
    ranked_fleet.rollouts.tick()
    shown = runner.invoke(app, ["rollout", "status", rollout_id, *home])
    assert shown.exit_code == 0, shown.output
    assert "selection phase: selecting" in shown.output and "#1" in shown.output
    policy = ranked_fleet.deployment(rollout_id)["policy"]
    assert policy["fallback_window_s"] == 120 and policy["candidates"] == 3
    explained = runner.invoke(app, ["models", "explain", "digits:2", *home])
    assert "not decided yet" in explained.output
    missing = runner.invoke(app, ["models", "explain", "digits:2", "--rollout", "ro-x", *home])
    assert missing.exit_code == 2 and "measured no candidates" in missing.output


def test_devices_outliers_lists_the_slow_device_with_its_reason(ranked_fleet: Fleet) -> None:
    devices = Devices(ranked_fleet)
    for i in range(3, 6):
        ranked_fleet.register_device(f"d{i}", "rpi4")
    ro = ranked_fleet.start_rollout("digits:2", "all", Policy(device_timeout_s=600))["id"]
    normal = Environment(governor="performance", cpu_freq_mhz=1800, cpu_max_freq_mhz=1800)
    for d, p95 in (("d0", 5.0), ("d1", 5.1), ("d2", 4.9), ("d3", 5.05)):
        devices.install(d, p95, env=normal)
    devices.install("d4", 11.0, env=Environment(governor="powersave", cpu_freq_mhz=600,
                                                cpu_max_freq_mhz=1800))  # fmt: skip
    devices.install("d5", 12.0, env=normal)
    assert ranked_fleet.deployment(ro)["counts"] == {"succeeded": 6}
    home = ["--home", str(ranked_fleet.home)]
    rows = json.loads(CliRunner().invoke(app, ["devices", "outliers", "--json", *home]).output)
    by_device = {r["device_id"]: r for r in rows}
    assert set(by_device) == {"d4", "d5"}, rows
    assert by_device["d4"]["explained"] and "governor powersave" in by_device["d4"]["reason"]
    assert "clock 600 MHz vs peers' 1800 MHz" in by_device["d4"]["reason"]
    assert not by_device["d5"]["explained"] and "robust SDs" in by_device["d5"]["reason"]
    text = CliRunner().invoke(app, ["devices", "outliers", "--profile", "rpi4", *home]).output
    assert "unexplained: p95_ms 12.000" in text


# ----------------------------------------------------------------------------- review cases
def test_negative_accuracy_drops_do_not_break_the_tie_band() -> None:
    better = _cand(1, p95=10.0, rss=40, energy=2.0, drop=-0.3)  # quantized scored higher
    same = _cand(2, p95=9.0, rss=40, energy=2.0, drop=0.0)
    result = decide([better, same], Policy(candidates=2, objective="accuracy"))
    assert result["winner"] == 1


def test_a_canary_taken_by_a_newer_rollout_is_not_taken_back(ranked_fleet: Fleet) -> None:
    devices = Devices(ranked_fleet)
    ro1 = ranked_fleet.start_rollout("digits:2", "all", Policy(candidates=3, device_timeout_s=600))[
        "id"
    ]
    ranked_fleet.rollouts.tick()
    canary = next(iter(devices.desired()))
    ro2 = ranked_fleet.start_rollout("digits:1", f"device:{canary}", Policy(device_timeout_s=600))[
        "id"
    ]
    devices.install(canary, 5.0)
    ranked_fleet.db.conn.execute(
        "UPDATE candidate_trials SET deadline = 1"
    )  # ro1's trial times out
    for _ in range(3):
        ranked_fleet.rollouts.tick()
    assert ranked_fleet.device(canary)["desired_deployment_id"] == ro2
    assert ranked_fleet.deployment(ro2)["state"] == "completed"
    first = ranked_fleet.deployment(ro1)
    assert {t["state"] for t in first["trials"]} <= {"cancelled", "failed"}
    assert first["state"] == "completed", "no canary left: the profile is skipped, not stuck"
    assert {d["state"] for d in first["devices"]} == {"superseded", "skipped"}


def test_a_removed_canary_does_not_hang_the_rollout(ranked_fleet: Fleet) -> None:
    ro = ranked_fleet.start_rollout("digits:2", "all", Policy(candidates=2, device_timeout_s=600))[
        "id"
    ]
    ranked_fleet.rollouts.tick()
    canary = next(
        d["device_id"] for d in ranked_fleet.deployment(ro)["devices"] if d["state"] == "trialing"
    )
    ranked_fleet.remove_device(canary)
    for _ in range(3):
        ranked_fleet.rollouts.tick()
    status = ranked_fleet.deployment(ro)
    assert status["state"] == "completed", status["devices"]
    rows = {d["device_id"]: d for d in status["devices"]}
    assert rows[canary]["state"] == "skipped" and rows[canary]["detail"] == "device removed"


def test_canaries_join_wave_0_and_go_back_on_abort(ranked_fleet: Fleet) -> None:
    devices = Devices(ranked_fleet)
    old = ranked_fleet.model("digits:1")["artifacts"][0]["sha256"]
    policy = Policy(waves=parse_waves("1d,100"), candidates=2, canaries=2, device_timeout_s=600)
    ro = ranked_fleet.start_rollout("digits:2", "all", policy)["id"]
    canaries = [
        d["device_id"] for d in ranked_fleet.deployment(ro)["devices"] if d["state"] == "trialing"
    ]
    assert len(canaries) == 2
    ranked_fleet.rollouts.tick()
    for _ in range(2):  # each canary measures both candidates
        for d in canaries:
            devices.install(d, 5.0)
        ranked_fleet.rollouts.tick()
    rows = {d["device_id"]: d for d in ranked_fleet.deployment(ro)["devices"]}
    assert {rows[d]["wave"] for d in canaries} == {0}, "no canary waits in a later wave"
    ranked_fleet.rollouts.abort(ro)
    for d in canaries:
        desired = devices.desired()[d]
        assert desired.artifact is not None and desired.artifact.sha256 == old, d


def test_transport_failures_of_a_trial_are_retried(ranked_fleet: Fleet) -> None:
    devices = Devices(ranked_fleet)
    policy = Policy(candidates=2, retries=1, device_timeout_s=600)
    ro = ranked_fleet.start_rollout("digits:2", "all", policy)["id"]
    ranked_fleet.rollouts.tick()
    canary, first = next(iter(devices.desired().items()))
    devices.event(canary, "error", ro, first.generation, stage="fetching", message="no chunks")
    trial = ranked_fleet.deployment(ro)["trials"][0]
    assert trial["state"] == "waiting" and "attempt 1: no chunks" in trial["detail"]
    ranked_fleet.rollouts.tick()
    again = devices.desired()[canary]
    assert again.generation > first.generation and again.artifact == first.artifact
    devices.event(canary, "error", ro, again.generation, stage="fetching", message="no chunks")
    assert ranked_fleet.deployment(ro)["trials"][0]["state"] == "failed", "retries are used up"


def test_a_version_keeps_its_candidates(ranked_fleet: Fleet, tmp_path: Path) -> None:
    other = write_candidates_dir(tmp_path / "other", "rpi4", [("int8", 1), ("fp32", 4)])
    with pytest.raises(FleetError, match="already has different candidates for profile rpi4"):
        ranked_fleet.add_model(other, name="digits", version="2")


def test_outliers_excuse_neither_memory_nor_a_fleet_wide_breach(ranked_fleet: Fleet) -> None:
    devices = Devices(ranked_fleet)
    hot = Environment(governor="performance", temperature_c=85.0)
    cool = Environment(governor="performance")
    policy = Policy(gates=(Gate("peak_rss_mb", 60.0), Gate("p95_ms", 10.0)), device_timeout_s=600,
                    max_failures=Threshold(percent=100))  # fmt: skip
    ro = ranked_fleet.start_rollout("digits:2", "all", policy)["id"]
    devices.install("d0", 5.0, rss=50, env=cool)
    devices.install("d1", 5.0, rss=50, env=cool)
    devices.install("d2", 5.0, rss=500, env=hot)  # memory: conditions do not explain it
    assert {d["device_id"]: d["state"] for d in ranked_fleet.deployment(ro)["devices"]}["d2"] == (
        "gate_failed"
    )
    ro2 = ranked_fleet.start_rollout("digits:1", "all", policy)["id"]
    for d in ("d0", "d1", "d2"):  # every device hot and slow: nothing shows it is the device
        devices.install(d, 20.0, env=hot)
    assert {d["state"] for d in ranked_fleet.deployment(ro2)["devices"]} == {"gate_failed"}

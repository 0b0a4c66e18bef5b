"""Closed loop at fleet level: the real controller service selects per profile on simulated devices.

The simulated agents get per-profile speed characteristics (controller/simulate/speed.py), so the
winner of each profile is known before the rollout starts, and it is not the host's pick.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.brokers.base import BrokerHandle
from controller.fleet.registry import Fleet
from controller.fleet.rollout.policy import Policy, Threshold, parse_waves
from controller.runtime.service import ControllerService
from controller.simulate import Simulation, SpeedModel
from tests.closed_loop_helpers import MODELS, sha256, write_candidates_dir
from tests.polling import wait_until

pytestmark = pytest.mark.integration


def test_each_profile_gets_the_candidate_its_devices_run_fastest(
    mosquitto_broker: BrokerHandle, topic_root: str, tmp_path: Path
) -> None:
    home = tmp_path / "controller"
    # rpi4 boards run int8 3x slower than their size predicts (no int8 kernels worth having)
    # and gain from 4 threads; pixel-8 runs float 2x slower. The host ranked int8 first for both.
    speed = SpeedModel.parse(["rpi4:int8=3,int16x8=2", "pixel-8:fp32=2,int16x8=2"])
    sim = Simulation(
        mosquitto_broker.url, 6, profiles=["rpi4", "pixel-8"], topic_root=topic_root,
        speed=speed, telemetry_interval_s=0,
    )  # fmt: skip
    out = tmp_path / "opt"
    write_candidates_dir(out, "rpi4", [("int8", 1), ("fp32", 1), ("fp32", 4), ("int16x8", 1)])
    write_candidates_dir(out, "pixel-8", [("int8", 1), ("fp32", 1), ("int16x8", 1)])
    service = ControllerService(
        home, mosquitto_broker.url, topic_root=topic_root,
        client_id=f"ctl-{topic_root.split('/')[1]}",
    )  # fmt: skip
    service.start()
    sim.start()
    fleet = Fleet(home)
    try:
        assert service.ready.wait(15) and sim.wait_connected(30)
        ids = sim.device_ids
        wait_until(
            lambda: sum(d["online"] for d in fleet.devices() if d["id"] in ids) == 6, 30, "hello"
        )
        fleet.add_model(out, name="digits", version="2")
        policy = Policy(
            waves=parse_waves("50,100"), max_failures=Threshold(count=0), device_timeout_s=60,
            candidates=4, canaries=2,
        )  # fmt: skip
        ro = fleet.start_rollout("digits:2", "all", policy)["id"]
        final = wait_until(
            lambda: (r := fleet.deployment(ro))["state"] != "running" and r, 120, "rollout end"
        )
        assert final["state"] == "completed", final
        decisions = {d["profile"]: d for d in final["decisions"]}
        expected = {"rpi4": (sha256(MODELS["fp32"]), 4), "pixel-8": (sha256(MODELS["int8"]), 1)}
        assert {p: (d["sha256"], d["threads"]) for p, d in decisions.items()} == expected
        assert decisions["rpi4"]["winner_rank"] == 3, "not the host's rank 1"
        trials = final["trials"]
        assert len(trials) == 2 * 4 + 2 * 3 and {t["state"] for t in trials} == {"measured"}
        # Every device of a profile ends on its profile's winner with its threads.
        profiles = {d["id"]: d["profile"] for d in fleet.devices()}
        for row in final["devices"]:
            sha, threads = expected[profiles[row["device_id"]]]
            assert (row["state"], row["artifact_sha256"], row["threads"]) == (
                "succeeded",
                sha,
                threads,
            ), row
            assert row["result"]["threads"] == threads
        wait_until(
            lambda: all(
                d["model_sha256"] == expected[d["profile"]][0]
                for d in fleet.devices()
                if d["id"] in ids
            ),
            30,
            "statuses on the winners",
        )
        # The stored explanation names why the host's pick lost on rpi4.
        rpi4 = {c["rank"]: c for c in decisions["rpi4"]["explanation"]["candidates"]}
        assert rpi4[3]["verdict"] == "won"
        assert rpi4[1]["verdict"] in ("dominated", "front") and "#3 fp32 t4" in rpi4[1]["why"]
    finally:
        fleet.close()
        sim.stop()
        service.stop()

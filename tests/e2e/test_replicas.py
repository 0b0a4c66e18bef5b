"""Several `edgefleet up --replica` processes on one PostgreSQL and one mosquitto.

Real parts only: mosquitto on a free loopback port, a PostgreSQL schema of the test's own, the
controller as real processes killed by PID, and the simulated agents of controller/simulate
speaking the real wire protocol (200 of them) or real agent processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controller.brokers.base import BrokerHandle
from controller.fleet.registry import Fleet
from controller.fleet.rollout.policy import Policy, Wave
from controller.simulate import Simulation
from tests.e2e.brokers import mosquitto_only  # noqa: F401  (is e2e_broker)
from tests.e2e.conftest import DATA, AgentProcess, wait_until

pytestmark = [pytest.mark.e2e]
# e2e_broker is mosquitto only: replicas need shared subscriptions, which amqtt lacks.


EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
DEVICES = 200


class Replica:
    """One `edgefleet --db URL up --broker URL --replica NAME` process, stopped by PID."""

    def __init__(
        self, name: str, home: Path, db: str, broker: BrokerHandle, root: str, log: Path
    ) -> None:
        """Remember how to start it."""
        self.name = name
        self.args = [
            EDGEFLEET, "--db", db, "up", "--broker", broker.url, "--topic-root", root,
            "--home", str(home), "--replica", name, "--stats-interval", "5",
        ]  # fmt: skip
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process (its output appends to the log)."""
        self.proc = subprocess.Popen(
            self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        """SIGKILL by PID: no lease release, no DISCONNECT, messages in flight."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        """Stop it if it still runs (teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, chars: int = 3000) -> str:
        """The end of its log, for failure messages."""
        return self.log.read_text(errors="replace")[-chars:]


@pytest.fixture
def start_replica(
    mosquitto_broker: BrokerHandle, pg_url: str, topic_root: str, tmp_path: Path
) -> Iterator[Callable[[str], Replica]]:
    """Factory: start_replica(name) runs a replica on the test's broker, schema and data dir."""
    started: list[Replica] = []

    def start(name: str) -> Replica:
        replica = Replica(
            name, tmp_path / "home", pg_url, mosquitto_broker, topic_root,
            tmp_path / f"replica-{name}.log",
        )  # fmt: skip
        replica.start()
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.close()


def leader(fleet: Fleet) -> str | None:
    """The replica holding an unexpired leader lease."""
    row = fleet.db.query_one("SELECT holder, expires FROM leases WHERE name = 'leader'")
    return row["holder"] if row and row["expires"] > fleet.db.clock() else None


def replica_stats(fleet: Fleet) -> dict[str, dict[str, int]]:
    """Each replica's counters from its last heartbeat."""
    rows = fleet.db.query("SELECT name, stats FROM replicas")
    return {r["name"]: json.loads(r["stats"]) for r in rows}


def stored_seqs(fleet: Fleet) -> dict[str, list[int]]:
    """Every stored telemetry sequence number, per device, in order (duplicates would show)."""
    out: dict[str, list[int]] = {}
    for r in fleet.db.query("SELECT device_id, seq FROM telemetry ORDER BY device_id, seq"):
        out.setdefault(r["device_id"], []).append(int(r["seq"]))
    return out


@pytest.mark.slow
def test_three_replicas_finish_a_rollout_when_the_leader_is_killed_mid_wave(
    start_replica: Callable[[str], Replica],
    mosquitto_broker: BrokerHandle,
    pg_url: str,
    topic_root: str,
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path / "home", db=pg_url)
    fleet.add_model(DATA / "tiny_int8.tflite", name="tiny", version="1")
    replicas = {name: start_replica(name) for name in ("a", "b", "c")}
    wait_until(
        lambda: len(fleet.db.query("SELECT name FROM replicas")) == 3 and leader(fleet),
        60,
        "three replicas beating and one leading",
    )
    sim = Simulation(
        mosquitto_broker.url,
        DEVICES,
        profiles=["rpi4", "pixel-8"],
        topic_root=topic_root,
        telemetry_interval_s=1.0,
    )
    sim.start()
    try:
        assert sim.wait_connected(60), f"only {sim.counters.connected} connected"
        wait_until(
            lambda: sum(1 for d in fleet.devices() if d["online"] and d["facts"]) == DEVICES,
            60,
            "every hello stored through the shared subscription",
        )
        # Every replica takes a share of the device messages.
        wait_until(
            lambda: all(s.get("messages", 0) > 0 for s in replica_stats(fleet).values()),
            30,
            "messages on every replica",
        )
        policy = Policy(
            waves=(Wave(percent=10.0), Wave(percent=50.0), Wave(percent=100.0)),
            device_timeout_s=120.0,
        )
        rollout = fleet.start_rollout("tiny:1", "all", policy)["id"]
        wait_until(
            lambda: fleet.db.query_one(
                "SELECT 1 AS x FROM rollout_waves WHERE rollout_id = ? AND wave = 1", (rollout,)
            ),
            90,
            "wave 1 started by the leader",
        )
        victim = leader(fleet)
        assert victim in replicas
        replicas[victim].kill()
        killed_at = time.monotonic()
        new_leader = wait_until(
            lambda: (name := leader(fleet)) not in (None, victim) and name,
            30,
            "another replica taking the leader lease",
        )
        takeover_s = time.monotonic() - killed_at
        final = wait_until(
            lambda: (d := fleet.deployment(rollout))["state"] != "running" and d,
            180,
            "the rollout to finish without the killed replica",
        )
        assert final["state"] == "completed", (final["reason"], replicas[new_leader].tail())
        assert final["counts"] == {"succeeded": DEVICES}
        # No wave ran twice: one row per wave (the primary key would have refused a second).
        waves = fleet.db.query(
            "SELECT wave, driver, devices FROM rollout_waves WHERE rollout_id = ? ORDER BY wave",
            (rollout,),
        )
        assert [w["wave"] for w in waves] == [0, 1, 2]
        assert sum(w["devices"] for w in waves) == DEVICES
        assert waves[2]["driver"] == new_leader  # the last wave was the new leader's
        device_ids = [a.device_id for a in sim.agents]
        # No device was updated twice.
        activations = {d: sim.device(d)["activations"] for d in device_ids}
        assert set(activations.values()) == {1}, {d: n for d, n in activations.items() if n != 1}
        # The dead replica's session was adopted: what it held was processed by the others.
        row = fleet.db.query_one("SELECT adopted_by FROM replicas WHERE name = ?", (victim,))
        assert row is not None and row["adopted_by"] == new_leader
        # Telemetry: stop the devices, then every sequence number they sent is stored once.
        sim.stop()
        sent = {d: sim.device(d)["telemetry"] for d in device_ids}

        def complete() -> bool:
            seqs = stored_seqs(fleet)
            for device, t in sent.items():
                got = seqs.get(device, [])
                published = t["next_seq"] - 1 - t["pending"] - t["inflight"]
                if got != list(range(1, len(got) + 1)) or len(got) < published:
                    return False
            return True

        wait_until(complete, 60, "every published telemetry record stored exactly once")
        # ...through the adopted session (acknowledged after commit), not device resends.
        stats = wait_until(
            lambda: (s := replica_stats(fleet))[new_leader].get("adopted_messages", 0) > 0 and s,
            15,
            "the new leader's heartbeat counting the adopted messages",
        )
        assert sum(s.get("resend_requests", 0) for s in stats.values()) == 0
        total = sum(len(v) for v in stored_seqs(fleet).values())
        (count,) = fleet.db.conn.execute("SELECT COUNT(*) FROM telemetry").fetchone()
        assert count == total and total >= DEVICES * 5
        print(f"\nleader {victim} killed; {new_leader} led after {takeover_s:.1f} s; "
              f"{total} telemetry records stored once")  # fmt: skip
    finally:
        sim.stop()
        fleet.close()


def test_a_restart_against_postgresql_resumes_every_rollout_where_it_stood(
    mosquitto_broker: BrokerHandle,
    start_replica: Callable[[str], Replica],
    start_agent: Callable[..., AgentProcess],
    pg_url: str,
    tmp_path: Path,
) -> None:
    """One running rollout between its waves and one paused one: the controller dies by
    SIGKILL, comes back, and each goes on from where it stood (nothing re-run)."""
    fleet = Fleet(tmp_path / "home", db=pg_url)
    devices = ["pg-a", "pg-b", "pg-c"]
    for device in devices:
        start_agent(device, profile="rpi4")
    controller = start_replica("solo")
    wait_until(
        lambda: {d["id"] for d in fleet.devices() if d["online"] and d["facts"]} >= set(devices),
        60,
        "hello from every agent",
    )
    fleet.add_model(DATA / "tiny_int8.tflite", name="m", version="1")
    running = fleet.start_rollout(
        "m:1", "pg-a,pg-b", Policy(waves=(Wave(count=1), Wave(percent=100.0)))
    )["id"]
    paused = fleet.start_rollout("m:1", "pg-c", Policy())["id"]
    fleet.rollouts.pause(paused)
    wait_until(
        lambda: fleet.deployment(running)["wave"] == 1, 90, "the first rollout's second wave"
    )
    stood = {r: fleet.deployment(r) for r in (running, paused)}
    controller.kill()
    controller.start()
    final = wait_until(
        lambda: (d := fleet.deployment(running))["state"] != "running" and d,
        90,
        "the running rollout to finish after the restart",
    )
    assert final["state"] == "completed", (final, controller.tail())
    assert final["counts"] == {"succeeded": 2}
    still = fleet.deployment(paused)
    assert still["state"] == "paused" and still["devices"] == stood[paused]["devices"]
    fleet.rollouts.resume(paused)
    resumed = wait_until(
        lambda: (d := fleet.deployment(paused))["state"] != "running" and d,
        90,
        "the paused rollout to finish once resumed",
    )
    assert resumed["state"] == "completed" and resumed["counts"] == {"succeeded": 1}
    waves = fleet.db.query("SELECT rollout_id, wave FROM rollout_waves ORDER BY rollout_id, wave")
    assert sorted((w["rollout_id"], w["wave"]) for w in waves) == sorted(
        [(running, 0), (running, 1), (paused, 0)]
    )
    verdicts = fleet.db.query(
        "SELECT device_id, COUNT(*) AS n FROM events WHERE kind = 'benchmark' "
        "AND deployment_id IN (?, ?) GROUP BY device_id",
        (running, paused),
    )
    assert {r["device_id"]: r["n"] for r in verdicts} == dict.fromkeys(devices, 1)
    fleet.close()

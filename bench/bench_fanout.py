"""Artifact fan-out through the controller vs a bare MQTT fan-out, measured in one run.

Prints, for (a) the controller path, (b) a bare fan-out and (c) the simulated agents fed by the
bare publisher (no controller, chunks sent once):
  * deploy → all N simulated agents verified an 8 MiB artifact (real ControllerService, chunks
    requested with Need, every chunk hashed by every agent), divided by the time a bare paho
    publisher needs to fan the same 64 KiB chunks out to N bare subscribers — target <= 1.5
  * controller bytes published / artifact size — target ≈ 1 (once per artifact, not per device)
  * (c) / (b): what the simulated agents themselves cost on top of a bare subscriber
  * the broker's peak RSS and CPU seconds over the run (bench/sampling.py)

The bare subscribers of (b) verify every chunk against its sha256 as the agents do (the same
per-chunk hashing), so (a)/(b) and (c)/(b) compare the same work and the ratios measure the
distribution path, not the hashing.

Both sides use one mosquitto started with the generated config (brokers/mosquitto.py) on a free
port and N subscribers on one epoll loop in this process; the publisher (the ControllerService
for (a), a plain paho client for (b) and (c)) runs in its own process, as on a real controller
host, so it does not share this process's GIL. Rounds alternate (a), (b) and (c); the medians
and the best of rounds are printed, since other tenants on a shared VM only ever slow a run.

Run: .venv/bin/python bench/bench_fanout.py [--devices 100] [--size-mib 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from argparse import SUPPRESS
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.protocol import DEFAULT_CHUNK_SIZE, ArtifactRef, Desired, Topics, dump  # noqa: E402
from bench.sampling import BrokerSys, Sampler, phase_memory  # noqa: E402
from controller.brokers.base import BrokerHandle, parse_broker_url  # noqa: E402
from controller.brokers.mosquitto import start_mosquitto  # noqa: E402
from controller.fleet.artifacts import build_manifest  # noqa: E402
from controller.fleet.registry import Fleet  # noqa: E402
from controller.runtime.service import ControllerService  # noqa: E402
from controller.runtime.tuning import CONTROLLER_INFLIGHT  # noqa: E402
from controller.simulate import Simulation  # noqa: E402

TOPIC_ROOT = "bench/fanout/edgefleet/v1"
# A second root for the agents-only measurement (c), so its hand-made desired states never
# meet the controller.
DIRECT_ROOT = "bench/direct/edgefleet/v1"
# Polling period of the bench's own clocks: small against transfers that take ~1 s.
POLL_S = 0.005


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until predicate() is true; return the time it became true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_S)
    return time.monotonic()


def settle(read: Callable[[], object], quiet_s: float = 1.0, timeout: float = 120.0) -> None:
    """Wait until `read()` stops changing for `quiet_s` (traffic of the last run drained)."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = read()
        if now == last:
            return
        last = now


def make_artifact(path: Path, size: int, seed: int) -> bytes:
    """Seeded random bytes with the TFLite identifier at offset 4 (Fleet checks it)."""
    data = bytearray(random.Random(seed).randbytes(size))
    data[4:8] = b"TFL3"
    path.write_bytes(data)
    return bytes(data)


# =========================================================================== (b) bare fan-out


class BareSubscribers:
    """N plain paho subscribers on one epoll loop that verify each chunk's sha256 and count bytes
    (the agents' per-chunk work, without the protocol around it)."""

    def __init__(self, url: str, count: int, topic_filter: str) -> None:
        """Connect every subscriber and subscribe it to `topic_filter` at QoS1."""
        self.host, self.port = parse_broker_url(url)
        self.received = [0] * count
        self.chunk_sha256: list[str] = []  # of the artifact being fanned out (set per round)
        self.rejected = 0
        self.subscribed = 0
        self._ep = select.epoll()
        self._by_fd: dict[int, paho.Client] = {}
        self._stop = threading.Event()
        self.clients = []
        for i in range(count):
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-sub-{i}", userdata=i)
            client.on_socket_open = self._open
            client.on_socket_close = self._close
            client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(topic_filter, 1)
            client.on_subscribe = self._suback
            client.on_message = self._message
            client.connect(self.host, self.port, keepalive=60)
            self.clients.append(client)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _open(self, client: paho.Client, _u: Any, sock: Any) -> None:
        """Watch a new socket."""
        self._by_fd[sock.fileno()] = client
        self._ep.register(sock.fileno(), select.EPOLLIN)

    def _close(self, client: paho.Client, _u: Any, sock: Any) -> None:
        """Forget a closing socket."""
        self._by_fd.pop(sock.fileno(), None)
        self._ep.unregister(sock.fileno())

    def _suback(self, *_args: Any) -> None:
        """Count SUBACKs."""
        self.subscribed += 1

    def _message(self, _c: paho.Client, index: int, message: paho.MQTTMessage) -> None:
        """Verify the chunk against its sha256 (as an agent does), then count its bytes."""
        chunk = int(message.topic.rsplit("/", 1)[1])
        if hashlib.sha256(message.payload).hexdigest() != self.chunk_sha256[chunk]:
            self.rejected += 1
            return
        self.received[index] += len(message.payload)

    def _run(self) -> None:
        """Read every ready socket once, then write the PUBACKs (as the simulator's loop does)."""
        while not self._stop.is_set():
            touched = []
            for fd, _mask in self._ep.poll(0.05):
                client = self._by_fd.get(fd)
                if client is not None:
                    client.loop_read()
                    touched.append(client)
            for client in touched:
                if client.want_write():
                    client.loop_write()

    def close(self) -> None:
        """Stop the loop and disconnect everyone."""
        self._stop.set()
        self._thread.join(5)
        for client in self.clients:
            client.disconnect()
        self._ep.close()


def bare_publisher(url: str, topic: str, artifact: Path) -> None:
    """Subprocess mode: on "go", publish every chunk at QoS1, wait for the PUBACKs, say "done"."""
    data = artifact.read_bytes()
    publisher = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-pub-{os.getpid()}")
    publisher.max_inflight_messages_set(CONTROLLER_INFLIGHT)  # as the controller's session
    publisher.max_queued_messages_set(0)
    host, port = parse_broker_url(url)
    publisher.connect(host, port, keepalive=60)
    publisher.loop_start()
    print("ready", flush=True)
    sys.stdin.readline()
    info = None
    for index, start in enumerate(range(0, len(data), DEFAULT_CHUNK_SIZE)):
        chunk = data[start : start + DEFAULT_CHUNK_SIZE]
        info = publisher.publish(f"{topic}/{index}", chunk, qos=1)
    if info is not None:
        info.wait_for_publish(120)
    print("done", flush=True)
    publisher.disconnect()
    publisher.loop_stop()


def bare_fanout(url: str, subs: BareSubscribers, artifact: Path, size: int, round_no: int) -> float:
    """Seconds from "go" to the publisher process until every subscriber counted every byte."""
    subs.received = [0] * len(subs.clients)
    data = artifact.read_bytes()
    subs.chunk_sha256 = [
        hashlib.sha256(data[i : i + DEFAULT_CHUNK_SIZE]).hexdigest()
        for i in range(0, len(data), DEFAULT_CHUNK_SIZE)
    ]
    publisher = helper("--bare-publish", url, f"{TOPIC_ROOT}/bare/{round_no}/chunks", str(artifact))
    try:
        t0 = time.monotonic()
        send(publisher, "go")
        done = wait_for(
            lambda: min(subs.received) >= size, 120, "bare subscribers to get every byte"
        )
        return done - t0
    finally:
        publisher.wait(30)


# =========================================================================== helper processes


def helper(*args: str) -> subprocess.Popen[str]:
    """Run this file in another mode in a subprocess (own GIL, like a real controller host)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        raise SystemExit(f"helper {args[0]} did not start: {line!r}")
    return proc


def send(proc: subprocess.Popen[str], line: str) -> str:
    """Send one command line to a helper and return its one-line answer."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def serve_controller(home: Path, url: str) -> None:
    """Subprocess mode: run the ControllerService; answer "stats" with its counters as JSON."""
    service = ControllerService(home, url, topic_root=TOPIC_ROOT)
    service.start()
    if not service.ready.wait(15):
        print("controller did not connect", flush=True)
        return
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "stats":
            stats = {
                "bytes_published": service.bytes_published,
                "chunks_published": service.chunks_published,
                "errors": service.errors,
                "rejected": service.rejected,
            }
            print(json.dumps(stats), flush=True)
        else:
            break
    service.stop()


# ======================================================================= (c) agents, no controller


def direct_fanout(url: str, sim: Simulation, artifact: Path, round_no: int) -> float:
    """Seconds for the simulated agents to verify chunks a bare publisher sends once.

    The manifest and desired states are published by hand, the agents' Need requests are
    ignored: this is the agent side's own cost (MQTT, hashing, bookkeeping) on the same bytes.
    """
    topics = Topics(DIRECT_ROOT)
    manifest = build_manifest(
        artifact, name="direct", version=str(round_no), recipe="as-is", profile=None
    )
    ref = ArtifactRef(manifest.sha256, manifest.size, manifest.name, manifest.version)
    host, port = parse_broker_url(url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"direct-ctl-{round_no}")
    client.max_queued_messages_set(0)
    client.connect(host, port, keepalive=60)
    client.loop_start()
    needs0 = sim.counters.needs_sent
    verified0 = sim.counters.files_verified
    info = client.publish(topics.manifest(manifest.sha256), dump(manifest), qos=1, retain=True)
    for device in sim.device_ids:
        desired = Desired(generation=round_no, deployment_id=f"direct-{round_no}", artifact=ref)
        info = client.publish(topics.desired(device), dump(desired), qos=1, retain=True)
    info.wait_for_publish(30)
    publisher = helper(
        "--bare-publish", url, f"{DIRECT_ROOT}/artifacts/{manifest.sha256}/chunks", str(artifact)
    )
    try:
        wait_for(lambda: sim.counters.needs_sent - needs0 >= len(sim.agents), 60, "direct Needs")
        t0 = time.monotonic()
        send(publisher, "go")
        done = wait_for(
            lambda: sim.counters.files_verified - verified0 >= len(sim.agents), 300, "direct"
        )
        return done - t0
    finally:
        publisher.wait(30)
        client.disconnect()
        client.loop_stop()


# =========================================================================== (a) controller path


def controller_fanout(
    fleet: Fleet, controller: subprocess.Popen[str], sim: Simulation, artifact: Path
) -> dict[str, float]:
    """Deploy to every simulated agent; time until all verified the file, and the egress once
    the controller has stopped publishing (late re-publications count too)."""
    verified0 = sim.counters.files_verified
    chunks0 = sim.counters.chunks_received
    bytes0 = json.loads(send(controller, "stats"))["bytes_published"]
    n = len(sim.agents)
    t0 = time.monotonic()
    fleet.deploy(artifact, devices=sim.device_ids)
    first = wait_for(lambda: sim.counters.chunks_received > chunks0, 60, "the first chunk")
    done = wait_for(lambda: sim.counters.files_verified - verified0 >= n, 300, "all verified")
    # Let the controller finish whatever it still re-publishes, so it neither escapes the egress
    # count nor slows the next measurement down.
    settle(lambda: (sim.counters.bytes_received, send(controller, "stats")))
    return {
        "seconds": done - t0,
        "transfer_seconds": done - first,
        "egress_bytes": json.loads(send(controller, "stats"))["bytes_published"] - bytes0,
    }


def mosquitto_setting(handle: BrokerHandle, key: str) -> str:
    """A value from the generated mosquitto.conf (checks the queue-limit pitfall)."""
    assert handle.data_dir is not None
    for line in (handle.data_dir / "mosquitto.conf").read_text().splitlines():
        if line.startswith(key + " "):
            return line.split(" ", 1)[1]
    return "(mosquitto default)"


def main() -> None:
    """Alternate (a) and (b) for a few rounds and print the table and one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--size-mib", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--phases",
        default="abc",
        help="which measurements to run each round (a: controller, b: bare, c: agents only); "
        "the ratios need a and b, a single phase isolates its broker memory",
    )
    parser.add_argument(
        "--broker-config",
        default="",
        help="extra mosquitto.conf lines, ';'-separated (e.g. 'max_inflight_messages 4')",
    )
    parser.add_argument("--serve-controller", nargs=2, metavar=("HOME", "URL"), help=SUPPRESS)
    parser.add_argument("--bare-publish", nargs=3, metavar=("URL", "TOPIC", "FILE"), help=SUPPRESS)
    args = parser.parse_args()
    if args.serve_controller:
        serve_controller(Path(args.serve_controller[0]), args.serve_controller[1])
        return
    if args.bare_publish:
        bare_publisher(args.bare_publish[0], args.bare_publish[1], Path(args.bare_publish[2]))
        return
    size = int(args.size_mib * 1024 * 1024)
    work = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    # $SYS every second: mosquitto's own heap and store figures next to its RSS, per phase.
    extra = "\n".join(["sys_interval 1", *args.broker_config.split(";")])
    broker = start_mosquitto(work / "mosquitto", extra_config=extra)
    queued = mosquitto_setting(broker, "max_queued_messages")
    chunk_count = -(-size // DEFAULT_CHUNK_SIZE)
    print(
        f"mosquitto {broker.url}: max_queued_messages {queued}, max_inflight_messages "
        f"{mosquitto_setting(broker, 'max_inflight_messages')} ({chunk_count} chunks per artifact)"
    )
    if queued.isdigit() and int(queued) < chunk_count:
        raise SystemExit("max_queued_messages is below the chunk count: QoS1 chunks would drop")
    home = work / "controller"
    fleet = Fleet(home)  # creates the database before the controller process opens it
    controller = helper("--serve-controller", str(home), broker.url)
    sampler = Sampler(broker=broker.pid, controller=controller.pid, bench=os.getpid()).start()
    broker_sys = BrokerSys(broker.host, broker.port, sampler.now)
    phases: list[tuple[int, str, float, float]] = []  # (round, phase, t0, t1) on sampler time
    sim = Simulation(broker.url, args.devices, topic_root=TOPIC_ROOT, prefix="bench")
    sim.start()
    direct = Simulation(broker.url, args.devices, topic_root=DIRECT_ROOT, prefix="direct")
    direct.start()
    # Long-lived like the simulated agents' connections (warm sockets on both sides).
    subs = BareSubscribers(broker.url, args.devices, f"{TOPIC_ROOT}/bare/+/chunks/+")
    rows: list[dict[str, float]] = []
    try:
        assert sim.wait_connected(60), "simulated agents did not connect"
        assert direct.wait_connected(60), "simulated agents (direct) did not connect"
        wait_for(lambda: subs.subscribed == args.devices, 60, "bare subscriptions")
        wait_for(
            lambda: sum(d["online"] for d in fleet.devices()) == args.devices, 60, "registration"
        )
        for round_no in range(1, args.rounds + 1):
            artifact = work / f"artifact-{round_no}.tflite"
            make_artifact(artifact, size, seed=round_no)
            nan = float("nan")
            a: dict[str, float] = {"seconds": nan, "transfer_seconds": nan, "egress_bytes": nan}
            b = c = nan
            # Each phase's span is noted: the broker's memory is read per phase.
            if "a" in args.phases:
                t0 = sampler.now()
                a = controller_fanout(fleet, controller, sim, artifact)
                phases.append((round_no, "a", t0, sampler.now()))
            if "b" in args.phases:
                t0 = sampler.now()
                b = bare_fanout(broker.url, subs, artifact, size, round_no)
                phases.append((round_no, "b", t0, sampler.now()))
                settle(lambda: list(subs.received))
            if "c" in args.phases:
                t0 = sampler.now()
                c = direct_fanout(broker.url, direct, artifact, round_no)
                phases.append((round_no, "c", t0, sampler.now()))
                settle(lambda: direct.counters.bytes_received)
            t0 = sampler.now()
            time.sleep(3.0)  # a $SYS report after the round: what the broker keeps at rest
            phases.append((round_no, "rest", t0, sampler.now()))
            rows.append({**a, "bare_seconds": b, "direct_seconds": c, "round": round_no})
        stats = json.loads(send(controller, "stats"))
    finally:
        sim.stop()
        direct.stop()
        subs.close()
        send(controller, "stop")
        controller.wait(30)
        sampler.stop()
        broker_sys.close()
        fleet.close()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)  # the artifacts: rounds × size-mib

    print(
        f"\n{args.devices} agents, {size / 2**20:.1f} MiB artifact, "
        f"{DEFAULT_CHUNK_SIZE // 1024} KiB chunks, controller in its own process"
    )
    print(
        "round  (a) deploy→verified s  (a) first chunk→verified s  (b) bare s  (c) agents only s"
        "  (a)/(b)  (c)/(b)  egress/size"
    )
    for r in rows:
        print(
            f"{int(r['round']):5d}  {r['seconds']:21.3f}  {r['transfer_seconds']:26.3f}  "
            f"{r['bare_seconds']:10.3f}  {r['direct_seconds']:17.3f}  "
            f"{r['seconds'] / r['bare_seconds']:7.2f}  "
            f"{r['direct_seconds'] / r['bare_seconds']:7.2f}  {r['egress_bytes'] / size:11.2f}"
        )
    ratio = statistics.median(r["seconds"] / r["bare_seconds"] for r in rows)
    transfer_ratio = statistics.median(r["transfer_seconds"] / r["bare_seconds"] for r in rows)
    direct_ratio = statistics.median(r["direct_seconds"] / r["bare_seconds"] for r in rows)
    egress = statistics.median(r["egress_bytes"] / size for r in rows)
    print(f"(a)/(b), median of rounds: {ratio:.2f}   target <= 1.5")
    print(f"(a) first chunk→verified / (b), median: {transfer_ratio:.2f}")
    print(f"(c) agents only / (b), median: {direct_ratio:.2f}   (the simulated agents' own cost)")
    # Interference from other tenants only ever slows a run down: best of rounds as well.
    best = {k: min(r[k] for r in rows) for k in ("seconds", "bare_seconds", "direct_seconds")}
    print(
        f"best of rounds: (a) {best['seconds']:.3f} s, (b) {best['bare_seconds']:.3f} s, "
        f"(c) {best['direct_seconds']:.3f} s; "
        f"(a)/(b) {best['seconds'] / best['bare_seconds']:.2f}, "
        f"(c)/(b) {best['direct_seconds'] / best['bare_seconds']:.2f}"
    )
    print(f"controller bytes published / artifact size, median: {egress:.2f}   target ≈ 1")
    memory = phase_memory(sampler, broker_sys, phases)
    processes = sampler.summary()
    for name, figures in processes.items():
        print(f"{name}: peak RSS {figures['peak_rss_mib']:.1f} MiB, CPU {figures['cpu_s']:.1f} s")
    if subs.rejected:
        print(f"bare subscribers rejected {subs.rejected} chunks (sha256 mismatch)")
    snap = sim.snapshot()
    print(
        json.dumps(
            {
                "bench": "fanout",
                "devices": args.devices,
                "artifact_bytes": size,
                "chunk_bytes": DEFAULT_CHUNK_SIZE,
                "rounds": rows,
                "ratio_median": round(ratio, 3),
                "transfer_ratio_median": round(transfer_ratio, 3),
                "direct_ratio_median": round(direct_ratio, 3),
                "ratio_best_of_rounds": round(best["seconds"] / best["bare_seconds"], 3),
                "egress_over_size_median": round(egress, 3),
                "controller": stats,
                "chunks_rejected": snap["chunks_rejected"],
                "agents": {
                    k: snap[k]
                    for k in ("chunks_received", "chunks_accepted", "repair_rounds", "needs_sent")
                },
                # Self-test outcomes after verification: the profiles' latency budgets, which the
                # controller sends, fail an 8 MiB model on the 50 ms profiles (docs/simulate.md).
                "activated": snap["activated"],
                "failed": snap["failed"],
                "sim_rss_mib": snap["rss_mb"],
                "processes": processes,
                "mosquitto_max_queued_messages": queued,
                "broker_memory_by_phase": memory,
            }
        )
    )


if __name__ == "__main__":
    main()

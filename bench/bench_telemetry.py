"""Telemetry ingest: records the controller stores per second vs a bare subscriber, one run.

For each batch size B (records per message) and each round, 100 publishers (one paho client
each, in a separate process, as 100 devices would be) send the same QoS1 telemetry stream through
one mosquitto started with the generated config:
  (b) to one bare paho subscriber that only counts messages: the raw delivery rate, records/s;
  (a) to the real ControllerService, in a process of its own (as `edgefleet up`): parse,
      validate, dedupe by (device, seq), gap bookkeeping, batched insert into SQLite on disk;
      rate = records stored per second, read from the database by this process, so the
      COUNT(*) poll never shares the controller's GIL.
It prints one ratio and checks zero loss (every record stored exactly once):
  * stored records/s ÷ the bare subscriber's records/s of the same stream (records with
    records), target >= 0.5: how much of what the broker delivers the controller keeps up with
    (1.0 would be free ingest). (Before issue 20 the B=20 row divided records/s by messages/s,
    20× inflated: it could only fail below 2.5 % stored.)
plus the controller's and the broker's CPU seconds per second and peak RSS (bench/sampling.py).
B=1 is what devices send live (one record per interval); larger B is what they send when they
drain a spool after an outage (up to 150 per message). By default the publishers send as fast
as they can (a backlog: the controller's batches are full); `--rate N` paces them to N
messages/s in all, the shape of a fleet reporting steadily (issue 20: 10,000 devices every
10 s = 1,000 messages/s), where the controller keeps up and its batches are small. The bare
subscriber always gets the unpaced stream (the ceiling).

With `--against REF` each round also runs git REF's controller (its tree extracted to a
temporary directory, its own bench file's --serve mode, same broker, same stream, interleaved
with this tree's, the two taking turns going first), and the ratio this tree ÷ REF of stored
records/s and of controller CPU per record is printed from the one run.

Run: .venv/bin/python bench/bench_telemetry.py [--messages 20000] [--batches 1,20] [--rounds 2]
     [--against REF]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from argparse import SUPPRESS
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.protocol import (  # noqa: E402
    BUCKET_COUNT,
    LATENCY_BUCKETS_MS,
    LatencyStats,
    Telemetry,
    TelemetryRecord,
    Topics,
    dump,
)
from bench.sampling import Sampler  # noqa: E402
from controller.brokers.base import BrokerHandle, parse_broker_url  # noqa: E402
from controller.brokers.mosquitto import start_mosquitto  # noqa: E402
from controller.runtime.service import ControllerService  # noqa: E402
from controller.storage.sqlite import SqliteDatabase  # noqa: E402

PUBLISHERS = 100  # the fan-in: 100 devices publishing at once
# Polling period of the bench's clocks: small against runs that take seconds.
POLL_S = 0.02
SHA = "ab" * 32


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until predicate() is true; return the time it became true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL_S)
    return time.monotonic()


def make_record(seq: int) -> TelemetryRecord:
    """A realistic record: a 10 s interval of a model served at ~50 requests/s."""
    buckets = [0] * BUCKET_COUNT
    buckets[LATENCY_BUCKETS_MS.index(2.0)] = 400
    buckets[LATENCY_BUCKETS_MS.index(3.0)] = 90
    buckets[LATENCY_BUCKETS_MS.index(5.0)] = 10
    return TelemetryRecord(
        seq=seq,
        ts=time.time(),
        interval_s=10.0,
        model_sha256=SHA,
        served=LatencyStats(500, 1.8, 2.6, 4.1, 1.9, 4.7, tuple(buckets)),
        invocations=500,
        throughput_ips=50.0,
        rss_mb=84.2,
        peak_rss_mb=91.0,
        cpu_percent=37.5,
        power_source="estimate",
        power_estimated=True,
        temperature_c=51.0,
        power_w=4.2,
        energy_mj_per_inference=8.0,
    )


def publish_main(
    url: str, root: str, prefix: str, messages: int, batch: int, rate: float = 0.0
) -> None:
    """Child process: PUBLISHERS devices send `messages` telemetry messages in all, then exit;
    `rate` > 0: at that many messages/s in all (a fleet reporting steadily), else at once."""
    host, port = parse_broker_url(url)
    topics = Topics(root)
    per_device = messages // PUBLISHERS
    clients: list[paho.Client] = []
    payloads: list[list[bytes]] = []
    for i in range(PUBLISHERS):
        device = f"{prefix}-{i:03d}"
        seq = 1
        mine = []
        for _ in range(per_device):
            records = tuple(make_record(s) for s in range(seq, seq + batch))
            mine.append(dump(Telemetry(device, records)))
            seq += batch
        payloads.append(mine)
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device)
        client.connect(host, port, keepalive=60)
        client.loop_start()
        clients.append(client)
    wait_for(lambda: all(c.is_connected() for c in clients), 30, "publishers connected")
    print("ready", flush=True)
    sys.stdin.readline()  # "go"

    def send(i: int) -> None:
        topic = topics.telemetry(f"{prefix}-{i:03d}")
        infos = []
        for k, p in enumerate(payloads[i]):
            infos.append(clients[i].publish(topic, p, qos=1))
            if rate > 0:  # device i's k-th message is due at (k * PUBLISHERS + i) / rate
                time.sleep(max(0.0, started + (k * PUBLISHERS + i + 1) / rate - time.monotonic()))
        for info in infos:
            info.wait_for_publish(120)

    started = time.monotonic()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(PUBLISHERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"publish_s": time.monotonic() - started}), flush=True)
    for c in clients:
        c.disconnect()
        c.loop_stop()


class Publisher:
    """The publisher child process, started ready and released with go()."""

    def __init__(
        self, url: str, root: str, prefix: str, messages: int, batch: int, rate: float = 0.0
    ) -> None:
        """Start the child and wait until its clients are connected."""
        args = [
            sys.executable, __file__, "--publish", url, root, prefix, str(messages), str(batch),
            str(rate),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise SystemExit(f"publisher failed to start: {line!r}")

    def go(self) -> None:
        """Release the publishers."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def finish(self) -> float:
        """Wait for the child; seconds it took to publish everything."""
        assert self.proc.stdout is not None
        out = self.proc.stdout.readline()
        self.proc.wait(60)
        return float(json.loads(out)["publish_s"])


def bare_round(broker: BrokerHandle, root: str, messages: int, batch: int, tag: str) -> float:
    """(b): records/s a bare paho subscriber receives of the same stream."""
    host, port = parse_broker_url(broker.url)
    received: list[float] = []
    lock = threading.Lock()

    def on_message(client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        with lock:
            received.append(time.monotonic())

    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-{tag}")
    sub.on_message = on_message
    sub.connect(host, port)
    sub.subscribe(Topics(root).all_devices("telemetry"), qos=1)
    sub.loop_start()
    time.sleep(0.5)  # SUBACK
    publisher = Publisher(broker.url, root, f"b{tag}", messages, batch)
    publisher.go()
    wait_for(lambda: len(received) >= messages, 300, "bare delivery")
    publisher.finish()
    sub.disconnect()
    sub.loop_stop()
    if len(received) != messages:
        raise SystemExit(f"bare subscriber got {len(received)} of {messages} messages")
    elapsed = received[-1] - received[0]
    return messages * batch / elapsed


def serve_controller(home: Path, url: str, root: str, tag: str) -> None:
    """Subprocess mode: run the ControllerService until "stop" arrives on stdin."""
    service = ControllerService(home, url, topic_root=root, client_id=f"ctl-{tag}")
    service.start()
    if not service.ready.wait(15):
        print("not connected", flush=True)
        return
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(service.counters()), flush=True)
    service.stop()


def tree(ref: str, into: Path) -> Path:
    """git `ref`'s tree (the code and this bench as they were) extracted into `into`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "agent", "controller", "firmware_profiles",
         "bench"],
        check=True,
        capture_output=True,
    ).stdout  # fmt: skip
    into.mkdir(parents=True)
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def controller_round(
    broker: BrokerHandle, root: str, messages: int, batch: int, tag: str, work: Path,
    code: Path = ROOT, rate: float = 0.0,
) -> tuple[float, float, float]:  # fmt: skip
    """(a): records/s the ControllerService (own process, of the tree at `code`) stores;
    returns (rate, controller CPU seconds per second, broker CPU seconds per second)."""
    home = work / f"ctl-{tag}"
    proc = subprocess.Popen(
        [sys.executable, str(code / "bench" / "bench_telemetry.py"), "--serve", str(home),
         broker.url, root, tag],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=code,
        env={**os.environ, "PYTHONPATH": str(code)},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("controller did not connect")
    time.sleep(0.5)
    # Read only: the controller (maybe another tree's) owns the schema.
    db = SqliteDatabase(home / "edgefleet.db", migrate=False)
    expected = messages * batch

    def stored() -> int:
        return int(db.conn.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0])

    publisher = Publisher(broker.url, root, f"c{tag}", messages, batch, rate)
    sampler = Sampler(controller=proc.pid, broker=broker.pid).start()
    publisher.go()
    first = wait_for(lambda: stored() > 0, 120, "first stored record")
    t_first = sampler.now()
    at_first = stored()
    last = wait_for(lambda: stored() >= expected, 600, "every record stored")
    t_last = sampler.now()
    publisher.finish()
    time.sleep(1.0)  # anything more (a duplicate stored twice) would show now
    sampler.stop()
    count = stored()
    distinct = db.conn.execute(
        "SELECT COUNT(*) FROM (SELECT DISTINCT device_id, seq FROM telemetry)"
    ).fetchone()[0]
    proc.stdin.write("stop\n")
    proc.stdin.flush()
    proc.stdout.readline()  # its counters
    proc.wait(30)
    db.close()
    if count != expected or distinct != expected:
        raise SystemExit(f"stored {count} rows, {distinct} distinct, of {expected} records")
    # From the first commit on (the publishers' start-up is not the controller's time), counting
    # only the records committed after it.
    elapsed = last - first
    ctl_cpu = sampler.series["controller"].cpu_between(t_first, t_last)
    broker_cpu = sampler.series["broker"].cpu_between(t_first, t_last)
    span = max(t_last - t_first, 1e-9)
    return (expected - at_first) / elapsed, ctl_cpu / span, broker_cpu / span


def main() -> None:
    """Run the rounds and print the table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per round")
    parser.add_argument("--batches", default="1,20", help="records per message, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--against", help="git ref whose controller runs the same rounds")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="messages/s the publishers send in all (default 0: as fast as they can, a backlog)",
    )
    parser.add_argument("--publish", nargs=6, help=SUPPRESS)
    parser.add_argument("--serve", nargs=4, help=SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_controller(Path(args.serve[0]), args.serve[1], args.serve[2], args.serve[3])
        return
    if args.publish:
        url, root, prefix, messages, batch, rate = args.publish
        publish_main(url, root, prefix, int(messages), int(batch), float(rate))
        return
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ef-bench-tel-") as tmp:
        work = Path(tmp)
        other = tree(args.against, work / "against") if args.against else None
        broker = start_mosquitto(work / "broker")
        try:
            for batch in (int(b) for b in args.batches.split(",")):
                messages = args.messages // batch // PUBLISHERS * PUBLISHERS
                bare: list[float] = []
                ctl: list[float] = []
                cpu: list[float] = []
                broker_cpu: list[float] = []
                ref_ctl: list[float] = []
                ref_cpu: list[float] = []
                for r in range(args.rounds):
                    tag = f"{batch}-{r}"
                    bare.append(
                        bare_round(broker, f"bench/{tag}/edgefleet/v1", messages, batch, tag)
                    )
                    # With --against, the two trees take turns going first (no order bias).
                    for which in ("this", "ref") if r % 2 == 0 else ("ref", "this"):
                        if which == "this":
                            rate, cpu_share, broker_share = controller_round(
                                broker, f"bench/{tag}c/edgefleet/v1", messages, batch, tag, work,
                                rate=args.rate,
                            )  # fmt: skip
                            ctl.append(rate)
                            cpu.append(cpu_share)
                            broker_cpu.append(broker_share)
                        elif other is not None:
                            rate, cpu_share, _ = controller_round(
                                broker, f"bench/{tag}r/edgefleet/v1", messages, batch,
                                f"{tag}r", work, other, rate=args.rate,
                            )  # fmt: skip
                            ref_ctl.append(rate)
                            ref_cpu.append(cpu_share)
                same_stream = [c / b for c, b in zip(ctl, bare, strict=True)]
                row = {
                    "records_per_message": batch,
                    "messages": messages,
                    "records": messages * batch,
                    "bare_messages_per_s": statistics.median(bare) / batch,
                    "bare_records_per_s": statistics.median(bare),
                    "controller_records_per_s": statistics.median(ctl),
                    "ratio_to_bare_records": statistics.median(same_stream),
                    "controller_cpu_per_s": statistics.median(cpu),
                    "broker_cpu_per_s": statistics.median(broker_cpu),
                    "lost": 0,
                }
                if other is not None:
                    # CPU per record: CPU seconds per second ÷ records per second.
                    here_us = [c / r * 1e6 for c, r in zip(cpu, ctl, strict=True)]
                    there_us = [c / r * 1e6 for c, r in zip(ref_cpu, ref_ctl, strict=True)]
                    row["against"] = {
                        "ref": args.against,
                        "controller_records_per_s": statistics.median(ref_ctl),
                        "controller_cpu_us_per_record": statistics.median(there_us),
                        "this_cpu_us_per_record": statistics.median(here_us),
                        "rate_ratio": statistics.median(ctl) / statistics.median(ref_ctl),
                        "cpu_per_record_ratio": statistics.median(here_us)
                        / max(statistics.median(there_us), 1e-9),
                    }
                results.append(row)
                print(
                    f"B={batch:>3}  {messages:>6} msgs"
                    f"  bare {row['bare_messages_per_s']:>7.0f} msg/s"
                    f" = {row['bare_records_per_s']:>7.0f} rec/s"
                    f"  controller {row['controller_records_per_s']:>7.0f} rec/s stored"
                    f"  ÷ bare rec/s {row['ratio_to_bare_records']:.2f} (target >= 0.5)"
                    f"  CPU s/s: controller {row['controller_cpu_per_s']:.2f}"
                    f" broker {row['broker_cpu_per_s']:.2f}  lost 0",
                    flush=True,
                )
                if other is not None:
                    a = row["against"]
                    print(
                        f"       {args.against}: controller"
                        f" {a['controller_records_per_s']:>7.0f} rec/s stored;"
                        f" this tree ÷ {args.against}: rate {a['rate_ratio']:.2f}"
                        f" (target >= 0.9), CPU per record {a['this_cpu_us_per_record']:.0f}"
                        f" vs {a['controller_cpu_us_per_record']:.0f} µs"
                        f" = {a['cpu_per_record_ratio']:.2f}",
                        flush=True,
                    )
        finally:
            peak = psutil.Process(broker.pid).memory_info().rss / 2**20 if broker.pid else 0.0
            broker.stop()
    print(f"broker RSS at the end: {peak:.1f} MiB")
    print(
        json.dumps(
            {
                "broker_rss_mib": round(peak, 1),
                "rounds": args.rounds,
                "cpus": os.cpu_count(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()

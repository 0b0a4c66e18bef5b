"""Telemetry ingest with 1, 2 and 3 controller replicas on one broker and one PostgreSQL.

In one run, on one mosquitto started with the generated config:
  (b) the raw broker delivery rate: one bare paho subscriber counting the stream of
      bench_telemetry.py's 100 publisher processes (QoS1), records/s;
  (a) for N = 1, 2, 3: N real `edgefleet --db postgresql://… up --replica rI` processes on a
      fresh schema receive the same stream through `$share/edgefleet/…`; rate = records stored
      per second (first commit to last record, read from PostgreSQL), every record checked
      stored exactly once. CPU per replica, of the PostgreSQL server and of mosquitto is
      sampled from /proc over the same window.
Prints each rate as a ratio to (b), and CPU seconds per 1,000 records per part, the figures
the capacity estimate in bench/RESULTS.md is made from.

Run: .venv/bin/python bench/bench_replicas.py [--messages 20000] [--batches 1,20] [--replicas 1,2,3]
PostgreSQL: $EDGEFLEET_BENCH_PG, else the test server (scripts/ensure-postgres.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_telemetry import PUBLISHERS, Publisher, bare_round, wait_for  # noqa: E402
from controller.brokers.base import BrokerHandle  # noqa: E402
from controller.brokers.mosquitto import start_mosquitto  # noqa: E402
from controller.storage.db import with_search_path  # noqa: E402

PG_URL = os.environ.get(
    "EDGEFLEET_BENCH_PG", "postgresql://edgefleet:edgefleet@127.0.0.1:5432/edgefleet_test"
)
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of processes (gone ones count 0)."""
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def postgres_processes() -> list[psutil.Process]:
    """The PostgreSQL server's processes (postmaster and backends) on this machine."""
    names = ("postgres", "postmaster")
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] in names]


class Schema:
    """A fresh schema of its own for one round, dropped afterwards."""

    def __init__(self) -> None:
        """Create it."""
        self.name = f"bench_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {self.name}")
        self.url = with_search_path(PG_URL, self.name)
        self.conn = psycopg.connect(self.url, autocommit=True)

    def count(self) -> tuple[int, int]:
        """(rows, distinct (device, seq)) in the telemetry table; (0, 0) before migration."""
        try:
            row = self.conn.execute(
                "SELECT COUNT(*), COUNT(DISTINCT (device_id, seq)) FROM telemetry"
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0, 0
        assert row is not None
        return int(row[0]), int(row[1])

    def drop(self) -> None:
        """Drop the schema."""
        self.conn.close()
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {self.name} CASCADE")


def replica_round(
    broker: BrokerHandle, replicas: int, messages: int, batch: int, tag: str, work: Path
) -> dict[str, Any]:
    """(a) for N replicas: stored records/s, and CPU seconds per second of each part."""
    root = f"bench/{tag}/edgefleet/v1"
    schema = Schema()
    home = work / f"home-{tag}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(replicas):
            log = (work / f"replica-{tag}-{i}.log").open("ab")
            args = [
                EDGEFLEET, "--db", schema.url, "up", "--broker", broker.url, "--topic-root", root,
                "--home", str(home), "--replica", f"r{i}", "--stats-interval", "60",
            ]  # fmt: skip
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
        wait_for(lambda: _subscribed(schema, replicas), 60, f"{replicas} replicas up")
        time.sleep(1.0)  # SUBACKs of the last one
        expected = messages * batch
        publisher = Publisher(broker.url, root, f"p{tag}", messages, batch)
        mine = [psutil.Process(p.pid) for p in procs]
        pg = postgres_processes()
        mosquitto = [psutil.Process(broker.pid)] if broker.pid else []
        sender = [psutil.Process(publisher.proc.pid)]

        def sample() -> tuple[list[float], float, float, float]:
            """CPU seconds so far: each replica, PostgreSQL, mosquitto, the publishers."""
            return (
                [cpu_seconds([p]) for p in mine],
                cpu_seconds(pg),
                cpu_seconds(mosquitto),
                cpu_seconds(sender),
            )

        before = sample()
        publisher.go()
        first = wait_for(lambda: schema.count()[0] > 0, 120, "first stored record")
        at_first = schema.count()[0]
        last = wait_for(lambda: schema.count()[0] >= expected, 600, "every record stored")
        after = sample()
        publisher.finish()
        time.sleep(1.0)  # a duplicate stored twice would show now
        count, distinct = schema.count()
        if count != expected or distinct != expected:
            raise SystemExit(f"stored {count} rows, {distinct} distinct, of {expected} records")
        elapsed = last - first
        return {
            "replicas": replicas,
            "records_per_s": (expected - at_first) / elapsed,
            "replica_cpu_per_s": [
                (a - b) / elapsed for a, b in zip(after[0], before[0], strict=True)
            ],
            "postgres_cpu_per_s": (after[1] - before[1]) / elapsed,
            "mosquitto_cpu_per_s": (after[2] - before[2]) / elapsed,
            "publishers_cpu_per_s": (after[3] - before[3]) / elapsed,
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        schema.drop()


def _subscribed(schema: Schema, replicas: int) -> bool:
    """Whether `replicas` replicas have beaten their heartbeat (so are connected)."""
    try:
        row = schema.conn.execute("SELECT COUNT(*) FROM replicas").fetchone()
    except psycopg.errors.UndefinedTable:
        return False
    return row is not None and int(row[0]) >= replicas


def main() -> None:
    """Run the rounds and print the table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per round")
    parser.add_argument("--batches", default="1,20", help="records per message, comma-separated")
    parser.add_argument("--replicas", default="1,2,3", help="replica counts, comma-separated")
    args = parser.parse_args()
    psycopg.connect(PG_URL, connect_timeout=5).close()  # fail early, naming the server
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ef-bench-rep-") as tmp:
        work = Path(tmp)
        broker = start_mosquitto(work / "broker")
        try:
            for batch in (int(b) for b in args.batches.split(",")):
                messages = args.messages // batch // PUBLISHERS * PUBLISHERS
                records = messages * batch
                bare = bare_round(broker, f"bench/bare{batch}/edgefleet/v1", messages, batch,
                                  f"bare{batch}")  # fmt: skip
                print(f"B={batch:>3}  {messages} msgs  raw broker delivery "
                      f"{bare / batch:>7.0f} msg/s = {bare:>7.0f} rec/s", flush=True)  # fmt: skip
                for n in (int(r) for r in args.replicas.split(",")):
                    row = replica_round(broker, n, messages, batch, f"{batch}-{n}", work)
                    row |= {
                        "records_per_message": batch,
                        "messages": messages,
                        "records": records,
                        "bare_records_per_s": bare,
                        "ratio_to_bare": row["records_per_s"] / bare,
                        "lost": 0,
                    }
                    per_k = 1000 / row["records_per_s"]
                    row["cpu_s_per_1k_records"] = {
                        "replicas": sum(row["replica_cpu_per_s"]) * per_k,
                        "postgres": row["postgres_cpu_per_s"] * per_k,
                        "mosquitto": row["mosquitto_cpu_per_s"] * per_k,
                    }
                    results.append(row)
                    cpus = " ".join(f"{c:.2f}" for c in row["replica_cpu_per_s"])
                    k = row["cpu_s_per_1k_records"]
                    print(
                        f"B={batch:>3}  replicas {n}  stored {row['records_per_s']:>7.0f} rec/s"
                        f"  ÷ raw {row['ratio_to_bare']:.2f}"
                        f"  CPU s/s: replicas [{cpus}] postgres {row['postgres_cpu_per_s']:.2f}"
                        f" mosquitto {row['mosquitto_cpu_per_s']:.2f}"
                        f" publishers {row['publishers_cpu_per_s']:.2f}"
                        f"  CPU s per 1k rec: replicas {k['replicas']:.3f}"
                        f" postgres {k['postgres']:.3f} mosquitto {k['mosquitto']:.3f}  lost 0",
                        flush=True,
                    )
        finally:
            broker.stop()
    print(json.dumps({"cpus": os.cpu_count(), "results": results}))


if __name__ == "__main__":
    main()

"""SQLite's write lock between two threads of one process: the writer lock vs the busy handler.

Two threads, each with its own SqliteDatabase on one file, as the controller's telemetry thread
and service loop: "telemetry" commits batches of INSERTs back to back (each holds the write
lock a few ms), "service" commits one-row transactions. Measured: how long each thread waits
between asking for a transaction and having it (BEGIN IMMEDIATE done), and how many each
completes, once with the process-wide writer lock (controller/storage/sqlite.py) and once
without it (the lock replaced by a no-op: SQLite's busy handler, which sleeps between retries,
as before). Both modes run in this one process, alternating, so load affects them alike.

    .venv/bin/python bench/bench_writer_lock.py --seconds 3 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from controller.storage.sqlite import SqliteDatabase


class _NoLock:
    """Stands in for the writer lock: every wait goes to SQLite's busy handler."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return True

    def release(self) -> None:
        pass


def _worker(
    db: SqliteDatabase,
    rows: int,
    pause: float,
    stop: threading.Event,
    waits: list[float],
    done: list[int],
) -> None:
    """Commit transactions of `rows` INSERTs until stopped, `pause` s apart, timing each wait
    for BEGIN."""
    payload = [(i, "x" * 100) for i in range(rows)]
    while not stop.is_set():
        asked = time.perf_counter()
        with db.transaction() as tx:
            waits.append(time.perf_counter() - asked)
            tx.executemany("INSERT INTO t (v, s) VALUES (?, ?)", payload)
        done[0] += 1
        if pause:
            time.sleep(pause)


def run(path: Path, seconds: float, locked: bool) -> dict[str, Any]:
    """One round: both threads for `seconds`; their waits (ms) and transaction counts."""
    dbs = [SqliteDatabase(path), SqliteDatabase(path)]
    if not locked:
        for db in dbs:
            db._writer = _NoLock()  # type: ignore[assignment]
    stop = threading.Event()
    out: dict[str, Any] = {}
    threads = []
    # The service loop commits small transactions a few ms apart; telemetry back to back.
    for name, db, rows, pause in (("telemetry", dbs[0], 500, 0.0), ("service", dbs[1], 1, 0.002)):
        waits: list[float] = []
        done = [0]
        out[name] = (waits, done)
        threads.append(threading.Thread(target=_worker, args=(db, rows, pause, stop, waits, done)))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    for db in dbs:
        db.close()
    result = {}
    for name, (waits, done) in out.items():
        ms = sorted(w * 1000 for w in waits)
        result[name] = {
            "transactions": done[0],
            "wait_p50_ms": statistics.median(ms),
            "wait_p99_ms": ms[int(len(ms) * 0.99)],
            "wait_max_ms": ms[-1],
            "wait_total_s": sum(ms) / 1000,
        }
    return result


def main() -> None:
    """Alternate the two modes for --rounds rounds and print each round."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ef-bench-wl-") as tmp:
        for r in range(args.rounds):
            for locked in (True, False) if r % 2 == 0 else (False, True):
                path = Path(tmp) / f"r{r}-{locked}.db"
                db = SqliteDatabase(path)
                with db.transaction() as tx:
                    tx.execute("CREATE TABLE t (v INTEGER, s TEXT)")
                db.close()
                res = run(path, args.seconds, locked)
                mode = "writer lock " if locked else "busy handler"
                for name, x in res.items():
                    print(
                        f"round {r} {mode} {name:9}: {x['transactions']:6d} tx"
                        f"  wait p50 {x['wait_p50_ms']:7.3f} ms  p99 {x['wait_p99_ms']:7.2f} ms"
                        f"  max {x['wait_max_ms']:7.1f} ms  total {x['wait_total_s']:5.2f} s",
                        flush=True,
                    )


if __name__ == "__main__":
    main()

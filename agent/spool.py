"""Durable telemetry spool on the device: every record is on disk before anyone publishes it.

One SQLite file holds the records with their per-device sequence numbers, whether the broker
acknowledged them, the next sequence number and the count of records dropped on overflow. The
reporter adds one record per interval, publishes `pending()` records and marks them acked on
PUBACK; acked records stay (up to `keep_acked`) so the controller can ask for them again.

Sequence numbers are never reused: `next_seq` lives in the same transaction as the record, and a
small side file (`<spool>.seqfloor`) holds a number above every sequence ever issued, so even a
spool that had to be quarantined as corrupt continues above its predecessor (a reused number would
be discarded by the controller as a duplicate, silently losing a record).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from agent.fsutil import atomic_write_bytes
from agent.protocol import ProtocolError, SeqRange, TelemetryRecord, dump
from agent.protocol.schema import decode_dataclass

log = logging.getLogger(__name__)

Overflow = Literal["drop_oldest", "drop_newest"]

# Sequence numbers reserved in the side file at a time: one extra fsync'd write per 100 records
# (17 min at a 10 s interval). After a corrupt spool whose header cannot be read, at most this
# many numbers are skipped, which the controller then learns are `unavailable`.
SEQ_RESERVE_BLOCK = 100

# Most records one lookup() returns: 10 full telemetry messages. A resend request for a huge
# range costs at most this much work; the controller asks again for the rest.
MAX_LOOKUP_RECORDS = 2_000

# Seconds a writer waits for the file lock. Only this process uses the spool; the wait only
# matters if an operator opens the file with the sqlite3 shell meanwhile.
_BUSY_TIMEOUT_S = 5.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    acked INTEGER NOT NULL DEFAULT 0,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_state ON records (acked, seq);
"""

# SQLite result codes that mean the file is damaged, not busy or full.
_CORRUPTION_CODES = {getattr(sqlite3, "SQLITE_CORRUPT", 11), getattr(sqlite3, "SQLITE_NOTADB", 26)}


class SpoolError(RuntimeError):
    """The spool could not be opened or written even after starting a fresh file."""


@dataclass(frozen=True)
class SpoolStats:
    """How full the spool is and where its counters stand."""

    pending: int
    acked_kept: int
    dropped_total: int
    next_seq: int


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """Whether an SQLite error says the file is damaged (quarantine it) rather than busy/full."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        # sqlite_errorcode is the extended code (e.g. 779 SQLITE_CORRUPT_INDEX): the low byte
        # is the primary one.
        return (code & 0xFF) in _CORRUPTION_CODES
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


class TelemetrySpool:
    """Bounded, durable, sequence-numbering store of telemetry records (thread-safe)."""

    def __init__(
        self,
        path: Path,
        *,
        max_records: int,
        overflow: Overflow = "drop_oldest",
        keep_acked: int = 1_000,
    ) -> None:
        """Open (or create) the spool; a corrupt file is quarantined and a fresh one started.

        Problems found on the way (a quarantined file) are kept for `take_problems()`.
        """
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        if keep_acked < 0:
            raise ValueError(f"keep_acked must be >= 0, got {keep_acked}")
        if overflow not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"overflow must be 'drop_oldest' or 'drop_newest', got {overflow!r}")
        self.path = Path(path)
        self.max_records = max_records
        self.overflow: Overflow = overflow
        self.keep_acked = keep_acked
        self._floor_path = self.path.with_name(self.path.name + ".seqfloor")
        self._lock = threading.RLock()
        self._problems: list[str] = []
        self._conn = self._open_or_quarantine()

    # ------------------------------------------------------------------ opening

    def _connect(self) -> sqlite3.Connection:
        """Open the file, check it, and create the schema and counters if new."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: each commit is fsynced before add() returns. Under NORMAL a WAL commit can be
            # lost on power failure after the record was already published; the device would
            # then number its next record with the same seq, and the controller would drop that
            # one as a duplicate: a silent loss. One fsync per interval is cheap.
            conn.execute("PRAGMA synchronous=FULL")
            verdict = conn.execute("PRAGMA quick_check").fetchone()
            if verdict is None or verdict[0] != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {verdict}")
            conn.executescript(_SCHEMA)
            with self._transaction(conn):
                floor = self._read_floor()
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', ?)", (floor + 1,)
                )
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('dropped_total', 0)")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_or_quarantine(self) -> sqlite3.Connection:
        """Open the spool; on corruption move it aside, report it, and start a fresh one."""
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise SpoolError(f"cannot open telemetry spool {self.path}: {exc}") from exc
            self._quarantine(str(exc))
        try:
            return self._connect()
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot start a fresh telemetry spool {self.path}: {exc}") from exc

    def _quarantine(self, reason: str) -> None:
        """Move the damaged file (and its WAL) aside with a timestamp, keeping seq above it.

        A file that cannot be moved aside (read-only directory) is a SpoolError: starting over
        on top of it is impossible, and the caller must hear about it.
        """
        highest = self._salvage_highest_seq()
        if highest is not None:
            self._write_floor(max(highest, self._read_floor()))
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    os.replace(source, Path(f"{target}{suffix}"))
        except OSError as exc:
            raise SpoolError(f"corrupt telemetry spool {self.path} cannot be moved: {exc}") from exc
        message = (
            f"telemetry spool {self.path} is corrupt ({reason}); moved aside as {target.name} "
            f"and started afresh; its unsent records are lost"
        )
        log.error("%s", message)
        self._problems.append(message)

    def _salvage_highest_seq(self) -> int | None:
        """The highest seq the damaged file still admits to, if that part of it is readable.

        It only matters when the side file is gone too; the floor is never lowered by it.
        """
        conn = None
        try:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, timeout=0.5)
            row = conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            return int(row[0]) - 1 if row else None
        except (sqlite3.Error, TypeError, ValueError):
            return None
        finally:
            if conn is not None:
                conn.close()

    def _read_floor(self) -> int:
        """The number at or above every seq ever issued from this path (0 when new)."""
        try:
            return int(self._floor_path.read_text().strip())
        except (OSError, ValueError):
            return 0

    def _write_floor(self, value: int) -> None:
        """Persist a new floor (temp file, fsync, rename) before any seq above the old one."""
        atomic_write_bytes(self._floor_path, f"{value}\n".encode())

    @staticmethod
    @contextlib.contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _run(self, operation: Callable[[sqlite3.Connection], object]) -> object:
        """Run one operation; if the file turns out corrupt, quarantine it and run it again."""
        with self._lock:
            try:
                return operation(self._conn)
            except sqlite3.DatabaseError as exc:
                if not _is_corruption(exc):
                    raise
                reason = str(exc)
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._quarantine(reason)
            try:
                self._conn = self._connect()
            except sqlite3.Error as exc:
                raise SpoolError(
                    f"cannot start a fresh telemetry spool {self.path}: {exc}"
                ) from exc
            return operation(self._conn)

    def take_problems(self) -> list[str]:
        """Problems found since the last call (quarantined files), for the log and an event."""
        with self._lock:
            problems, self._problems = self._problems, []
        return problems

    def close(self) -> None:
        """Close the database (further calls fail)."""
        with self._lock:
            self._conn.close()

    # ------------------------------------------------------------------ writing

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> int:
        """One counter from the meta table."""
        return int(conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def add(self, build: Callable[[int], TelemetryRecord]) -> TelemetryRecord | None:
        """Number, build and durably store the next record; None when drop_newest refused it.

        The record is committed (fsynced) before this returns, so it exists on disk before
        anyone can publish it. A refused record still uses up its sequence number: the gap
        tells the controller an interval is missing, `unavailable` on a resend says it is gone,
        and `dropped_total` counts it, exactly as for a record dropped by drop_oldest.
        """
        result = self._run(lambda conn: self._add(conn, build))
        return result if isinstance(result, TelemetryRecord) else None

    def _add(
        self, conn: sqlite3.Connection, build: Callable[[int], TelemetryRecord]
    ) -> TelemetryRecord | None:
        """add() inside one transaction."""
        with self._transaction(conn):
            seq = self._meta(conn, "next_seq")
            dropped = self._meta(conn, "dropped_total")
            pending = conn.execute("SELECT count(*) FROM records WHERE acked = 0").fetchone()[0]
            excess = pending - self.max_records + 1
            if excess > 0 and self.overflow == "drop_newest":
                self._reserve(seq)
                conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
                conn.execute(
                    "UPDATE meta SET value = ? WHERE key = 'dropped_total'", (dropped + 1,)
                )
                log.warning("telemetry spool full: record %d dropped (drop_newest)", seq)
                return None
            if excess > 0:
                conn.execute(
                    "DELETE FROM records WHERE seq IN "
                    "(SELECT seq FROM records WHERE acked = 0 ORDER BY seq LIMIT ?)",
                    (excess,),
                )
                dropped += excess
                log.warning("telemetry spool full: %d oldest record(s) dropped", excess)
            record = build(seq)
            if record.seq != seq:
                raise ValueError(f"builder numbered the record {record.seq}, expected {seq}")
            record = replace(record, dropped_total=dropped)
            self._reserve(seq)
            conn.execute(
                "INSERT INTO records (seq, acked, body) VALUES (?, 0, ?)",
                (seq, dump(record).decode()),
            )
            conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'dropped_total'", (dropped,))
            return record

    def _reserve(self, seq: int) -> None:
        """Raise the side-file floor before `seq` is committed, if `seq` would pass it."""
        if seq > self._read_floor():
            self._write_floor(seq + SEQ_RESERVE_BLOCK - 1)

    def mark_acked(self, seqs: Iterable[int]) -> None:
        """Mark records acknowledged by the broker, then trim acked ones beyond keep_acked."""
        chosen = sorted(set(seqs))
        if not chosen:
            return

        def operation(conn: sqlite3.Connection) -> None:
            """Mark and trim in one transaction."""
            with self._transaction(conn):
                conn.executemany(
                    "UPDATE records SET acked = 1 WHERE seq = ? AND acked = 0",
                    [(s,) for s in chosen],
                )
                conn.execute(
                    "DELETE FROM records WHERE acked = 1 AND seq NOT IN "
                    "(SELECT seq FROM records WHERE acked = 1 ORDER BY seq DESC LIMIT ?)",
                    (self.keep_acked,),
                )

        self._run(operation)

    # ------------------------------------------------------------------ reading

    def _decode_rows(
        self, conn: sqlite3.Connection, rows: list[tuple[int, str]]
    ) -> list[TelemetryRecord]:
        """Decode stored records; one that no longer decodes is dropped, counted and reported."""
        records: list[TelemetryRecord] = []
        bad: list[int] = []
        for seq, body in rows:
            try:
                records.append(decode_dataclass(json.loads(body), TelemetryRecord))
            except (ValueError, ProtocolError) as exc:
                bad.append(seq)
                self._problems.append(f"telemetry record {seq} in {self.path} is unreadable: {exc}")
        if bad:
            with self._transaction(conn):
                conn.executemany("DELETE FROM records WHERE seq = ?", [(s,) for s in bad])
                conn.execute(
                    "UPDATE meta SET value = value + ? WHERE key = 'dropped_total'", (len(bad),)
                )
        return records

    def pending(self, limit: int) -> list[TelemetryRecord]:
        """Up to `limit` unacknowledged records, oldest first."""

        def operation(conn: sqlite3.Connection) -> list[TelemetryRecord]:
            """Select and decode."""
            rows = conn.execute(
                "SELECT seq, body FROM records WHERE acked = 0 ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            return self._decode_rows(conn, rows)

        return self._run(operation)  # type: ignore[return-value]

    def lookup(
        self, ranges: Sequence[SeqRange], limit: int = MAX_LOOKUP_RECORDS
    ) -> tuple[list[TelemetryRecord], list[SeqRange]]:
        """Records still held in `ranges` (acked or not), and the sub-ranges no longer held.

        Work is bounded by what the spool holds, never by the size of a range, and at most
        `limit` records are returned: past that, a range is answered up to the last record
        returned and the controller asks again for the rest. Sequence numbers not issued yet are
        neither held nor unavailable.
        """

        def operation(conn: sqlite3.Connection) -> tuple[list[TelemetryRecord], list[SeqRange]]:
            """Collect held records and holes range by range."""
            last_issued = self._meta(conn, "next_seq") - 1
            found: dict[int, TelemetryRecord] = {}
            missing: list[SeqRange] = []
            budget = limit
            for wanted in sorted(ranges, key=lambda r: r.first):
                last = min(wanted.last, last_issued)
                if wanted.first > last:
                    continue
                rows = conn.execute(
                    "SELECT seq, body FROM records WHERE seq BETWEEN ? AND ? ORDER BY seq LIMIT ?",
                    (wanted.first, last, budget + 1),
                ).fetchall()
                if len(rows) > budget:  # answer up to the last record that fits
                    rows = rows[:budget]
                    last = rows[-1][0] if rows else wanted.first - 1
                held = [seq for seq, _ in rows]
                for record in self._decode_rows(conn, rows):
                    found[record.seq] = record
                budget -= len(rows)
                cursor = wanted.first
                for seq in held:
                    if seq > cursor:
                        missing.append(SeqRange(cursor, seq - 1))
                    cursor = max(cursor, seq + 1)
                if cursor <= last:
                    missing.append(SeqRange(cursor, last))
                if budget <= 0:
                    break
            return [found[s] for s in sorted(found)], _merge(missing)

        return self._run(operation)  # type: ignore[return-value]

    def stats(self) -> SpoolStats:
        """Pending and kept-acked counts, dropped_total and the next sequence number."""

        def operation(conn: sqlite3.Connection) -> SpoolStats:
            """Count by state and read the counters."""
            counts = dict(
                conn.execute("SELECT acked, count(*) FROM records GROUP BY acked").fetchall()
            )
            return SpoolStats(
                pending=int(counts.get(0, 0)),
                acked_kept=int(counts.get(1, 0)),
                dropped_total=self._meta(conn, "dropped_total"),
                next_seq=self._meta(conn, "next_seq"),
            )

        return self._run(operation)  # type: ignore[return-value]


def _merge(ranges: list[SeqRange]) -> list[SeqRange]:
    """Sorted, overlapping or adjacent ranges joined."""
    merged: list[SeqRange] = []
    for item in sorted(ranges, key=lambda r: r.first):
        if merged and item.first <= merged[-1].last + 1:
            if item.last > merged[-1].last:
                merged[-1] = SeqRange(merged[-1].first, item.last)
        else:
            merged.append(item)
    return merged

"""Tests for agent.spool on real SQLite files: numbering, overflow, retention, crashes."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.protocol import SeqRange, TelemetryRecord
from agent.spool import SEQ_RESERVE_BLOCK, SpoolError, TelemetrySpool
from tests.paths import REPO_ROOT

pytestmark = pytest.mark.agent

REPO = REPO_ROOT


def record(seq: int, *, rss_mb: float = 10.0) -> TelemetryRecord:
    """A minimal valid record numbered `seq`."""
    return TelemetryRecord(
        seq=seq,
        ts=1_700_000_000.0 + seq,
        interval_s=10.0,
        model_sha256=None,
        served=None,
        invocations=0,
        throughput_ips=0.0,
        rss_mb=rss_mb,
        peak_rss_mb=rss_mb,
        cpu_percent=1.0,
        power_source="estimated",
        power_estimated=True,
    )


def spool_at(path: Path, **kwargs: object) -> TelemetrySpool:
    """A spool with roomy defaults that a test overrides."""
    options: dict[str, object] = {"max_records": 1_000, "overflow": "drop_oldest", "keep_acked": 10}
    options.update(kwargs)
    return TelemetrySpool(path, **options)  # type: ignore[arg-type]


def add_n(spool: TelemetrySpool, n: int) -> list[TelemetryRecord | None]:
    """Add n records; the results (None for refused ones)."""
    return [spool.add(record) for _ in range(n)]


def seqs(records: list[TelemetryRecord]) -> list[int]:
    """The sequence numbers of records."""
    return [r.seq for r in records]


def test_sequence_is_monotonic_across_reopen(tmp_path: Path) -> None:
    """Numbers continue after closing and reopening the file, and are stored with the record."""
    path = tmp_path / "telemetry.db"
    spool = spool_at(path)
    assert seqs([r for r in add_n(spool, 3) if r]) == [1, 2, 3]
    spool.close()
    spool = spool_at(path)
    assert seqs([r for r in add_n(spool, 2) if r]) == [4, 5]
    assert seqs(spool.pending(100)) == [1, 2, 3, 4, 5]
    assert spool.stats().next_seq == 6


def test_sequence_never_reused_after_everything_is_deleted(tmp_path: Path) -> None:
    """All records acked and trimmed (keep_acked=0): the next record still gets a new number."""
    path = tmp_path / "telemetry.db"
    spool = spool_at(path, keep_acked=0)
    add_n(spool, 4)
    spool.mark_acked([1, 2, 3, 4])
    stats = spool.stats()
    assert (stats.pending, stats.acked_kept) == (0, 0)
    spool.close()
    spool = spool_at(path, keep_acked=0)
    added = spool.add(record)
    assert added is not None and added.seq == 5


def test_sequence_stays_above_a_deleted_spool_file(tmp_path: Path) -> None:
    """Someone deletes telemetry.db: the side-file floor keeps new numbers above the old ones."""
    path = tmp_path / "telemetry.db"
    spool = spool_at(path)
    add_n(spool, 3)
    spool.close()
    for leftover in tmp_path.glob("telemetry.db*"):
        if not leftover.name.endswith(".seqfloor"):
            leftover.unlink()
    spool = spool_at(path)
    added = spool.add(record)
    assert added is not None and 3 < added.seq <= 3 + SEQ_RESERVE_BLOCK


def test_builder_gets_the_seq_and_spool_sets_dropped_total(tmp_path: Path) -> None:
    """The builder must number the record as told; dropped_total is the spool's, not its own."""
    spool = spool_at(tmp_path / "t.db")
    with pytest.raises(ValueError, match="expected 1"):
        spool.add(lambda seq: record(seq + 1))
    assert spool.stats().next_seq == 1  # the failed add left nothing behind
    added = spool.add(lambda seq: record(seq))
    assert added is not None and (added.seq, added.dropped_total) == (1, 0)


def test_drop_oldest_keeps_the_newest_five_and_counts_drops(tmp_path: Path) -> None:
    """A tiny spool (max_records=5) offline for 12 intervals keeps seqs 8..12, 7 dropped."""
    spool = spool_at(tmp_path / "t.db", max_records=5, overflow="drop_oldest")
    results = add_n(spool, 12)
    assert all(r is not None for r in results)
    assert seqs(spool.pending(100)) == [8, 9, 10, 11, 12]
    stats = spool.stats()
    assert (stats.pending, stats.dropped_total, stats.next_seq) == (5, 7, 13)
    # Each record carries the drops counted before it was stored.
    assert [r.dropped_total for r in results if r] == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert [r.dropped_total for r in spool.pending(100)] == [3, 4, 5, 6, 7]


def test_drop_newest_keeps_the_first_five(tmp_path: Path) -> None:
    """drop_newest refuses new records: 1..5 stay, 6..12 are used up and counted as dropped."""
    spool = spool_at(tmp_path / "t.db", max_records=5, overflow="drop_newest")
    results = add_n(spool, 12)
    assert [r is not None for r in results] == [True] * 5 + [False] * 7
    assert seqs(spool.pending(100)) == [1, 2, 3, 4, 5]
    assert spool.stats().dropped_total == 7
    # Once the broker has them, there is room again; the next record reports the drops.
    spool.mark_acked([1, 2, 3, 4, 5])
    added = spool.add(record)
    assert added is not None and (added.seq, added.dropped_total) == (13, 7)
    _, unavailable = spool.lookup([SeqRange(1, 13)])
    assert unavailable == [SeqRange(6, 12)]


def test_dropped_total_survives_reopen(tmp_path: Path) -> None:
    """The drop counter is persisted with the records."""
    path = tmp_path / "t.db"
    spool = spool_at(path, max_records=2)
    add_n(spool, 5)
    spool.close()
    spool = spool_at(path, max_records=2)
    added = spool.add(record)
    assert added is not None and added.dropped_total == 4 == spool.stats().dropped_total


def test_acked_records_are_kept_up_to_keep_acked_oldest_deleted_first(tmp_path: Path) -> None:
    """Acked records stay for resends (3 newest kept); pending ones are never trimmed."""
    spool = spool_at(tmp_path / "t.db", keep_acked=3)
    add_n(spool, 10)
    spool.mark_acked([1, 2, 3, 4, 5, 6])
    stats = spool.stats()
    assert (stats.pending, stats.acked_kept) == (4, 3)
    assert seqs(spool.pending(100)) == [7, 8, 9, 10]
    held, unavailable = spool.lookup([SeqRange(1, 10)])
    assert seqs(held) == [4, 5, 6, 7, 8, 9, 10]
    assert unavailable == [SeqRange(1, 3)]
    spool.mark_acked([7, 8])  # acking again or out of order is harmless
    spool.mark_acked([8, 4])
    assert seqs(spool.lookup([SeqRange(1, 10)])[0]) == [6, 7, 8, 9, 10]


def test_pending_respects_limit_and_order(tmp_path: Path) -> None:
    """pending(limit) gives the oldest unacknowledged records first."""
    spool = spool_at(tmp_path / "t.db")
    add_n(spool, 8)
    spool.mark_acked([2, 5])
    assert seqs(spool.pending(3)) == [1, 3, 4]


def test_lookup_mixes_held_and_unavailable_ranges(tmp_path: Path) -> None:
    """Holes inside and around ranges are unavailable; unissued numbers are neither."""
    spool = spool_at(tmp_path / "t.db", max_records=4)
    add_n(spool, 10)  # 1..6 dropped, 7..10 held
    held, unavailable = spool.lookup([SeqRange(2, 3), SeqRange(5, 8), SeqRange(10, 50)])
    assert seqs(held) == [7, 8, 10]
    assert unavailable == [SeqRange(2, 3), SeqRange(5, 6)]
    assert spool.lookup([SeqRange(11, 20)]) == ([], [])


def test_lookup_of_a_huge_range_is_capped(tmp_path: Path) -> None:
    """Range 1..10^12 costs what the spool holds; the limit cuts the answer, not the range."""
    spool = spool_at(tmp_path / "t.db", max_records=30)
    add_n(spool, 40)  # 1..10 dropped, 11..40 held
    held, unavailable = spool.lookup([SeqRange(1, 10**12)], limit=25)
    assert seqs(held) == list(range(11, 36))
    assert unavailable == [SeqRange(1, 10)]  # 36..40 neither: the controller asks again
    held, unavailable = spool.lookup([SeqRange(1, 10**12)])
    assert seqs(held) == list(range(11, 41)) and unavailable == [SeqRange(1, 10)]


def test_corrupt_file_is_quarantined_and_numbering_continues(tmp_path: Path) -> None:
    """Garbage where the spool was: moved aside with a timestamp, reported, seqs stay unique."""
    path = tmp_path / "telemetry.db"
    spool = spool_at(path)
    add_n(spool, 7)
    spool.close()
    for leftover in tmp_path.glob("telemetry.db-*"):
        leftover.unlink()  # a clean close checkpoints; make sure only the main file matters
    path.write_bytes(b"this is not an SQLite database" * 200)

    spool = spool_at(path)
    problems = spool.take_problems()
    assert len(problems) == 1 and "corrupt" in problems[0]
    quarantined = list(tmp_path.glob("telemetry.db.corrupt-*"))
    assert len(quarantined) == 1
    assert quarantined[0].read_bytes().startswith(b"this is not")
    added = spool.add(record)
    assert added is not None and 7 < added.seq <= 7 + SEQ_RESERVE_BLOCK
    assert spool.take_problems() == []


def test_damaged_pages_are_detected_on_open(tmp_path: Path) -> None:
    """Garbage over the table pages (header intact): quick_check catches it; fresh spool."""
    path = tmp_path / "telemetry.db"
    spool = spool_at(path)
    for _ in range(60):
        spool.add(lambda seq: record(seq, rss_mb=float(seq)))
    spool.close()
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 3 * page
    data[page : len(data)] = b"\xa5" * (len(data) - page)
    path.write_bytes(bytes(data))

    spool = spool_at(path)
    assert any("corrupt" in p for p in spool.take_problems())
    added = spool.add(record)
    assert added is not None and added.seq > 60
    assert spool.stats().pending == 1


def test_unopenable_location_raises_spool_error(tmp_path: Path) -> None:
    """A path that cannot hold a database at all is an error the caller sees, not a loop."""
    blocker = tmp_path / "dir-not-file"
    blocker.mkdir()
    with pytest.raises(SpoolError):
        TelemetrySpool(blocker, max_records=5, overflow="drop_oldest", keep_acked=1)


def test_invalid_options_are_refused(tmp_path: Path) -> None:
    """Bounds that make no sense are programming errors."""
    with pytest.raises(ValueError):
        spool_at(tmp_path / "a.db", max_records=0)
    with pytest.raises(ValueError):
        spool_at(tmp_path / "b.db", keep_acked=-1)
    with pytest.raises(ValueError):
        spool_at(tmp_path / "c.db", overflow="drop_random")


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from agent.spool import TelemetrySpool
    from tests.unit.agent.test_spool import record

    spool = TelemetrySpool(Path({path!r}), max_records=50, overflow="drop_oldest", keep_acked=20)
    n = 0
    while True:
        added = spool.add(record)
        n += 1
        if n % 3 == 0:
            spool.mark_acked([r.seq for r in spool.pending(3)])
        print(added.seq, flush=True)
    """
)


@pytest.mark.parametrize("kills", [6])
def test_writer_killed_mid_write_leaves_a_consistent_spool(tmp_path: Path, kills: int) -> None:
    """SIGKILL a writing child again and again: every reported record is on disk, seqs unique.

    The child prints a seq only after add() returned, so each printed seq must be stored; the
    next child continues above everything the previous one issued.
    """
    path = tmp_path / "telemetry.db"
    printed: list[int] = []
    for round_ in range(kills):
        child = subprocess.Popen(
            [sys.executable, "-c", _WRITER.format(repo=str(REPO), path=str(path))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        target = 15 + 7 * round_  # vary the moment of the kill
        for got, line in enumerate(child.stdout, start=1):
            printed.append(int(line))
            if got >= target:
                break
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        for line in child.stdout:  # anything printed before the kill landed
            if line.strip():
                printed.append(int(line))

    assert printed == sorted(set(printed)), "a sequence number was issued twice or out of order"
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    spool = spool_at(path, max_records=50, keep_acked=20)
    stats = spool.stats()
    assert stats.next_seq > printed[-1]
    assert stats.dropped_total == 0  # never full: the writer acks as fast as it adds
    held, _ = spool.lookup([SeqRange(1, stats.next_seq - 1)])
    held_seqs = seqs(held)
    # The writer acks oldest first and only the oldest acked are trimmed, so what is held is one
    # unbroken run ending at the last issued number: no half-written or orphaned record.
    assert held_seqs == list(range(held_seqs[0], stats.next_seq))
    assert all(s in held_seqs or s < held_seqs[0] for s in printed)
    assert stats.pending + stats.acked_kept == len(held_seqs)
    assert stats.acked_kept <= 20


@pytest.mark.parametrize(("code", "corrupt"), [(11, True), (779, True), (26, True), (5, False)])
def test_extended_sqlite_codes_are_read_by_their_primary_code(code: int, corrupt: bool) -> None:
    """SQLITE_CORRUPT_INDEX (779) is corruption; SQLITE_BUSY (5) is not."""
    from agent.spool import _is_corruption

    exc = sqlite3.DatabaseError("disk image problem")
    exc.sqlite_errorcode = code  # type: ignore[attr-defined]
    assert _is_corruption(exc) is corrupt

"""How the telemetry thread drains its inbox into batches (runtime/telemetry_ingest.py, drain)."""

from __future__ import annotations

import queue

from controller.runtime.telemetry_ingest import Inboxed, drain
from controller.runtime.tuning import TELEMETRY_LINGER_S


def _item(i: int) -> Inboxed:
    return (f"t/{i}", b"", None)


def test_messages_arriving_during_the_linger_join_the_batch() -> None:
    """At 1,000 one-record messages/s most batches held one message, each its own transaction
    (~170 µs of CPU): after the first message the thread waits for more."""
    inbox: queue.Queue[Inboxed] = queue.Queue()
    inbox.put(_item(0))
    slept: list[float] = []

    def sleep(seconds: float) -> None:  # the next messages arrive while the thread waits
        slept.append(seconds)
        for i in (1, 2, 3):
            inbox.put(_item(i))

    batch = drain(inbox, 0.05, 100, TELEMETRY_LINGER_S, sleep=sleep)
    assert [t for t, _, _ in batch] == ["t/0", "t/1", "t/2", "t/3"]
    assert slept == [TELEMETRY_LINGER_S]
    assert TELEMETRY_LINGER_S > 0


def test_a_backlog_of_a_full_batch_does_not_wait() -> None:
    inbox: queue.Queue[Inboxed] = queue.Queue()
    for i in range(5):
        inbox.put(_item(i))
    slept: list[float] = []
    batch = drain(inbox, 0.05, 4, TELEMETRY_LINGER_S, sleep=slept.append)
    assert [t for t, _, _ in batch] == ["t/0", "t/1", "t/2", "t/3"]
    assert slept == []
    assert inbox.qsize() == 1


def test_an_empty_inbox_gives_an_empty_batch_without_lingering() -> None:
    slept: list[float] = []
    assert drain(queue.Queue(), 0.0, 4, TELEMETRY_LINGER_S, sleep=slept.append) == []
    assert slept == []

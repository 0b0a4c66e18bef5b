"""The telemetry reporter: one durable record per interval, published until the broker has it.

Every `interval_s` the reporter closes the interval (serving metrics, process figures, device
temperature, device power over the interval), stores the record in the spool (on disk before
anything is sent), then publishes whatever the spool holds unacknowledged, oldest first, QoS1.
A record is marked acknowledged only after the broker's PUBACK; anything not acknowledged is
sent again later (the controller de-duplicates by sequence number). Nothing is published while
the session is down; `wake()` (called on reconnect) drains the backlog at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.environment import read_temperature_c
from agent.metrics import IntervalStats, ProcessSampler, ServingMetrics
from agent.power import EnergyReading, PowerSource
from agent.protocol import (
    MAX_TELEMETRY_BYTES,
    MAX_TELEMETRY_RECORDS,
    ProtocolError,
    SeqRange,
    Telemetry,
    TelemetryRecord,
    dump,
)
from agent.protocol.transport import MqttSession
from agent.spool import TelemetrySpool

log = logging.getLogger(__name__)

# How long one telemetry PUBLISH may wait for its PUBACK: as long as the agent's update events
# wait; a slower broker is treated as not having the message, and it is sent again later.
PUBACK_WAIT_S = 10.0

# After a PUBLISH went unacknowledged on a live connection, try again after this long rather
# than only at the next interval (which can be minutes when configured so).
RETRY_S = 5.0

MAX_MESSAGE_BYTES = MAX_TELEMETRY_BYTES  # AWS IoT Core's payload limit (protocol/limits.py)

# At shutdown, publishing the final record must not hold the agent up for long: what does not go
# out in this time is sent after the next start (it is in the spool).
STOP_FLUSH_BUDGET_S = 2.0


class TelemetryReporter:
    """Background thread: collect a record every interval, spool it, publish the backlog."""

    def __init__(
        self,
        *,
        session: MqttSession,
        topic: str,
        device_id: str,
        spool: TelemetrySpool,
        metrics: ServingMetrics,
        model_sha: Callable[[], str | None],
        power_source: Callable[[], PowerSource],
        interval_s: float,
        sampler: ProcessSampler | None = None,
        sysfs_root: Path = Path("/sys"),
        on_problem: Callable[[str], None] | None = None,
        puback_wait_s: float = PUBACK_WAIT_S,
    ) -> None:
        """Wire the parts together; nothing runs until start().

        `on_problem` receives messages worth an error event (a quarantined spool, a record that
        could not be stored); it is called from the reporter's thread.
        """
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.session = session
        self.topic = topic
        self.device_id = device_id
        self.spool = spool
        self.metrics = metrics
        self.interval_s = interval_s
        self.sysfs_root = sysfs_root
        self.puback_wait_s = puback_wait_s
        self._model_sha = model_sha
        self._make_power_source = power_source
        self._sampler = sampler or ProcessSampler()
        self._on_problem = on_problem
        self._collect_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._power: PowerSource | None = None
        self._power_token: object | None = None
        self._open_power_window()
        self._report_problems()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the reporter thread (once)."""
        if self._thread is not None:
            raise RuntimeError("TelemetryReporter already started")
        self._stopping.clear()
        with self._collect_lock:
            if self._power_token is None:  # restarted after stop(): measure power again
                self._open_power_window()
        self._thread = threading.Thread(target=self._run, name="edgefleet-telemetry", daemon=True)
        self._thread.start()

    def stop(self, flush_budget_s: float = STOP_FLUSH_BUDGET_S) -> None:
        """Stop the thread, spool a final record of the partial interval, briefly try to send.

        Whatever is not acknowledged within `flush_budget_s` stays in the spool for next time.
        """
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._collect(reopen_power=False)  # no sampler thread left running after stop
        self.flush(flush_budget_s)

    def wake(self) -> None:
        """Flush soon (call from the session's on_connect); never blocks."""
        self._wake.set()

    def _run(self) -> None:
        """Collect on schedule, flush after each record and whenever woken."""
        next_due = time.monotonic() + self.interval_s
        retry_at: float | None = None
        while not self._stopping.is_set():
            now = time.monotonic()
            deadline = next_due if retry_at is None else min(next_due, retry_at)
            self._wake.wait(max(0.0, deadline - now))
            self._wake.clear()
            if self._stopping.is_set():
                break
            now = time.monotonic()
            drained = False
            try:
                if now >= next_due:
                    self.collect_now()
                    # Skip intervals the thread slept through instead of collecting a burst.
                    while next_due <= now:
                        next_due += self.interval_s
                drained = self._flush_all()
            except Exception:  # a bug here must not end telemetry for the agent's lifetime
                log.exception("telemetry collection or flush failed")
            retry_at = None if drained else time.monotonic() + min(RETRY_S, self.interval_s)

    # ------------------------------------------------------------------ collecting

    def _open_power_window(self) -> None:
        """Start measuring power for the next interval (a fresh source if the last one failed)."""
        try:
            if self._power is None:
                self._power = self._make_power_source()
            self._power_token = self._power.start()
        except Exception as exc:  # a sensor that vanished must not stop telemetry
            log.warning("power measurement unavailable: %s", exc)
            self._power, self._power_token = None, None

    def _close_power_window(self) -> tuple[EnergyReading | None, str, bool]:
        """End the interval's power window: (reading or None, source label, estimated)."""
        source, token = self._power, self._power_token
        self._power_token = None
        if source is None or token is None:
            return None, "unavailable", False
        label = str(getattr(source, "label", source.name))
        try:
            reading = source.stop(token)
        except Exception as exc:
            log.warning("power reading failed: %s", exc)
            self._power = None  # rebuilt (re-detected) for the next window
            return None, label, bool(source.estimated)
        return reading, reading.source, reading.estimated

    def collect_now(self) -> TelemetryRecord | None:
        """Close the current interval into a spooled record; None if the spool refused it.

        Call it also when the served model changes, so that no record mixes two models.
        """
        return self._collect(reopen_power=True)

    def _collect(self, *, reopen_power: bool) -> TelemetryRecord | None:
        """collect_now(); without `reopen_power` no new power window starts (at stop)."""
        with self._collect_lock:
            stats = self.metrics.snapshot_and_reset()
            reading, power_label, estimated = self._close_power_window()
            if reopen_power:
                self._open_power_window()
            try:
                sample = self._sampler.sample()
                temperature = read_temperature_c(self.sysfs_root)
                sha = self._model_sha()
                record = self.spool.add(
                    lambda seq: build_record(
                        seq,
                        stats,
                        reading=reading,
                        power_label=power_label,
                        power_estimated=estimated,
                        model_sha256=sha,
                        rss_mb=sample.rss_mb,
                        peak_rss_mb=sample.peak_rss_mb,
                        cpu_percent=sample.cpu_percent,
                        temperature_c=temperature,
                    )
                )
            except Exception as exc:
                message = f"telemetry record for the last {stats.seconds:.1f} s not stored: {exc}"
                log.exception("%s", message)
                self._problem(message)
                record = None
            self._report_problems()
            return record

    # ------------------------------------------------------------------ publishing

    def flush(self, budget_s: float | None = None) -> int:
        """Publish pending records until none are left or one is not acknowledged; count acked.

        With `budget_s`, no new message is started after that many seconds.
        """
        return self._flush(budget_s)[0]

    def _flush_all(self) -> bool:
        """flush() from the thread; True when the spool has nothing pending left."""
        return self._flush(None)[1]

    def _flush(self, budget_s: float | None) -> tuple[int, bool]:
        """Publish the backlog in capped messages; (records acknowledged, fully drained)."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        acked = 0
        with self._publish_lock:
            while self.session.connected.is_set():
                batch = self.spool.pending(MAX_TELEMETRY_RECORDS)
                if not batch:
                    return acked, True
                for payload, seqs in self._messages(batch, ()):
                    if deadline is not None and time.monotonic() > deadline:
                        return acked, False
                    if deadline is None and self._stopping.is_set():
                        return acked, False  # stop() takes over with its own short budget
                    if not self._publish(payload):
                        return acked, False
                    self.spool.mark_acked(seqs)
                    acked += len(seqs)
        return acked, False

    def resend(self, ranges: Sequence[SeqRange]) -> int:
        """Answer a resend_telemetry command: held records of `ranges`, plus `unavailable`.

        Blocks for the PUBACKs (call it from a worker thread, not paho's network thread);
        returns the number of messages acknowledged. Held records it delivers count as acked.
        Nothing is sent while disconnected: the controller asks again.
        """
        records, unavailable = self.spool.lookup(ranges)
        if not records and not unavailable:
            return 0
        sent = 0
        with self._publish_lock:
            for payload, seqs in self._messages(records, unavailable):
                if not self.session.connected.is_set() or not self._publish(payload):
                    break
                self.spool.mark_acked(seqs)
                sent += 1
        return sent

    def _publish(self, payload: bytes) -> bool:
        """One QoS1 PUBLISH; True only when its PUBACK arrived."""
        return self.session.publish(self.topic, payload, qos=1, wait_s=self.puback_wait_s)

    def _messages(
        self, records: Sequence[TelemetryRecord], unavailable: Sequence[SeqRange]
    ) -> list[tuple[bytes, list[int]]]:
        """Payloads of at most MAX_TELEMETRY_RECORDS records and MAX_MESSAGE_BYTES bytes each."""
        messages: list[tuple[bytes, list[int]]] = []
        missing = list(unavailable)
        remaining = list(records)
        while remaining or missing:
            head = remaining[:MAX_TELEMETRY_RECORDS]
            gone = tuple(missing[:MAX_TELEMETRY_RECORDS])
            while True:
                try:
                    message = Telemetry(self.device_id, records=tuple(head), unavailable=gone)
                    payload = dump(message)
                    if len(payload) <= MAX_MESSAGE_BYTES or len(head) <= 1:
                        break
                except ProtocolError:  # over MAX_JSON_BYTES
                    if len(head) <= 1:
                        raise
                head = head[: max(1, len(head) * 3 // 4)]  # too big: fewer records per message
            messages.append((payload, [r.seq for r in head]))
            remaining = remaining[len(head) :]
            missing = missing[len(gone) :]
        return messages

    # ------------------------------------------------------------------ problems

    def _problem(self, message: str) -> None:
        """Hand a problem to the owner (an error event), never raising into the thread."""
        if self._on_problem is None:
            return
        try:
            self._on_problem(message)
        except Exception:
            log.exception("on_problem handler failed")

    def _report_problems(self) -> None:
        """Forward the spool's problems (e.g. a quarantined file)."""
        for message in self.spool.take_problems():
            self._problem(message)


def build_record(
    seq: int,
    stats: IntervalStats,
    *,
    reading: EnergyReading | None,
    power_label: str,
    power_estimated: bool,
    model_sha256: str | None,
    rss_mb: float,
    peak_rss_mb: float,
    cpu_percent: float,
    temperature_c: float | None,
    ts: float | None = None,
) -> TelemetryRecord:
    """One interval's TelemetryRecord (power and energy as defined in docs/telemetry.md).

    power_w is the average device power over the interval; energy_mj_per_inference is that
    power times the mean served latency (W × ms = mJ), as the benchmark defines it; None when
    nothing was served or no power figure exists.
    """
    seconds = stats.seconds
    power_w = reading.watts if reading is not None and reading.seconds > 0 else None
    energy = None
    if power_w is not None and stats.served is not None:
        energy = power_w * stats.served.mean_ms
    return TelemetryRecord(
        seq=seq,
        ts=time.time() if ts is None else ts,
        interval_s=seconds,
        model_sha256=model_sha256,
        served=stats.served,
        invocations=stats.invocations,
        throughput_ips=stats.requests / seconds if seconds > 0 else 0.0,
        rss_mb=rss_mb,
        peak_rss_mb=peak_rss_mb,
        cpu_percent=cpu_percent,
        power_source=power_label,
        power_estimated=power_estimated,
        temperature_c=temperature_c,
        power_w=power_w,
        energy_mj_per_inference=energy,
        cache_hits=stats.cache_hits,
        errors=stats.errors,
    )

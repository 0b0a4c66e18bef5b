"""The telemetry ingest lag and the resend grace it extends (runtime/telemetry_ingest.py)."""

from __future__ import annotations

from pathlib import Path

from agent.protocol import SeqRange, Telemetry
from controller.runtime.service import ControllerService
from controller.runtime.telemetry_ingest import pipeline_lag_s
from controller.runtime.tuning import RESEND_GRACE_S, RESEND_LAG_CAP_S
from tests.telemetry_records import record


def _message(device: str, *closed: float) -> Telemetry:
    """A message whose records closed at `closed` (seq 1, 2, ...)."""
    return Telemetry(
        device_id=device,
        records=tuple(record(i + 1, ts=ts) for i, ts in enumerate(closed)),
    )


def test_lag_is_the_median_age_of_each_message_newest_record() -> None:
    received = 10_000.0
    batch = [
        _message("a", received - 50, received - 3),  # newest record counts: 3 s
        _message("b", received - 4),
        _message("c", received - 5),
        _message("d", received - 3_600),  # one device draining an old spool
        _message("e", received + 20),  # one clock ahead
    ]
    assert pipeline_lag_s(batch, received) == 4.0
    assert pipeline_lag_s([_message("a", received + 5)], received) == 0.0  # never negative
    only_gaps = Telemetry(device_id="a", records=(), unavailable=(SeqRange(1, 2),))
    assert pipeline_lag_s([only_gaps], received) is None


def test_resend_grace_grows_with_the_lag_up_to_its_cap(tmp_path: Path) -> None:
    service = ControllerService(tmp_path / "home", "mqtt://127.0.0.1:1")
    assert service.resend_grace() == RESEND_GRACE_S
    service.telemetry_lag_s = 45.0
    assert service.resend_grace() == RESEND_GRACE_S + 45.0
    service.telemetry_lag_s = 10 * RESEND_LAG_CAP_S
    assert service.resend_grace() == RESEND_GRACE_S + RESEND_LAG_CAP_S

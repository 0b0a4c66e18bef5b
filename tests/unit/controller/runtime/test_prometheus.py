"""The /metrics endpoint over real HTTP on 127.0.0.1, parsed with prometheus_client's parser."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

from tests.paths import TEST_DATA

# The controller's metrics; the slim device venv (agent tests only) does not install them.
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families

from agent.protocol import LATENCY_BUCKETS_MS, SeqRange, Telemetry
from controller.fleet.registry import Fleet
from controller.fleet.telemetry.store import TelemetryStore
from controller.runtime.prometheus import ControllerMetrics, MetricsServer, serve_metrics
from controller.storage.db import database_target
from tests.telemetry_records import T0, record

DATA = TEST_DATA

# Latencies each device serves per record, by profile: spread over several buckets and +Inf.
LATENCIES = {
    "rpi4": [0.4, 0.5, 2.5, 2.9, 3.0, 14.0, 120.0, 9000.0],
    "imx93": [0.12, 0.2, 0.2, 7.4],
}


@pytest.fixture
def deployed_fleet(fleet: Fleet) -> Fleet:
    """Three devices on two profiles (one online), model tiny:1, one running deployment."""
    for device, profile in (("pi-1", "rpi4"), ("pi-2", "rpi4"), ("nx-1", "imx93")):
        fleet.register_device(device, profile)
    with fleet.db.transaction() as tx:
        tx.execute("UPDATE devices SET online = 1, state = 'idle' WHERE id = 'pi-1'")
    fleet.add_model(DATA / "tiny_fp32.tflite", name="tiny", version="1")
    fleet.deploy(DATA / "tiny_fp32.tflite", devices=["pi-2"], name="tiny", version="1")
    return fleet


@pytest.fixture
def served(deployed_fleet: Fleet) -> Iterator[tuple[ControllerMetrics, MetricsServer]]:
    """Metrics on a real HTTP server bound to 127.0.0.1 on a free port."""
    metrics = ControllerMetrics(database_target(deployed_fleet.home))
    server = serve_metrics(metrics, "127.0.0.1", 0)
    yield metrics, server
    server.stop()
    metrics.close()


def scrape(
    server: MetricsServer,
) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """GET /metrics and parse it: family name → {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(server.url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        family.name: {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


def sha(fleet: Fleet) -> str:
    """sha256 of tiny:1."""
    return str(fleet.model("tiny:1")["artifacts"][0]["sha256"])


def test_binds_where_told_and_reports_the_real_port(
    served: tuple[ControllerMetrics, MetricsServer],
) -> None:
    _, server = served
    assert server.host == "127.0.0.1" and server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"


def test_fleet_state_gauges(
    deployed_fleet: Fleet, served: tuple[ControllerMetrics, MetricsServer]
) -> None:
    _, server = served
    families = scrape(server)
    devices = families["edgefleet_devices"]
    assert devices == {
        ("edgefleet_devices", (("online", "0"), ("profile", "imx93"), ("state", "unknown"))): 1,
        ("edgefleet_devices", (("online", "0"), ("profile", "rpi4"), ("state", "unknown"))): 1,
        ("edgefleet_devices", (("online", "1"), ("profile", "rpi4"), ("state", "idle"))): 1,
    }
    rollouts = families["edgefleet_rollouts"]
    assert rollouts == {("edgefleet_rollouts", (("kind", "deploy"), ("state", "running"))): 1}
    assert families["edgefleet_metrics_collect_seconds"]
    assert families["edgefleet_inference_latency_seconds"] == {}  # no telemetry yet


def test_latency_histograms_are_cumulative_and_match_stored_records(
    deployed_fleet: Fleet, served: tuple[ControllerMetrics, MetricsServer]
) -> None:
    metrics, server = served
    store = TelemetryStore(deployed_fleet.db)
    model = sha(deployed_fleet)
    expected: dict[str, list[float]] = {"rpi4": [], "imx93": []}
    for device, profile in (("pi-1", "rpi4"), ("pi-2", "rpi4"), ("nx-1", "imx93")):
        batch = tuple(
            record(seq, T0 + 10 * seq, LATENCIES[profile], sha=model, dropped_total=seq)
            for seq in (1, 2, 3)
        )
        metrics.observe_ingest(store.ingest(Telemetry(device, batch), received=T0))
        expected[profile] += LATENCIES[profile] * 3
        # A redelivery is a duplicate: it must not count twice in the histogram.
        metrics.observe_ingest(store.ingest(Telemetry(device, batch[1:]), received=T0))

    samples = scrape(server)["edgefleet_inference_latency_seconds"]
    for profile, latencies in expected.items():
        labels = (("model", "tiny:1"), ("profile", profile))
        buckets = [
            (float(dict(key)["le"]), value)
            for (name, key), value in samples.items()
            if name.endswith("_bucket") and dict(key)["profile"] == profile
        ]
        buckets.sort()
        assert [le for le, _ in buckets[:-1]] == pytest.approx(
            [b / 1000 for b in LATENCY_BUCKETS_MS]
        )
        counts = [value for _, value in buckets]
        assert counts == sorted(counts)  # cumulative
        for (le, value), bound_ms in zip(buckets, [*LATENCY_BUCKETS_MS, float("inf")], strict=True):
            assert value == sum(1 for x in latencies if x <= bound_ms), le
        count = samples[("edgefleet_inference_latency_seconds_count", labels)]
        assert count == counts[-1] == len(latencies)
        total = samples[("edgefleet_inference_latency_seconds_sum", labels)]
        assert total == pytest.approx(sum(latencies) / 1000)

    families = scrape(server)
    assert families["edgefleet_telemetry_records_stored"] == {
        ("edgefleet_telemetry_records_stored_total", ()): 9
    }
    assert families["edgefleet_telemetry_duplicates"] == {
        ("edgefleet_telemetry_duplicates_total", ()): 6
    }
    # Each device's latest dropped_total is 3.
    assert families["edgefleet_telemetry_device_dropped_records"] == {
        ("edgefleet_telemetry_device_dropped_records", ()): 9
    }


def test_gap_and_loss_gauges_and_service_counters(
    deployed_fleet: Fleet, served: tuple[ControllerMetrics, MetricsServer]
) -> None:
    metrics, server = served
    store = TelemetryStore(deployed_fleet.db)
    model = sha(deployed_fleet)
    first = store.ingest(
        Telemetry("pi-1", tuple(record(s, sha=model) for s in (1, 5, 9))), received=T0
    )
    # pi-1 says it no longer holds 2..4.
    lost = store.ingest(Telemetry("pi-1", (), unavailable=(SeqRange(2, 4),)), T0)
    for result in (first, lost):
        metrics.observe_ingest(result)
    metrics.observe_rejected("telemetry")
    metrics.observe_rejected("hello", 2)
    due = store.due_resends(T0 + 60)
    metrics.observe_resend(len(due))
    families = scrape(server)

    def value(family: str, sample: str | None = None, **labels: str) -> float:
        """One sample's value."""
        return families[family][(sample or family, tuple(sorted(labels.items())))]

    assert value("edgefleet_telemetry_gaps_open") == 1  # 6..8 (2..4 was declared unavailable)
    assert value("edgefleet_telemetry_missing_records") == 3
    assert value("edgefleet_telemetry_lost_records") == 3
    assert value("edgefleet_telemetry_lost", "edgefleet_telemetry_lost_total") == 3
    assert (
        value("edgefleet_messages_rejected", "edgefleet_messages_rejected_total", kind="hello") == 2
    )
    assert (
        value("edgefleet_messages_rejected", "edgefleet_messages_rejected_total", kind="telemetry")
        == 1
    )
    assert due == {"pi-1": [SeqRange(6, 8)]}  # only pi-1 is online
    assert (
        value("edgefleet_telemetry_resend_requests", "edgefleet_telemetry_resend_requests_total")
        == 1
    )
    # The collector reads the database on every scrape: new state shows at once.
    store.ingest(Telemetry("pi-1", tuple(record(s, sha=model) for s in (6, 7, 8))), T0 + 61)
    again = scrape(server)
    assert again["edgefleet_telemetry_gaps_open"] == {("edgefleet_telemetry_gaps_open", ()): 0}


def test_exposition_in_process_matches_the_endpoint(
    deployed_fleet: Fleet, served: tuple[ControllerMetrics, MetricsServer]
) -> None:
    metrics, server = served
    local = {f.name for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert local == set(scrape(server))

"""Prometheus /metrics for the controller: service counters plus fleet state read at scrape time."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, generate_latest, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from agent.protocol import LATENCY_BUCKETS_MS
from controller.fleet.telemetry.reports import BUCKET_COLUMNS, model_label
from controller.fleet.telemetry.store import IngestResult
from controller.storage.db import Connection
from controller.storage.open import open_database
from controller.storage.queries import metrics as q

# Histogram `le` bounds in seconds (Prometheus base unit), one per LATENCY_BUCKETS_MS bound.
LATENCY_BUCKETS_S: tuple[str, ...] = tuple(
    floatToGoString(round(ms / 1000.0, 9)) for ms in LATENCY_BUCKETS_MS
)
# Label value for devices (or telemetry totals) without a profile.
NO_PROFILE = "unknown"


class FleetCollector(Collector):
    """Reads devices, rollouts, latency totals and telemetry gaps from SQLite on each scrape.

    Every query is an index lookup or a GROUP BY over small tables (devices, deployments,
    per-profile totals maintained at ingest), never a scan of the telemetry rows. Each scrape
    opens its own short-lived connection in the scraping thread (SQLite connections belong to
    one thread) and only reads, so it never waits for the service's write lock.
    """

    def __init__(self, db_target: str | Path) -> None:
        """Bring the schema up to date once; scrapes then only read."""
        self.db_target = str(db_target)
        open_database(self.db_target).close()

    def describe(self) -> Iterator[Metric]:
        """No fixed description: the families depend on what the database holds."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """One consistent read of the fleet, as gauges and histograms."""
        started = time.perf_counter()
        db = open_database(self.db_target, migrate=False)
        try:
            with db.snapshot() as conn:  # every family sees the same snapshot
                families = [
                    self._devices(conn),
                    self._rollouts(conn),
                    self._latency(conn),
                    *self._telemetry(conn),
                ]
        finally:
            db.close()
        yield from families
        spent = GaugeMetricFamily(
            "edgefleet_metrics_collect_seconds",
            "Time this scrape spent reading the controller database.",
        )
        spent.add_metric([], time.perf_counter() - started)
        yield spent

    @staticmethod
    def _devices(conn: Connection) -> Metric:
        """Devices by profile, state and link."""
        family = GaugeMetricFamily(
            "edgefleet_devices",
            "Registered devices by profile, reported update state and MQTT link.",
            labels=["profile", "state", "online"],
        )
        for row in q.device_counts(conn):
            family.add_metric(
                [row["profile"] or NO_PROFILE, row["state"], "1" if row["online"] else "0"],
                row["n"],
            )
        return family

    @staticmethod
    def _rollouts(conn: Connection) -> Metric:
        """Deployments and rollouts by kind and state."""
        family = GaugeMetricFamily(
            "edgefleet_rollouts",
            "Rollouts (kind=rollout) and plain deployments (kind=deploy) by state.",
            labels=["kind", "state"],
        )
        for row in q.rollout_counts(conn):
            family.add_metric([row["kind"], row["state"]], row["n"])
        return family

    @staticmethod
    def _latency(conn: Connection) -> Metric:
        """Served-inference latency histograms per profile × model, from the ingest totals."""
        names = {
            r["sha256"]: f"{r['name']}:{r['version']}"
            for r in q.artifact_names(conn)
        }
        merged: dict[tuple[str, str], list[float]] = {}
        for row in q.latency_totals(conn):
            key = (row["profile"] or NO_PROFILE, model_label(row["model_sha256"], names))
            acc = merged.setdefault(key, [0.0] * (1 + len(BUCKET_COLUMNS)))
            acc[0] += row["latency_sum_ms"]
            for i, column in enumerate(BUCKET_COLUMNS):
                acc[1 + i] += row[column]
        family = HistogramMetricFamily(
            "edgefleet_inference_latency_seconds",
            "Latency of inferences served on devices (agent local inference service), "
            "per device profile and model version, from telemetry.",
            labels=["profile", "model"],
        )
        for (profile, model), acc in sorted(merged.items()):
            cumulative, buckets = 0.0, []
            for le, n in zip(LATENCY_BUCKETS_S, acc[1:-1], strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            buckets.append(("+Inf", cumulative + acc[-1]))
            family.add_metric([profile, model], buckets, sum_value=acc[0] / 1000.0)
        return family

    @staticmethod
    def _telemetry(conn: Connection) -> list[Metric]:
        """Open gaps, missing and lost records, and records devices dropped from their spool."""
        gaps = q.gap_totals(conn)
        dropped = {"n": q.dropped_total(conn)}
        out: list[Metric] = []
        for name, doc, value in (
            ("edgefleet_telemetry_gaps_open", "Missing sequence ranges not yet resent.", "open"),
            (
                "edgefleet_telemetry_missing_records",
                "Telemetry records in open gaps (asked for again).",
                "missing",
            ),
            (
                "edgefleet_telemetry_lost_records",
                "Telemetry records given up on (device dropped them or never answered).",
                "lost",
            ),
        ):
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], gaps[value])
            out.append(family)
        family = GaugeMetricFamily(
            "edgefleet_telemetry_device_dropped_records",
            "Records device spools dropped on overflow (sum of each device's latest count).",
        )
        family.add_metric([], dropped["n"])
        out.append(family)
        return out


class ControllerMetrics:
    """The controller's registry: counters the service increments plus the fleet collector."""

    def __init__(self, db_target: str | Path, registry: CollectorRegistry | None = None) -> None:
        """Create the counters and register a collector reading the database `db_target`."""
        self.registry = registry or CollectorRegistry()
        self.records_stored = Counter(
            "edgefleet_telemetry_records_stored",
            "Telemetry records stored (each device sequence number once).",
            registry=self.registry,
        )
        self.duplicates = Counter(
            "edgefleet_telemetry_duplicates",
            "Telemetry records received again and ignored.",
            registry=self.registry,
        )
        self.lost = Counter(
            "edgefleet_telemetry_lost",
            "Telemetry records marked lost (unavailable on the device, or resends unanswered).",
            registry=self.registry,
        )
        self.messages_rejected = Counter(
            "edgefleet_messages_rejected",
            "Device messages rejected (unparsable, invalid, or over the size cap), by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.resend_requests = Counter(
            "edgefleet_telemetry_resend_requests",
            "resend_telemetry commands sent to devices.",
            registry=self.registry,
        )
        self.collector = FleetCollector(db_target)
        self.registry.register(self.collector)

    def observe_ingest(self, result: IngestResult) -> None:
        """Count what one ingested Telemetry message changed."""
        self.records_stored.inc(result.stored)
        self.duplicates.inc(result.duplicates)
        self.lost.inc(result.lost)

    def observe_expired(self, lost: int) -> None:
        """Count records marked lost after unanswered resends (TelemetryStore.last_expired)."""
        self.lost.inc(lost)

    def observe_rejected(self, kind: str = "unknown", count: int = 1) -> None:
        """Count rejected device messages of one kind (hello, status, events, telemetry, ...)."""
        self.messages_rejected.labels(kind=kind).inc(count)

    def observe_resend(self, commands: int = 1) -> None:
        """Count resend_telemetry commands published."""
        self.resend_requests.inc(commands)

    def exposition(self) -> bytes:
        """The text exposition format, as a scrape would return it."""
        return generate_latest(self.registry)

    def close(self) -> None:
        """Unregister the fleet collector (scrapes hold no connection between them)."""
        self.registry.unregister(self.collector)


class _QuietHandler(WSGIRequestHandler):
    """Request handler that does not log every scrape to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        """Drop access logs."""


@dataclass
class MetricsServer:
    """A running /metrics endpoint: one server thread, so one database connection."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def host(self) -> str:
        """Address the server is bound to."""
        return str(self.server.server_address[0])

    @property
    def port(self) -> int:
        """Port the server is bound to (the real one when 0 was asked for)."""
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        """http://host:port/metrics."""
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving, close the socket and wait for the thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5.0)


def serve_metrics(metrics: ControllerMetrics, host: str, port: int) -> MetricsServer:
    """Serve the registry on http://host:port/metrics from one daemon thread (port 0 = any)."""
    app = make_wsgi_app(metrics.registry)
    server = make_server(host, port, app, server_class=WSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(
        target=server.serve_forever, name="edgefleet-metrics", daemon=True, kwargs={}
    )
    thread.start()
    return MetricsServer(server, thread)

"""The schema as SQLAlchemy Core tables: what queries are written against and what Alembic
compares a database with (docs/storage.md).

It describes the schema the legacy migrations built (controller/storage/migrations.py), column
for column and in their order, in both dialects: a column the legacy DDL declared INTEGER is
INTEGER on SQLite and BIGINT on PostgreSQL (generations are millisecond timestamps), REAL is
DOUBLE PRECISION there (a 4-byte real would lose seconds of a timestamp), and an INTEGER
PRIMARY KEY is an identity column. tests/unit/test_storage_schema.py keeps it equal to what a
database actually holds.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BIGINT,
    DOUBLE_PRECISION,
    INTEGER,
    REAL,
    TEXT,
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Identity,
    Index,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.types import TypeEngine

from agent.protocol import BUCKET_COUNT

metadata = MetaData()

# The legacy DDL's numeric spellings, as each dialect stores them. SQLite's REAL and DOUBLE
# PRECISION are one type (8-byte floats; it reflects both as REAL), so Real and Double differ
# only in the legacy DDL's text.
Int: TypeEngine[int] = BigInteger().with_variant(INTEGER(), "sqlite")  # declared INTEGER
Big: TypeEngine[int] = BIGINT()  # declared BIGINT
Real: TypeEngine[float] = DOUBLE_PRECISION().with_variant(REAL(), "sqlite")  # declared REAL
Double = Real  # declared DOUBLE PRECISION
Text: TypeEngine[str] = TEXT()

# Histogram columns: one per LATENCY_BUCKETS_MS bound plus +Inf (docs/telemetry.md).
BUCKET_NAMES = tuple(f"b{i}" for i in range(BUCKET_COUNT))


def _default(sql: str) -> Any:
    """A server-side DEFAULT: rows inserted by any code path get it, as the DDL said."""
    return text(sql)


def col(
    name: str, type_: TypeEngine[Any], default: str | None = None, *args: Any, **kw: Any
) -> Column[Any]:
    """A column; NOT NULL when it has a default (every defaulted legacy column is)."""
    if default is not None:
        kw.setdefault("nullable", False)
        kw["server_default"] = _default(default)
    return Column(name, type_, *args, **kw)


def req(name: str, type_: TypeEngine[Any], *args: Any, **kw: Any) -> Column[Any]:
    """A NOT NULL column without a default."""
    return Column(name, type_, *args, nullable=False, **kw)


def _identity_id() -> Column[int]:
    """An INTEGER PRIMARY KEY: SQLite's rowid, an identity column on PostgreSQL."""
    return Column("id", Int, Identity(), primary_key=True)


def _buckets() -> list[Column[Any]]:
    """The histogram columns b0..b30, BIGINT NOT NULL DEFAULT 0."""
    return [col(name, Big, "0") for name in BUCKET_NAMES]


devices = Table(
    "devices", metadata,
    Column("id", Text, primary_key=True),
    col("profile", Text),
    col("profile_reason", Text, "''"),
    col("declared_profile", Text),
    col("facts", Text, "'{}'"),
    col("agent_version", Text),
    col("runtime", Text),
    col("runtime_version", Text),
    col("online", Int, "0"),
    col("state", Text, "'unknown'"),
    col("status_detail", Text, "''"),
    col("model_sha256", Text),
    col("previous_sha256", Text),
    col("reported_generation", Int, "0"),
    col("desired_generation", Int, "0"),
    col("desired_sha256", Text),
    col("desired_deployment_id", Text),
    col("published_generation", Int, "0"),
    req("registered_by", Text),
    req("registered_at", Real),
    col("last_seen", Real),
    col("desired_threads", Int),
    col("desired_fallback", Text),
)  # fmt: skip

models = Table(
    "models", metadata,
    _identity_id(),
    req("name", Text),
    req("version", Text),
    col("source", Text, "''"),
    req("created", Real),
    UniqueConstraint("name", "version"),
)  # fmt: skip

artifacts = Table(
    "artifacts", metadata,
    Column("sha256", Text, primary_key=True),
    req("model_id", Int, ForeignKey("models.id")),
    req("recipe", Text),
    col("profile", Text),
    req("size", Int),
    req("chunk_size", Int),
    req("manifest", Text),
    req("created", Real),
    col("kind", Text, "'model'"),
    col("golden_sha256", Text),
    col("chunks_retained", Int, "0"),
)  # fmt: skip

deployments = Table(
    "deployments", metadata,
    Column("id", Text, primary_key=True),
    req("model_id", Int, ForeignKey("models.id")),
    req("target", Text),
    req("created", Real),
    col("kind", Text, "'deploy'"),
    col("policy", Text, "'{}'"),
    col("state", Text, "'running'"),
    col("wave", Int, "0"),
    col("reason", Text, "''"),
    col("updated", Real),
    col("phase", Text, "'waves'"),
    Index("deployments_active", "state",
          sqlite_where=text("state IN ('running', 'paused')"),
          postgresql_where=text("state IN ('running', 'paused')")),
)  # fmt: skip

deployment_devices = Table(
    "deployment_devices", metadata,
    req("deployment_id", Text, ForeignKey("deployments.id")),
    req("device_id", Text),
    col("artifact_sha256", Text, None, ForeignKey("artifacts.sha256")),
    req("generation", Int),
    col("state", Text, "'pending'"),
    col("detail", Text, "''"),
    req("updated", Real),
    col("position", Int, "0"),
    col("wave", Int, "0"),
    col("attempts", Int, "0"),
    col("deadline", Real),
    col("previous_sha256", Text),
    col("baseline", Text),
    col("result", Text),
    col("stage", Text),
    col("threads", Int),
    col("fallback", Text),
    col("outlier", Text),
    col("fell_back", Text),
    PrimaryKeyConstraint("deployment_id", "device_id"),
    Index("deployment_devices_device", "device_id", "generation"),
    # Revision 0003. The rollout tick reads only a rollout's rows that can change (by state,
    # and by deadline for those being updated) and counts its rows per state and wave from
    # this index alone; the sweep of timed-out rollbacks reads only rows rolling back.
    Index("deployment_devices_state", "deployment_id", "state", "deadline", "wave"),
    Index("deployment_devices_rolling_back", "deadline",
          sqlite_where=text("state = 'rolling_back'"),
          postgresql_where=text("state = 'rolling_back'")),
)  # fmt: skip

benchmarks = Table(
    "benchmarks", metadata,
    _identity_id(),
    req("event_id", Text),
    req("device_id", Text),
    req("model_sha256", Text),
    col("deployment_id", Text),
    req("p50_ms", Real),
    req("p90_ms", Real),
    req("p99_ms", Real),
    req("peak_rss_mb", Real),
    req("power_w", Real),
    req("energy_mj_per_inference", Real),
    req("power_source", Text),
    req("report", Text),
    req("ts", Real),
    UniqueConstraint("device_id", "event_id"),
    Index("benchmarks_device", "device_id", "ts"),
)  # fmt: skip

events = Table(
    "events", metadata,
    req("device_id", Text),
    req("event_id", Text),
    req("kind", Text),
    col("deployment_id", Text),
    col("generation", Int),
    col("state", Text),
    req("message", Text),
    req("ts", Real),
    req("received", Real),
    PrimaryKeyConstraint("device_id", "event_id"),
    Index("events_deployment", "deployment_id"),
    Index("events_received", "received"),
)  # fmt: skip

commands = Table(
    "commands", metadata,
    Column("id", Text, primary_key=True),
    req("device_id", Text),
    req("action", Text),
    col("runs", Int, "50"),
    col("warmup", Int, "5"),
    req("created", Real),
    col("published", Real),
    col("completed", Real),
    col("result", Text, "''"),
    Index("commands_unpublished", "published",
          sqlite_where=text("published IS NULL"), postgresql_where=text("published IS NULL")),
)  # fmt: skip

model_artifacts = Table(
    "model_artifacts", metadata,
    req("model_id", Int, ForeignKey("models.id")),
    req("sha256", Text, ForeignKey("artifacts.sha256")),
    col("profile", Text),
    req("recipe", Text),
    req("created", Real),
)  # fmt: skip
# One artifact per (model, profile), the profile-less one included.
Index(
    "model_artifacts_profile",
    model_artifacts.c.model_id,
    func.coalesce(model_artifacts.c.profile, text("''")),
    unique=True,
)

telemetry = Table(
    "telemetry", metadata,
    req("device_id", Text),
    req("seq", Big),
    req("ts", Double),
    req("minute", Big),
    req("received", Double),
    col("model_sha256", Text),
    req("interval_s", Double),
    col("served", Big, "0"),
    col("p50_ms", Double),
    col("p90_ms", Double),
    col("p99_ms", Double),
    col("mean_ms", Double),
    col("max_ms", Double),
    *_buckets(),
    col("invocations", Big, "0"),
    col("throughput_ips", Double, "0"),
    col("rss_mb", Double, "0"),
    col("peak_rss_mb", Double, "0"),
    col("cpu_percent", Double, "0"),
    col("temperature_c", Double),
    col("power_w", Double),
    col("energy_mj_per_inference", Double),
    col("power_source", Text, "''"),
    col("power_estimated", Int, "0"),
    col("cache_hits", Big, "0"),
    col("errors", Big, "0"),
    col("dropped_total", Big, "0"),
    PrimaryKeyConstraint("device_id", "seq"),
    Index("telemetry_device_ts", "device_id", "ts"),
    Index("telemetry_ts", "ts"),
)  # fmt: skip

telemetry_minute = Table(
    "telemetry_minute", metadata,
    req("device_id", Text),
    req("minute", Big),
    col("model_sha256", Text, "''"),
    req("records", Big),
    req("seq_first", Big),
    req("seq_last", Big),
    req("ts_first", Double),
    req("ts_last", Double),
    col("interval_s", Double, "0"),
    col("served", Big, "0"),
    col("latency_sum_ms", Double, "0"),
    col("max_ms", Double),
    *_buckets(),
    col("invocations", Big, "0"),
    col("throughput_sum", Double, "0"),
    col("rss_sum", Double, "0"),
    col("peak_rss_mb", Double, "0"),
    col("cpu_sum", Double, "0"),
    col("temperature_sum", Double, "0"),
    col("temperature_n", Big, "0"),
    col("temperature_max", Double),
    col("power_sum", Double, "0"),
    col("power_interval_s", Double, "0"),
    col("energy_sum", Double, "0"),
    col("energy_served", Big, "0"),
    col("power_source", Text, "''"),
    col("power_estimated", Int, "0"),
    col("cache_hits", Big, "0"),
    col("errors", Big, "0"),
    col("dropped_total", Big, "0"),
    PrimaryKeyConstraint("device_id", "minute", "model_sha256"),
    Index("telemetry_minute_minute", "minute"),
)  # fmt: skip

# Fleet rollup (alembic revision 0002): telemetry_minute's sum form per minute x profile (as
# registered at ingest, '' for none) x model, without the device; `devices` counts the distinct
# devices with a record in that minute. Series and the fleet report read it (docs/telemetry.md).
telemetry_fleet_minute = Table(
    "telemetry_fleet_minute", metadata,
    req("minute", Big),
    req("profile", Text),
    col("model_sha256", Text, "''"),
    col("devices", Big, "0"),
    *(c._copy() for c in telemetry_minute.columns
      if c.name not in ("device_id", "minute", "model_sha256")),
    PrimaryKeyConstraint("minute", "profile", "model_sha256"),
)  # fmt: skip

# Hours of the fleet rollup (alembic revision 0004): telemetry_fleet_minute folded per hour
# (`devices` the most of one minute) for whole hours below the fold mark, max(hour) + 1 h: long
# series read hours, and minutes only at the edges (docs/telemetry.md, "Hourly level").
telemetry_fleet_hour = Table(
    "telemetry_fleet_hour", metadata,
    req("hour", Big),
    req("profile", Text),
    col("model_sha256", Text, "''"),
    *(c._copy() for c in telemetry_fleet_minute.columns if not c.primary_key),
    PrimaryKeyConstraint("hour", "profile", "model_sha256"),
)  # fmt: skip

# Per device x model: the minutes of its first and last record, profile at the last ingest and
# largest power source (revision 0002): the fleet report's device counts without the records.
telemetry_device_models = Table(
    "telemetry_device_models", metadata,
    req("device_id", Text),
    req("model_sha256", Text),
    req("profile", Text),
    req("minute_first", Big),
    req("minute_last", Big),
    col("power_source", Text, "''"),
    PrimaryKeyConstraint("device_id", "model_sha256"),
    Index("telemetry_device_models_last", "minute_last"),
)  # fmt: skip

telemetry_cursor = Table(
    "telemetry_cursor", metadata,
    Column("device_id", Text, primary_key=True),
    col("highest", Big, "0"),
    col("contiguous", Big, "0"),
    col("stored", Big, "0"),
    col("duplicates", Big, "0"),
    col("lost", Big, "0"),
    col("dropped_total", Big, "0"),
    col("last_ts", Double),
    req("updated", Double),
)  # fmt: skip

telemetry_gaps = Table(
    "telemetry_gaps", metadata,
    req("device_id", Text),
    req("seq_first", Big),
    req("seq_last", Big),
    col("state", Text, "'missing'"),
    req("first_seen", Double),
    col("last_requested", Double),
    col("requests", Int, "0"),
    col("reason", Text, "''"),
    PrimaryKeyConstraint("device_id", "seq_first"),
    Index("telemetry_gaps_state", "state", "first_seen"),
)  # fmt: skip

telemetry_latency_totals = Table(
    "telemetry_latency_totals", metadata,
    req("profile", Text),
    req("model_sha256", Text),
    col("served", Big, "0"),
    col("latency_sum_ms", Double, "0"),
    *_buckets(),
    PrimaryKeyConstraint("profile", "model_sha256"),
)  # fmt: skip

model_candidates = Table(
    "model_candidates", metadata,
    req("model_id", Int, ForeignKey("models.id")),
    req("profile", Text),
    req("rank", Int),
    req("sha256", Text, ForeignKey("artifacts.sha256")),
    req("recipe", Text),
    col("threads", Int),
    col("host", Text, "'{}'"),
    PrimaryKeyConstraint("model_id", "profile", "rank"),
)  # fmt: skip

candidate_trials = Table(
    "candidate_trials", metadata,
    req("rollout_id", Text, ForeignKey("deployments.id")),
    req("profile", Text),
    req("device_id", Text),
    req("rank", Int),
    req("sha256", Text),
    col("threads", Int),
    col("state", Text, "'waiting'"),
    col("attempts", Int, "0"),
    col("generation", Big, "0"),
    col("deadline", Double),
    col("result", Text),
    col("outlier", Text),
    col("detail", Text, "''"),
    req("updated", Double),
    PrimaryKeyConstraint("rollout_id", "device_id", "rank"),
)  # fmt: skip

candidate_decisions = Table(
    "candidate_decisions", metadata,
    req("rollout_id", Text, ForeignKey("deployments.id")),
    req("profile", Text),
    col("winner_rank", Int),
    col("sha256", Text),
    col("threads", Int),
    col("fallback_rank", Int),
    req("explanation", Text),
    req("decided", Double),
    PrimaryKeyConstraint("rollout_id", "profile"),
)  # fmt: skip

api_tokens = Table(
    "api_tokens", metadata,
    Column("name", Text, primary_key=True),
    req("sha256", Text, unique=True),
    req("role", Text),
    req("created", Double),
    col("last_used", Double),
    CheckConstraint("role IN ('read', 'admin')"),
)  # fmt: skip

leases = Table(
    "leases", metadata,
    Column("name", Text, primary_key=True),
    req("holder", Text),
    req("epoch", Big),
    req("acquired", Double),
    req("renewed", Double),
    req("expires", Double),
)  # fmt: skip

rollout_waves = Table(
    "rollout_waves", metadata,
    req("rollout_id", Text, ForeignKey("deployments.id")),
    req("wave", Int),
    req("started", Double),
    col("driver", Text, "''"),
    col("devices", Int, "0"),
    PrimaryKeyConstraint("rollout_id", "wave"),
)  # fmt: skip

replicas = Table(
    "replicas", metadata,
    Column("name", Text, primary_key=True),
    col("host", Text, "''"),
    col("pid", Int, "0"),
    req("started", Double),
    req("last_seen", Double),
    col("leader", Int, "0"),
    col("stats", Text, "'{}'"),
    col("client_id", Text, "''"),
    col("shared", Int, "0"),
    col("adopted", Double),
    col("adopted_by", Text),
)  # fmt: skip

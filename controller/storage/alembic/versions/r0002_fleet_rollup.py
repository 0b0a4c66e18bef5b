"""Fleet rollup: telemetry_fleet_minute (sum form per minute × profile × model) and
telemetry_device_models (first/last minute per device × model), backfilled from the stored
raw and per-minute rows (docs/telemetry.md, "Fleet rollup").

The columns are written out here, frozen: tables.py may move on, this revision must not.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from controller.storage.queries import fleet

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_BIG: sa.types.TypeEngine[Any] = sa.BigInteger().with_variant(sa.INTEGER(), "sqlite")
_REAL: sa.types.TypeEngine[Any] = sa.DOUBLE_PRECISION().with_variant(sa.REAL(), "sqlite")
_BUCKETS = [f"b{i}" for i in range(31)]
# Sum-form columns after the key and `devices`: (name, type, server default or None = NULL).
_SUM_FORM: list[tuple[str, str, str | None]] = [
    ("records", "B", "-"), ("seq_first", "B", "-"), ("seq_last", "B", "-"),
    ("ts_first", "R", "-"), ("ts_last", "R", "-"), ("interval_s", "R", "0"),
    ("served", "BIG", "0"), ("latency_sum_ms", "R", "0"), ("max_ms", "R", None),
    *((b, "BIG", "0") for b in _BUCKETS),
    ("invocations", "BIG", "0"), ("throughput_sum", "R", "0"), ("rss_sum", "R", "0"),
    ("peak_rss_mb", "R", "0"), ("cpu_sum", "R", "0"), ("temperature_sum", "R", "0"),
    ("temperature_n", "BIG", "0"), ("temperature_max", "R", None), ("power_sum", "R", "0"),
    ("power_interval_s", "R", "0"), ("energy_sum", "R", "0"), ("energy_served", "BIG", "0"),
    ("power_source", "T", "''"), ("power_estimated", "I", "0"), ("cache_hits", "BIG", "0"),
    ("errors", "BIG", "0"), ("dropped_total", "BIG", "0"),
]  # fmt: skip


def _column(name: str, kind: str, default: str | None) -> sa.Column[Any]:
    """One column: '-' NOT NULL without default, None nullable, else NOT NULL DEFAULT."""
    type_: sa.types.TypeEngine[Any] = {
        "B": sa.BIGINT(), "BIG": sa.BIGINT(), "R": _REAL, "T": sa.TEXT(), "I": _BIG,
    }[kind]  # fmt: skip
    if default is None:
        return sa.Column(name, type_, nullable=True)
    if default == "-":
        return sa.Column(name, type_, nullable=False)
    return sa.Column(name, type_, nullable=False, server_default=sa.text(default))


def upgrade() -> None:
    """Create both tables, then fill them from what is stored."""
    op.create_table(
        "telemetry_fleet_minute",
        sa.Column("minute", sa.BIGINT(), nullable=False),
        sa.Column("profile", sa.TEXT(), nullable=False),
        sa.Column("model_sha256", sa.TEXT(), nullable=False, server_default=sa.text("''")),
        sa.Column("devices", sa.BIGINT(), nullable=False, server_default=sa.text("0")),
        *(_column(*c) for c in _SUM_FORM),
        sa.PrimaryKeyConstraint("minute", "profile", "model_sha256"),
    )
    op.create_table(
        "telemetry_device_models",
        sa.Column("device_id", sa.TEXT(), nullable=False),
        sa.Column("model_sha256", sa.TEXT(), nullable=False),
        sa.Column("profile", sa.TEXT(), nullable=False),
        sa.Column("minute_first", sa.BIGINT(), nullable=False),
        sa.Column("minute_last", sa.BIGINT(), nullable=False),
        sa.Column("power_source", sa.TEXT(), nullable=False, server_default=sa.text("''")),
        sa.PrimaryKeyConstraint("device_id", "model_sha256"),
    )
    op.create_index("telemetry_device_models_last", "telemetry_device_models", ["minute_last"])
    fleet.backfill(op.get_bind())


def downgrade() -> None:
    """Drop both tables (ingest before 0002 does not know them)."""
    op.drop_table("telemetry_device_models")
    op.drop_table("telemetry_fleet_minute")

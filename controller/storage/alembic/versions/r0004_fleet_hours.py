"""Fleet rollup hours: telemetry_fleet_hour, telemetry_fleet_minute folded per hour × profile ×
model for the whole hours already past, so long series read hours (docs/telemetry.md, "Hourly
level"). Backfilled from the stored rollup minutes.

The columns are written out here, frozen: tables.py may move on, this revision must not.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

from controller.storage.alembic.versions.r0002_fleet_rollup import _SUM_FORM, _column
from controller.storage.queries import fleet

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# As the controller's fold: hours that ended ten minutes ago (FOLD_DELAY_S).
_DELAY_S = 600


def upgrade() -> None:
    """Create the table, then fold the rollup minutes of the hours already past."""
    op.create_table(
        "telemetry_fleet_hour",
        sa.Column("hour", sa.BIGINT(), nullable=False),
        sa.Column("profile", sa.TEXT(), nullable=False),
        sa.Column("model_sha256", sa.TEXT(), nullable=False, server_default=sa.text("''")),
        sa.Column("devices", sa.BIGINT(), nullable=False, server_default=sa.text("0")),
        *(_column(*c) for c in _SUM_FORM),
        sa.PrimaryKeyConstraint("hour", "profile", "model_sha256"),
    )
    hi = int(time.time() - _DELAY_S) // fleet.HOUR_S * fleet.HOUR_S
    fleet.fold_hours(op.get_bind(), None, hi)


def downgrade() -> None:
    """Drop it (series before 0004 read minutes only)."""
    op.drop_table("telemetry_fleet_hour")

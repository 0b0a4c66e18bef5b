"""Rollout tick indexes: a rollout's rows by state and deadline (with the wave, so the tick's
counts read the index alone), and the rows rolling back by deadline (docs/rollouts.md).

The index definitions are written out here, frozen: tables.py may move on, this revision must
not.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ROLLING_BACK = "state = 'rolling_back'"


def upgrade() -> None:
    """Create both indexes on deployment_devices."""
    op.create_index(
        "deployment_devices_state",
        "deployment_devices",
        ["deployment_id", "state", "deadline", "wave"],
    )
    op.create_index(
        "deployment_devices_rolling_back",
        "deployment_devices",
        ["deadline"],
        sqlite_where=sa.text(_ROLLING_BACK),
        postgresql_where=sa.text(_ROLLING_BACK),
    )


def downgrade() -> None:
    """Drop both (the tick before 0003 reads every row of a rollout, with or without them)."""
    op.drop_index("deployment_devices_rolling_back", table_name="deployment_devices")
    op.drop_index("deployment_devices_state", table_name="deployment_devices")

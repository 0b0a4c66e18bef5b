"""Baseline: the schema of the last legacy migration (controller/storage/migrations.py).

A new database gets it by running the frozen legacy DDL, so a new database and an upgraded
one are the same, statement for statement; tables.py describes the result.
"""

from __future__ import annotations

from alembic import op

from controller.storage import legacy

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create every table of the last legacy version, and stamp the legacy version handed
    over (an edgefleet from before Alembic then refuses the database)."""
    conn = op.get_bind()
    legacy.apply(conn)
    legacy.stamp(conn, legacy.HANDED_OVER)


def downgrade() -> None:
    """The baseline is where history starts: nothing to go back to."""
    raise NotImplementedError("the baseline revision cannot be downgraded")

"""one completed webhook per prediction, enforced by the database

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

WHERE = sa.text("event = 'completed'")


def upgrade() -> None:
    # The runner and the recovery sweep may both try to queue a prediction's terminal webhook: the
    # second insert fails here instead of sending it twice.
    op.create_index(
        "uq_webhook_deliveries_completed",
        "webhook_deliveries",
        ["request_id"],
        unique=True,
        sqlite_where=WHERE,
        postgresql_where=WHERE,
    )


def downgrade() -> None:
    op.drop_index("uq_webhook_deliveries_completed", table_name="webhook_deliveries")

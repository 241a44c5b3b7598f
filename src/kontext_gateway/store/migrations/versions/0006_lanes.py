"""jobs claimed by lane: hosted jobs and local-engine jobs each have their own claim loop

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("lane", sa.String(8), nullable=False, server_default="hosted"))
        batch.create_index("ix_requests_claim_lane", ["lane", "status", "created_at"])


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_index("ix_requests_claim_lane")
        batch.drop_column("lane")

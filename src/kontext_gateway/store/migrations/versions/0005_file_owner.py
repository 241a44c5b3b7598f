"""files belong to the API key that uploaded them

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("key_id", sa.String(64), nullable=True))  # None: uploaded to the open gateway


def downgrade() -> None:
    with op.batch_alter_table("files") as batch:
        batch.drop_column("key_id")

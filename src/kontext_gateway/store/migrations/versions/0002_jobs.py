"""jobs: requests become durable jobs (claims, leases, cancel), upstream tasks, webhooks, idempotency, files

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("input", JSON, nullable=True))  # what the client sent (images by reference)
        batch.add_column(sa.Column("version", sa.String(128), nullable=True))
        batch.add_column(sa.Column("logs", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("webhook", sa.String(2048), nullable=True))
        batch.add_column(sa.Column("webhook_events", JSON, nullable=True))
        batch.add_column(sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("claimed_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("lease_until", TS, nullable=True))
        batch.add_column(sa.Column("runs", sa.Integer(), nullable=False, server_default="0"))
    # Replicate's vocabulary from now on: one record serves both APIs.
    op.execute("UPDATE requests SET status = 'starting' WHERE status = 'queued'")
    op.execute("UPDATE requests SET status = 'processing' WHERE status = 'running'")
    op.create_index("ix_requests_claim", "requests", ["status", "created_at"])

    op.create_table(
        "upstream_tasks",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(40), sa.ForeignKey("requests.id", ondelete="CASCADE"), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),  # index of the task's first image in the request
        sa.Column("config_key", sa.String(96), nullable=False),
        sa.Column("task_id", sa.String(256), nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),  # submitted | done | failed
        sa.Column("output_blob_ids", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_upstream_tasks_request_id", "upstream_tasks", ["request_id"])

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(40), sa.ForeignKey("requests.id", ondelete="CASCADE"), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),  # start | output | logs | completed
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),  # pending | sending | delivered | failed | dropped
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(500), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("delivered_at", TS, nullable=True),
        sa.Column("lease_until", TS, nullable=True),
    )
    op.create_index("ix_webhook_deliveries_request_id", "webhook_deliveries", ["request_id"])
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["state", "next_attempt_at"])

    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(64), primary_key=True),  # the API key's id, or "" when open
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),  # sha256 of method, path and body
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )

    op.create_table(
        "files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("blob_id", sa.String(80), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("content_type", sa.String(100), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("files")
    op.drop_table("idempotency_keys")
    op.drop_table("webhook_deliveries")
    op.drop_table("upstream_tasks")
    op.drop_index("ix_requests_claim", table_name="requests")
    op.execute("UPDATE requests SET status = 'queued' WHERE status = 'starting'")
    op.execute("UPDATE requests SET status = 'running' WHERE status = 'processing'")
    with op.batch_alter_table("requests") as batch:
        for column in (
            "runs",
            "lease_until",
            "claimed_by",
            "cancel_requested",
            "webhook_events",
            "webhook",
            "logs",
            "version",
            "input",
        ):
            batch.drop_column(column)

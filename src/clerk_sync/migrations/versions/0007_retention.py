"""Retention: ``webhook_events.redacted_at`` marks payloads reduced to ids, indexed for the prune job.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from clerk_sync.tables import Timestamp

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_events") as batch:
        batch.add_column(sa.Column("redacted_at", Timestamp, nullable=True))
    op.create_index("ix_webhook_events_redacted_at_received_at", "webhook_events", ["redacted_at", "received_at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_events_redacted_at_received_at", table_name="webhook_events")
    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_column("redacted_at")

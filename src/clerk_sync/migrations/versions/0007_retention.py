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
    # (MySQL's DDL is not transactional: a run killed after the server finished a step, before the version was
    # written, runs this again; each step is taken only if missing)
    inspector = sa.inspect(op.get_bind())
    if "redacted_at" not in {c["name"] for c in inspector.get_columns("webhook_events")}:
        with op.batch_alter_table("webhook_events") as batch:
            batch.add_column(sa.Column("redacted_at", Timestamp, nullable=True))
    index = "ix_webhook_events_redacted_at_received_at"
    if index not in {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("webhook_events")}:
        op.create_index(index, "webhook_events", ["redacted_at", "received_at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_events_redacted_at_received_at", table_name="webhook_events")
    with op.batch_alter_table("webhook_events") as batch:
        batch.drop_column("redacted_at")

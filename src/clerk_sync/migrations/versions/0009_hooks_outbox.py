"""The hooks outbox: ``hook_jobs`` (issue 11, after-commit hooks).

Revision ID: 0009
Revises: 0008_console
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from clerk_sync.tables import MYSQL_TABLE, PK, JSONType, Timestamp

revision = "0009"
down_revision = "0008_console"
branch_labels = None
depends_on = None



def upgrade() -> None:
    op.create_table(
        "hook_jobs",
        sa.Column("id", PK, autoincrement=True),
        sa.Column("hook", sa.String(64), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("entity_key", sa.String(200), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("payload", JSONType, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("available_at", Timestamp, nullable=False),
        sa.Column("lease_until", Timestamp, nullable=True),
        sa.Column("claim_token", sa.String(36), nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_hook_jobs"),
        **MYSQL_TABLE,
    )
    op.create_index("ix_hook_jobs_status_available_at", "hook_jobs", ["status", "available_at"])
    op.create_index("ix_hook_jobs_entity_key_id", "hook_jobs", ["entity_key", "id"])


def downgrade() -> None:
    op.drop_index("ix_hook_jobs_entity_key_id", table_name="hook_jobs")
    op.drop_index("ix_hook_jobs_status_available_at", table_name="hook_jobs")
    op.drop_table("hook_jobs")

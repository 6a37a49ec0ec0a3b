"""Deny list of revoked/ended/removed sessions (fed by session.* webhooks).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from clerk_sync.tables import MYSQL_TABLE, Timestamp

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "revoked_sessions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("user_clerk_id", sa.String(64), nullable=True),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("expire_at", sa.BigInteger, nullable=True),
        sa.Column("revoked_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_revoked_sessions"),
        sa.UniqueConstraint("session_id", name="uq_revoked_sessions_session_id"),
        **MYSQL_TABLE,
    )
    op.create_index("ix_revoked_sessions_user_clerk_id", "revoked_sessions", ["user_clerk_id"])


def downgrade() -> None:
    op.drop_table("revoked_sessions")

"""Indexes for the incremental deny-list refresh (users.updated_at, revoked_sessions.revoked_at).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_users_updated_at", "users", ["updated_at"])
    op.create_index("ix_revoked_sessions_revoked_at", "revoked_sessions", ["revoked_at"])


def downgrade() -> None:
    op.drop_index("ix_revoked_sessions_revoked_at", table_name="revoked_sessions")
    op.drop_index("ix_users_updated_at", table_name="users")

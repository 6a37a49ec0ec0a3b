"""Indexes for the incremental deny-list refresh (users.updated_at, revoked_sessions.revoked_at).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for name, table, column in (("ix_users_updated_at", "users", "updated_at"),
                                ("ix_revoked_sessions_revoked_at", "revoked_sessions", "revoked_at")):
        # (MySQL's DDL is not transactional: a run killed after the server built the index, before the version
        # was written, runs this again; it failed on the index it found, for good: review)
        if name not in {i["name"] for i in inspector.get_indexes(table)}:
            op.create_index(name, table, [column])


def downgrade() -> None:
    op.drop_index("ix_revoked_sessions_revoked_at", table_name="revoked_sessions")
    op.drop_index("ix_users_updated_at", table_name="users")

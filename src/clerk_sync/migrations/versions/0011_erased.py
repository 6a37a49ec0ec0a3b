"""Digests of hard-deleted tombstones (``clerk_sync_erased``), consulted by every guarded insert.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from clerk_sync.tables import MYSQL_TABLE, Timestamp

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "clerk_sync_erased",
        sa.Column("digest", sa.String(64)),
        sa.Column("entity", sa.String(32), nullable=False),
        sa.Column("erased_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("digest", name="pk_clerk_sync_erased"),
        **MYSQL_TABLE,
    )


def downgrade() -> None:
    op.drop_table("clerk_sync_erased")

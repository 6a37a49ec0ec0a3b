"""The lock rows MySQL/MariaDB writers take where PostgreSQL takes advisory locks (``store.Writer.lock``).

Created on every database so the schema is one and the same; only MySQL-family stores write to it.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from clerk_sync.tables import MYSQL_TABLE

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "clerk_sync_locks",
        sa.Column("lock_key", sa.BigInteger, autoincrement=False),
        sa.PrimaryKeyConstraint("lock_key", name="pk_clerk_sync_locks"),
        **MYSQL_TABLE,
    )


def downgrade() -> None:
    op.drop_table("clerk_sync_locks")

"""users.deprovisioned: a user removed by the company's identity provider (Clerk Directory Sync/SCIM).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("deprovisioned", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("users", "deprovisioned")  # SQLite >= 3.35, which RETURNING needs anyway

"""users.deprovisioned: with SCIM Directory Sync a user removed by the IdP arrives as user.updated
with ``deprovisioned: true``, not as user.deleted.

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
    # (MySQL's DDL is not transactional: a run killed after the server added it, before the version was
    # written, runs this again)
    if "deprovisioned" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("users")}:
        op.add_column("users", sa.Column("deprovisioned", sa.Boolean, nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("deprovisioned")

"""pending_role_changes.pushing_until: a ``retry-pending`` run claims a queued role change before pushing it.

Two runs at once (the cron overlapping ``users promote --retry-pending``, or two hosts' crons) both read the same
open change and both pushed it: two calls to Clerk and two ``role.changed`` rows in the append-only audit log for
one request. A run now sets ``pushing_until`` (a few minutes ahead) on a change no other run holds, and passes
over one another holds; a run that died leaves the claim to expire.

Revision ID: 0021
Revises: 0020
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from clerk_sync.tables import Timestamp

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns("pending_role_changes")}
    if "pushing_until" not in have:  # (MySQL's DDL is not transactional: a stopped run can be run again)
        op.add_column("pending_role_changes", sa.Column("pushing_until", Timestamp, nullable=True))


def downgrade() -> None:
    op.drop_column("pending_role_changes", "pushing_until")  # (a plain DROP COLUMN: SQLite has it since 3.35)

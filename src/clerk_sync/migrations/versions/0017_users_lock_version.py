"""users.lock_version: which version a lockout's end (``locked_until``) belongs to.

A release without ``locked_until`` (before 0016), or without this column, that writes a user row during a
rolling upgrade leaves both columns as they were. When it re-locks the row, ``locked_until`` is an earlier
lock's end: past (the user would be let in at once), or ahead of the new version and still not this lock's
(a lock that never expires would end then). Every write of this release sets ``lock_version`` to the row's
``clerk_updated_at``, and an end is believed only when they are equal (``clerk_sync.events.believed_end``).

Rows written before this revision keep NULL: their end is not believed (locked until Clerk sends an unlock,
or a full ``clerk-sync reconcile`` finds the user unlocked at the same version), as for rows before 0016.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # (MySQL's DDL is not transactional: a run killed after the server added it, before the version was
    # written, runs this again)
    if "lock_version" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("users")}:
        op.add_column("users", sa.Column("lock_version", sa.BigInteger, nullable=True))


def downgrade() -> None:
    # 0016's downgrade unlocks the rows whose lock has ended: without this column it would believe an earlier
    # lock's end. An end this revision does not believe is forgotten first (that lock lasts until Clerk unlocks).
    users = sa.table("users", sa.column("locked_until", sa.BigInteger), sa.column("lock_version", sa.BigInteger),
                     sa.column("clerk_updated_at", sa.BigInteger))
    op.execute(users.update().where(users.c.locked_until.is_not(None), sa.or_(
        users.c.lock_version.is_(None), users.c.lock_version != users.c.clerk_updated_at)).values(locked_until=None))
    # A plain DROP COLUMN on every store, as 0016 (batch mode would rebuild ``users`` on SQLite and lose 0008's
    # expression indexes).
    op.drop_column("users", "lock_version")

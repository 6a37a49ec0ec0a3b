"""users.locked_until: when a Clerk lockout ends by itself.

Clerk's lockout (too many failed sign-ins, or ``POST /users/{id}/lock``) expires on its own after the
instance's lockout duration: the User object says ``lockout_expires_in_seconds`` (``null`` for a locked user:
it never expires). Nothing documents a webhook or an ``updated_at`` bump at the expiry, so the mirror keeps
the end as a millisecond timestamp (as ``last_sign_in_at``) and every check compares it with its own clock:
a user is refused as locked only while ``locked`` and (``locked_until`` is NULL or now < ``locked_until``).
Rows written before this revision keep NULL: locked until Clerk sends an unlock (as before).

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # (MySQL's DDL is not transactional: a run killed after the server added it, before the version was
    # written, runs this again)
    if "locked_until" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("users")}:
        op.add_column("users", sa.Column("locked_until", sa.BigInteger, nullable=True))


def downgrade() -> None:
    # A lock that has ended still says ``locked`` (Clerk sends nothing at the end): without its end, the code
    # before this revision would refuse that user for good. Unlock those first.
    # (Only an end this row's lock owns: one older than the row's version is an earlier lock's, kept locked.)
    users = sa.table("users", sa.column("locked", sa.Boolean), sa.column("locked_until", sa.BigInteger),
                     sa.column("clerk_updated_at", sa.BigInteger))
    now_ms = int(time.time() * 1000)
    op.execute(users.update().where(users.c.locked.is_(True), users.c.locked_until.is_not(None),
                                    users.c.locked_until <= now_ms, users.c.locked_until >= users.c.clerk_updated_at)
               .values(locked=False))
    # A plain DROP COLUMN on every store (SQLite has it since 3.35): batch mode would rebuild ``users`` on SQLite
    # and lose the console's expression indexes (0008), which it cannot reflect.
    op.drop_column("users", "locked_until")

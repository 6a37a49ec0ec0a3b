"""Reconcile bookkeeping: reconcile_runs (cursor, counts, heartbeat) and reconcile_seen (staged ids).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "reconcile_runs",
        sa.Column("id", PK, autoincrement=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("since", TS, nullable=True),
        sa.Column("phase", sa.String(32), nullable=False),
        sa.Column("cursor", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("created", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated", sa.Integer, nullable=False, server_default="0"),
        sa.Column("deleted", sa.Integer, nullable=False, server_default="0"),
        sa.Column("unchanged", sa.Integer, nullable=False, server_default="0"),
        sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
        sa.Column("duration_s", sa.Float, nullable=False, server_default="0"),
        sa.Column("details", JSONType, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_reconcile_runs"),
    )
    op.create_index("ix_reconcile_runs_status", "reconcile_runs", ["status"])
    op.create_table(
        "reconcile_seen",
        sa.Column("run_id", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("entity", sa.String(32), nullable=False),
        sa.Column("clerk_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "entity", "clerk_id", name="pk_reconcile_seen"),
    )


def downgrade() -> None:
    op.drop_table("reconcile_seen")
    op.drop_table("reconcile_runs")

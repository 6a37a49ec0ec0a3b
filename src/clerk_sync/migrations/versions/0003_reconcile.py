"""Reconcile bookkeeping: reconcile_runs (cursor, counts, heartbeat) and reconcile_seen (staged ids).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from clerk_sync.tables import MYSQL_TABLE, PK, JSONType, Timestamp

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None



def upgrade() -> None:
    op.create_table(
        "reconcile_runs",
        sa.Column("id", PK, autoincrement=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("since", Timestamp, nullable=True),
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
        sa.Column("started_at", Timestamp, nullable=False),
        sa.Column("heartbeat_at", Timestamp, nullable=False),
        sa.Column("finished_at", Timestamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_reconcile_runs"),
        **MYSQL_TABLE,
    )
    op.create_index("ix_reconcile_runs_status", "reconcile_runs", ["status"])
    op.create_table(
        "reconcile_seen",
        sa.Column("run_id", sa.BigInteger, nullable=False, autoincrement=False),
        sa.Column("entity", sa.String(32), nullable=False),
        sa.Column("clerk_id", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "entity", "clerk_id", name="pk_reconcile_seen"),
        **MYSQL_TABLE,
    )


def downgrade() -> None:
    op.drop_table("reconcile_seen")
    op.drop_table("reconcile_runs")

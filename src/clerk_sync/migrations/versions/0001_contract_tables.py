"""Contract tables: users, organizations, organization_memberships, webhook_events, audit_log.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from clerk_sync.tables import MYSQL_TABLE, PK, JSONType, Timestamp

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None



def _clerk_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("clerk_created_at", sa.BigInteger, nullable=True),
        sa.Column("clerk_updated_at", sa.BigInteger, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.Column("deleted_at", Timestamp, nullable=True),
    ]


def _id() -> sa.Column[object]:
    return sa.Column("id", PK, primary_key=True, autoincrement=True)


def upgrade() -> None:
    op.create_table(
        "users",
        _id(),
        sa.Column("clerk_id", sa.String(64), nullable=False),
        sa.Column("email", sa.String(320), nullable=True),
        sa.Column("email_addresses", JSONType, nullable=False),
        sa.Column("first_name", sa.String(255), nullable=True),
        sa.Column("last_name", sa.String(255), nullable=True),
        sa.Column("username", sa.String(255), nullable=True),
        sa.Column("image_url", sa.Text, nullable=True),
        sa.Column("public_metadata", JSONType, nullable=False),
        sa.Column("private_metadata", JSONType, nullable=False),
        sa.Column("unsafe_metadata", JSONType, nullable=False),
        sa.Column("role", sa.String(64), nullable=False, server_default="user"),
        sa.Column("plan", sa.String(64), nullable=False, server_default="free"),
        sa.Column("banned", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("locked", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("last_sign_in_at", sa.BigInteger, nullable=True),
        *_clerk_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("clerk_id", name="uq_users_clerk_id"),
        **MYSQL_TABLE,
    )
    op.create_index("ix_users_email", "users", ["email"])

    op.create_table(
        "organizations",
        _id(),
        sa.Column("clerk_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("slug", sa.String(255), nullable=True),
        sa.Column("image_url", sa.Text, nullable=True),
        sa.Column("public_metadata", JSONType, nullable=False),
        sa.Column("private_metadata", JSONType, nullable=False),
        sa.Column("plan", sa.String(64), nullable=False, server_default="free"),
        *_clerk_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_organizations"),
        sa.UniqueConstraint("clerk_id", name="uq_organizations_clerk_id"),
        **MYSQL_TABLE,
    )
    op.create_index("ix_organizations_slug", "organizations", ["slug"])

    op.create_table(
        "organization_memberships",
        _id(),
        sa.Column("clerk_id", sa.String(64), nullable=False),
        sa.Column("organization_clerk_id", sa.String(64), nullable=False),
        sa.Column("user_clerk_id", sa.String(64), nullable=False),
        sa.Column("role", sa.String(64), nullable=False, server_default="org:member"),
        sa.Column("permissions", JSONType, nullable=False),
        *_clerk_columns(),
        sa.PrimaryKeyConstraint("id", name="pk_organization_memberships"),
        sa.UniqueConstraint("clerk_id", name="uq_organization_memberships_clerk_id"),
        **MYSQL_TABLE,
    )
    op.create_index(
        "ix_organization_memberships_organization_clerk_id",
        "organization_memberships",
        ["organization_clerk_id"],
    )
    op.create_index(
        "ix_organization_memberships_user_clerk_id", "organization_memberships", ["user_clerk_id"]
    )

    op.create_table(
        "webhook_events",
        _id(),
        sa.Column("svix_id", sa.String(128), nullable=False),
        sa.Column("type", sa.String(128), nullable=False),
        sa.Column("instance_id", sa.String(64), nullable=True),
        sa.Column("event_timestamp", sa.BigInteger, nullable=True),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.Column("payload", JSONType, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="1"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("applied_at", Timestamp, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_events"),
        sa.UniqueConstraint("svix_id", name="uq_webhook_events_svix_id"),
        **MYSQL_TABLE,
    )
    op.create_index("ix_webhook_events_type", "webhook_events", ["type"])
    op.create_index(
        "ix_webhook_events_status_received_at", "webhook_events", ["status", "received_at"]
    )

    op.create_table(
        "audit_log",
        _id(),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("actor_clerk_id", sa.String(64), nullable=True),
        sa.Column("target_clerk_id", sa.String(64), nullable=True),
        sa.Column("impersonator_clerk_id", sa.String(64), nullable=True),
        sa.Column("details", JSONType, nullable=False),
        sa.Column("ip", sa.String(64), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
        **MYSQL_TABLE,
    )
    for column in ("action", "actor_clerk_id", "target_clerk_id", "created_at"):
        op.create_index(f"ix_audit_log_{column}", "audit_log", [column])


def downgrade() -> None:
    for table in ("audit_log", "webhook_events", "organization_memberships", "organizations", "users"):
        op.drop_table(table)

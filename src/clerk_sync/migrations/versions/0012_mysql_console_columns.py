"""The operator console's indexes on MySQL/MariaDB: indexed virtual columns.

Migration 0008_console indexes expressions (the Clerk ids inside a delivery's payload, lower-cased
names) on SQLite and PostgreSQL. MariaDB indexes no expressions, so there the console scanned the
inbox for every "deliveries about this user" lookup. A virtual generated column computes the same
value, stores nothing in the row, and can be indexed: the console's queries name these columns on
MySQL/MariaDB (``integrations/console/_queries.py``) and the expressions elsewhere. The indexes keep
0008's names, so one list of index names holds on every store. Nothing changes on SQLite/PostgreSQL.

The payload values are cut to the column's width (``LEFT``): a signed delivery with an absurdly long
``data.id`` must still be stored (as ``failed``), not refused by its own index.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_ID_CHARS = 191  # wider than any Clerk id; a key of 764 bytes in utf8mb4, under InnoDB's 3,072
# index name -> (table, virtual column, expression, width)
COLUMNS = {
    "ix_webhook_events_data_id": ("webhook_events", "data_id", "JSON_VALUE(payload, '$.data.id')", _ID_CHARS),
    "ix_webhook_events_data_user_id": (
        "webhook_events", "data_user_id", "JSON_VALUE(payload, '$.data.public_user_data.user_id')", _ID_CHARS),
    "ix_webhook_events_data_org_id": (
        "webhook_events", "data_org_id", "JSON_VALUE(payload, '$.data.organization.id')", _ID_CHARS),
    "ix_users_first_name_lower": ("users", "first_name_lower", "lower(first_name)", 255),
    "ix_users_last_name_lower": ("users", "last_name_lower", "lower(last_name)", 255),
    "ix_organizations_name_lower": ("organizations", "name_lower", "lower(name)", 255),
}


def _mysql() -> bool:
    return op.get_bind().dialect.name in ("mysql", "mariadb")


def upgrade() -> None:
    if not _mysql():
        return
    for index, (table, column, expression, width) in COLUMNS.items():
        computed = sa.Computed(f"LEFT({expression}, {width})", persisted=False)
        op.add_column(table, sa.Column(column, sa.String(width), computed, nullable=True))
        op.create_index(index, table, [column])


def downgrade() -> None:
    if not _mysql():
        return
    for index, (table, column, _expression, _width) in reversed(COLUMNS.items()):
        op.drop_index(index, table_name=table)
        op.drop_column(table, column)

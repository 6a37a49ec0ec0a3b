"""The operator console's indexes on MySQL/MariaDB: indexed virtual columns.

Migration 0008_console indexes expressions (the Clerk ids inside a delivery's payload, lower-cased
names) on SQLite and PostgreSQL. MariaDB indexes no expressions, so there the console scanned the
inbox for every "deliveries about this user" lookup. A virtual generated column computes the same
value, is not stored in the row, and can be indexed: the console's queries name these columns on
MySQL/MariaDB (``integrations/console/_queries.py``) and the expressions elsewhere. The indexes keep
0008's names, so one list of index names holds on every store. Nothing changes on SQLite/PostgreSQL.

The ids are cut to the column's width with ``LEFT``: a signed delivery with an absurd ``data.id`` must
still be stored (as ``failed``), never refused by its own index. Which function reads them matters for
the same reason. MariaDB's JSON functions read at most 32 levels of nesting: there ``JSON_VALUE``
returns NULL for a payload nested deeper before the id (the console does not find that delivery by id,
nor did it before, when it scanned), where ``JSON_EXTRACT`` fails the INSERT (tested). MySQL nests to
100 (our payloads to 64), but its ``JSON_VALUE`` returns at most 512 characters and signals a longer
value: there the ids are read with ``JSON_UNQUOTE(JSON_EXTRACT(..))``, text of any length (MySQL is not
tested here, as the README says).

One ``ALTER TABLE`` per table, adding only what is missing: DDL is not transactional on MySQL, so a
migration stopped half-way can be run again.

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


def _payload(path: str, *, mariadb: bool) -> str:
    read = f"JSON_VALUE(payload, '$.{path}')" if mariadb else f"JSON_UNQUOTE(JSON_EXTRACT(payload, '$.{path}'))"
    return f"VARCHAR({_ID_CHARS}) AS (LEFT({read}, {_ID_CHARS}))"


def columns(*, mariadb: bool) -> dict[str, list[tuple[str, str, str]]]:
    """table -> [(virtual column, its SQL type and expression, index name)]."""
    return {
        "webhook_events": [
            ("data_id", _payload("data.id", mariadb=mariadb), "ix_webhook_events_data_id"),
            ("data_user_id", _payload("data.public_user_data.user_id", mariadb=mariadb),
             "ix_webhook_events_data_user_id"),
            ("data_org_id", _payload("data.organization.id", mariadb=mariadb), "ix_webhook_events_data_org_id"),
        ],
        "users": [
            ("first_name_lower", "VARCHAR(255) AS (lower(first_name))", "ix_users_first_name_lower"),
            ("last_name_lower", "VARCHAR(255) AS (lower(last_name))", "ix_users_last_name_lower"),
        ],
        "organizations": [("name_lower", "VARCHAR(255) AS (lower(name))", "ix_organizations_name_lower")],
    }


def _mysql() -> bool:
    return op.get_bind().dialect.name in ("mysql", "mariadb")


def upgrade() -> None:
    if not _mysql():
        return
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    for table, columns_ in columns(mariadb=bool(getattr(bind.dialect, "is_mariadb", False))).items():
        have = {c["name"] for c in inspector.get_columns(table)}
        indexed = {i["name"] for i in inspector.get_indexes(table)}
        parts = [f"ADD COLUMN {name} {definition} VIRTUAL" for name, definition, _ in columns_ if name not in have]
        parts += [f"ADD INDEX {index} ({name})" for name, _, index in columns_ if index not in indexed]
        if parts:
            op.execute(f"ALTER TABLE {table} {', '.join(parts)}")


def downgrade() -> None:
    if not _mysql():
        return
    for table, columns_ in columns(mariadb=False).items():  # the names only
        parts = [f"DROP INDEX {index}" for _, _, index in columns_] + [f"DROP COLUMN {name}" for name, _, _ in columns_]
        op.execute(f"ALTER TABLE {table} {', '.join(parts)}")

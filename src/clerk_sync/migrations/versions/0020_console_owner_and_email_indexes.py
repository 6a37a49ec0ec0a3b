"""The console's indexes on a delivery's ``data.user_id`` and on ``lower(users.email)``.

A ``session.*`` event (and ``email.created``, ``sms.created``) names its user in ``data.user_id``, which none of
0008_console's payload indexes covers: the console's "deliveries about this user", its ``clerk_id`` filter and
the bulk replay by user never found a failed session revocation. The console matches ``data.user_id`` too now,
through this index (a scan of the inbox otherwise). ``lower(email)``: the user search is case-insensitive on
addresses as it is on names (an address is kept as it was entered, ``John.Smith@Example.com``).

As 0008/0012/0015: expressions on SQLite and PostgreSQL (the id cut to 191 characters there, partial: only rows
that have one), indexed virtual columns on MySQL/MariaDB, one ``ALTER TABLE`` per table adding only what is
missing (MySQL's DDL is not transactional: a stopped run can be run again). The index build takes each table's
SHARE lock (writes wait) while it scans: on a large inbox run ``clerk-sync migrate`` as its own step.

Revision ID: 0020
Revises: 0019
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

_ID_CHARS = 191  # as 0012 and 0015
_EMAIL_CHARS = 320  # users.email


def columns(*, mariadb: bool) -> dict[str, list[tuple[str, str, str]]]:
    """MySQL/MariaDB: table -> [(virtual column, its SQL type and expression, index name)] (as 0012's)."""
    path = "'$.data.user_id'"
    read = f"JSON_VALUE(payload, {path})" if mariadb else f"JSON_UNQUOTE(JSON_EXTRACT(payload, {path}))"
    return {
        "webhook_events": [("data_owner_id", f"VARCHAR({_ID_CHARS}) AS (LEFT({read}, {_ID_CHARS}))",
                            "ix_webhook_events_data_owner_id")],
        "users": [("email_lower", f"VARCHAR({_EMAIL_CHARS}) AS (lower(email))", "ix_users_email_lower")],
    }


# index name -> (table, SQLite expression, PostgreSQL expression, partial)
EXPRESSIONS = {
    "ix_webhook_events_data_owner_id": ("webhook_events", "json_extract(payload, '$.data.user_id')",
                                        f"left((payload -> 'data' ->> 'user_id'), {_ID_CHARS})", True),
    "ix_users_email_lower": ("users", "lower(email)", "lower(email)", False),
}


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name in ("mysql", "mariadb"):
        inspector = sa.inspect(bind)
        for table, columns_ in columns(mariadb=bool(getattr(bind.dialect, "is_mariadb", False))).items():
            have = {c["name"] for c in inspector.get_columns(table)}
            indexed = {i["name"] for i in inspector.get_indexes(table)}
            parts = [f"ADD COLUMN {name} {definition} VIRTUAL" for name, definition, _ in columns_ if name not in have]
            parts += [f"ADD INDEX {index} ({name})" for name, _, index in columns_ if index not in indexed]
            if parts:
                op.execute(f"ALTER TABLE {table} {', '.join(parts)}")
        return
    postgres = bind.dialect.name == "postgresql"
    for name, (table, sqlite_expr, pg_expr, partial) in EXPRESSIONS.items():
        expr = pg_expr if postgres else sqlite_expr
        where = f" WHERE {expr} IS NOT NULL" if partial else ""
        op.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({expr}){where}")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name in ("mysql", "mariadb"):
        for table, columns_ in columns(mariadb=False).items():  # the names only
            parts = [f"DROP INDEX {index}" for _, _, index in columns_] + [f"DROP COLUMN {n}" for n, _, _ in columns_]
            op.execute(f"ALTER TABLE {table} {', '.join(parts)}")
        return
    for name in EXPRESSIONS:
        op.execute(f"DROP INDEX IF EXISTS {name}")

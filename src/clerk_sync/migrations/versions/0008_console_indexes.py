"""Indexes for the operator console: deliveries by time and by the Clerk ids in their payload,
users and organizations by lower-cased name (prefix search).

The expression indexes are not declared in ``tables.py`` (SQLAlchemy cannot compare them across
dialects); the console's queries use the very same expressions (``integrations/console/queries.py``).

Revision ID: 0008_console
Revises: 0007
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0008_console"
down_revision = "0007"
branch_labels = None
depends_on = None

# PostgreSQL indexes the payload's ids cut to 191 characters (as 0012 does on MariaDB): a btree entry holds at
# most 2,704 bytes, and a signed delivery whose id is a long object or string must still be stored (failed),
# never refused by its own index (503 for ever). Installs that built the uncut indexes get them cut by 0015.
PG_ID_CHARS = 191


def pg_payload_id(path: str) -> str:
    """``left((payload -> 'a' ->> 'b'), 191)``: the indexed expression (the console's queries compile to it)."""
    *parents, leaf = path.split(".")
    return f"left((payload{''.join(f' -> {p!r}' for p in parents)} ->> {leaf!r}), {PG_ID_CHARS})"


# name -> (table, SQLite expression, PostgreSQL expression, partial: only rows where it is not NULL)
_EXPRESSIONS = {
    "ix_webhook_events_data_id": (
        "webhook_events", "json_extract(payload, '$.data.id')", pg_payload_id("data.id"), False),
    "ix_webhook_events_data_user_id": (
        "webhook_events", "json_extract(payload, '$.data.public_user_data.user_id')",
        pg_payload_id("data.public_user_data.user_id"), True),
    "ix_webhook_events_data_org_id": (
        "webhook_events", "json_extract(payload, '$.data.organization.id')",
        pg_payload_id("data.organization.id"), True),
    "ix_users_first_name_lower": ("users", "lower(first_name)", "lower(first_name)", False),
    "ix_users_last_name_lower": ("users", "lower(last_name)", "lower(last_name)", False),
    "ix_organizations_name_lower": ("organizations", "lower(name)", "lower(name)", False),
}


def upgrade() -> None:
    # (MySQL's DDL is not transactional: a run killed after the server built it, before the version was written,
    # runs this again)
    have = {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("webhook_events")}
    if "ix_webhook_events_received_at" not in have:
        op.create_index("ix_webhook_events_received_at", "webhook_events", ["received_at"])
    dialect = op.get_bind().dialect.name
    if dialect in ("mysql", "mariadb"):
        # MariaDB indexes no expressions: migration 0012 indexes virtual columns computing them there.
        return
    postgres = dialect == "postgresql"
    if dialect == "sqlite":
        _repair_non_finite_numbers(op.get_bind())
    for name, (table, sqlite_expr, pg_expr, partial) in _EXPRESSIONS.items():
        expr = pg_expr if postgres else sqlite_expr
        where = f" WHERE {expr} IS NOT NULL" if partial else ""
        op.execute(f"CREATE INDEX {name} ON {table} ({expr}){where}")


def _repair_non_finite_numbers(conn: sa.Connection) -> None:
    """Release 0.2.0 parsed bodies with a plain ``json.loads``, which takes ``NaN`` and ``Infinity``, and stored
    them so: no JSON to SQLite before 3.42, and the ``json_extract`` indexes below, built over every row, failed
    the upgrade every time (review). Such numbers are stored as null, as the parser has stored them since (a
    payload not even that can parse is left: the index build names the failure)."""
    rows = conn.exec_driver_sql("SELECT id, payload FROM webhook_events WHERE NOT json_valid(payload)").all()
    for row_id, text in rows:
        try:
            document = json.loads(text, parse_constant=lambda _: None)
        except (TypeError, ValueError):
            continue
        conn.exec_driver_sql("UPDATE webhook_events SET payload = ? WHERE id = ?",
                             (json.dumps(document, allow_nan=False), row_id))


def downgrade() -> None:
    for name in reversed(_EXPRESSIONS) if op.get_bind().dialect.name not in ("mysql", "mariadb") else ():
        op.execute(f"DROP INDEX {name}")
    op.drop_index("ix_webhook_events_received_at", table_name="webhook_events")

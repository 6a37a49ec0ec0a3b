"""The mapped table and the one hook of the ``service + mapped table + hook`` ingest cells.

``mapping()`` creates the app's ``accounts`` table if it is missing (in real life the app's own
migrations do), then returns the mapping; ``hooks()`` is one hook on every user change that only
counts, so the cells measure clerk-sync's cost (outbox row, dispatch), not a handler's.
"""

from __future__ import annotations

import os

import sqlalchemy as sa

from clerk_sync.changes import Change, Hook
from clerk_sync.mapping import Column, MappedTable, SchemaMapping, SoftDelete

_meta = sa.MetaData()
accounts = sa.Table(
    "accounts", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("email", sa.String(320)),
    sa.Column("name", sa.String(255)),
    sa.Column("role", sa.String(32), nullable=False, server_default="member"),
    sa.Column("plan", sa.String(32), nullable=False, server_default="free"),
)
handled = [0]


def mapping() -> SchemaMapping:
    engine = sa.create_engine(os.environ["DATABASE_URL"])
    _meta.create_all(engine)
    engine.dispose()
    return SchemaMapping(users=MappedTable(
        "accounts", "clerk_user_id",
        {"email": "email", "name": "full_name", "role": Column("public_metadata.role", default="member")},
        on_delete=SoftDelete("deleted_at"),
    ))


def _count(change: Change) -> None:
    handled[0] += 1


def hooks() -> list[Hook]:
    return [Hook("count", _count, on=["user.*"])]

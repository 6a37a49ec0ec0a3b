"""The mapping and hook ``tests/test_pgbouncer.py`` gives ``clerk-sync serve`` behind PgBouncer: users also
written into an app ``accounts`` table, and one hook on user changes that records each call in a table of
its own (through the same pooler: ``PGB_HOOK_URL``)."""

from __future__ import annotations

import functools
import os

import sqlalchemy as sa

from clerk_sync.changes import Change, Hook
from clerk_sync.mapping import MappedTable, SchemaMapping, SoftDelete

meta = sa.MetaData()
accounts = sa.Table("accounts", meta, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("email", sa.String(320)))
hook_calls = sa.Table("pgb_hook_calls", meta, sa.Column("key", sa.String(200), primary_key=True))


def mapping() -> SchemaMapping:
    return SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email"},
                                           on_delete=SoftDelete("deleted_at")))


@functools.cache
def _engine() -> sa.Engine:
    from clerk_sync.store import create_engine

    return create_engine(os.environ["PGB_HOOK_URL"], transaction_pooler=True, pool_size=2)


def _record(change: Change) -> None:
    with _engine().begin() as conn:
        conn.execute(sa.text("INSERT INTO pgb_hook_calls (key) VALUES (:k) ON CONFLICT DO NOTHING"),
                     {"k": change.idempotency_key})


def hooks() -> list[Hook]:
    return [Hook("record", _record, on=["user.*"])]

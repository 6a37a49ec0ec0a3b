"""Hooks for the crash tests, loaded by ``clerk-sync worker --hooks tests._hook_worker:hooks``.

The handler records every call, performs its side effect at most once per idempotency key (an
``effects`` row, ``ON CONFLICT DO NOTHING``), and, while the file named by ``HOOK_CRASH_FILE`` exists,
removes it and ``kill -9``s its own process right after acting: before the job is marked done.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

from clerk_sync.changes import Change, Hook

meta = sa.MetaData()
calls = sa.Table("test_hook_calls", meta, sa.Column("id", sa.Integer, primary_key=True),
                 sa.Column("key", sa.String(200), nullable=False))
effects = sa.Table("test_hook_effects", meta, sa.Column("key", sa.String(200), primary_key=True),
                   sa.Column("type", sa.String(64), nullable=False))


def act(engine: sa.Engine, change: Change) -> None:
    with engine.begin() as conn:
        conn.execute(calls.insert().values(key=change.idempotency_key))
    with engine.begin() as conn:  # the side effect, keyed: a second call does nothing
        if engine.dialect.name in ("mysql", "mariadb"):
            stmt = mysql.insert(effects).values(key=change.idempotency_key, type=change.type)
            conn.execute(stmt.on_duplicate_key_update(key=stmt.inserted.key))
            return
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        conn.execute(insert(effects).values(key=change.idempotency_key, type=change.type).on_conflict_do_nothing())


def hooks() -> list[Hook]:
    engine = sa.create_engine(os.environ["DATABASE_URL"])
    crash = Path(os.environ.get("HOOK_CRASH_FILE", "/nonexistent"))

    def handler(change: Change) -> None:
        act(engine, change)
        if crash.exists():
            crash.unlink()
            os.kill(os.getpid(), signal.SIGKILL)

    return [Hook("effects", handler)]


def event_hooks() -> list[Hook]:
    """:func:`hooks`' handler for Clerk Billing's events (types clerk-sync does not mirror), named."""
    (hook,) = hooks()
    return [Hook("billing-effects", hook.handler, on=["subscription.*", "subscriptionItem.*", "paymentAttempt.*"])]

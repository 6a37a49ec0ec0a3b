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


def resume_after_lease(db_url: str, engine: sa.Engine, hooks: list[Hook]) -> tuple[list[str], set[str], int]:
    """What a dispatcher finds once a dead worker's lease is over (61 s on): it drains the queue; then every
    handler call's key, the keyed effects, and the jobs left."""
    from datetime import UTC, datetime, timedelta

    from clerk_sync.hooks import Dispatcher
    from clerk_sync.store import Store
    from clerk_sync.tables import hook_jobs

    later = datetime.now(UTC) + timedelta(seconds=61)  # past the dead worker's lease
    store = Store.from_url(db_url, hooks=hooks)
    try:
        Dispatcher(store, now=lambda: later).drain()
    finally:
        store.dispose()
    with engine.connect() as conn:
        called = list(conn.execute(sa.select(calls.c.key)).scalars())
        done = set(conn.execute(sa.select(effects.c.key)).scalars())
        left = conn.execute(sa.select(sa.func.count()).select_from(hook_jobs)).scalar_one()
    return called, done, left

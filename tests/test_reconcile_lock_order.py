"""A reconcile page takes every lock its writes need in one sorted pass before the first write.

Found by review: with a mapping (or hooks), ``Writer.end_lockout`` took each ended lockout's user lock on its
own, and the page's changed users were locked after it, out of the one order every writer keeps; a webhook
batch holding those locks in sorted order then deadlocked with the page (PostgreSQL ``DeadlockDetected``,
MariaDB 1213). The test records the lock calls of a page instead of racing two writers: the first takes
every user lock of the page, and no later call asks for one the transaction does not hold yet. On SQLite
(where ``Writer.lock`` takes nothing: one writer at a time), PostgreSQL and MariaDB."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync.mapping import MappedTable, SchemaMapping
from clerk_sync.reconcile import Reconciler
from clerk_sync.store import Store, Writer, create_engine
from clerk_sync.tables import users
from clerk_sync.testing import EmulatorServer
from tests.test_lock_expiry import Clock, _client


def test_a_page_with_ended_lockouts_and_changed_users_locks_once_in_order(db_url: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    engine = create_engine(db_url)
    meta = sa.MetaData()
    sa.Table("app_users", meta, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("email", sa.String(255)),
             sa.Column("is_locked", sa.Boolean))
    meta.create_all(engine)
    mapping = SchemaMapping(users=MappedTable("app_users", "clerk_user_id", {"email": "email", "is_locked": "locked"}))
    clock = Clock()
    store = Store(engine, now=clock.utc, mapping=mapping)
    with EmulatorServer(clock=clock) as emu, _client(emu) as clerk:
        made = [emu.create_user(email=f"u{i}@example.com")["id"] for i in range(6)]
        for clerk_id in made[:3]:
            emu.request("POST", f"/v1/users/{clerk_id}/lock")
        Reconciler(store, clerk, page_size=50, now=clock.utc).run()
        with store.transaction() as writer:  # rows locked before 0016: no end kept, ended once Clerk says so
            writer.conn.execute(users.update().where(users.c.clerk_id.in_(made[:3])).values(locked_until=None))
        clock.at += 2 * 3600  # the lockouts are over in Clerk (no updated_at bump)
        for clerk_id in made[3:]:
            emu.request("PATCH", f"/v1/users/{clerk_id}", json={"first_name": "Changed"})

        calls: dict[int, list[set[str]]] = {}  # per transaction (its Writer): the keys of each lock call
        lock = Writer.lock

        def recording(self: Writer, keys: Any) -> None:
            calls.setdefault(id(self), []).append(set(keys))
            lock(self, keys)

        monkeypatch.setattr(Writer, "lock", recording)
        report = Reconciler(store, clerk, page_size=50, now=clock.utc).run()
    store.dispose()
    assert (report.counts["users"].updated, report.counts["users"].lockouts_ended) == (3, 3)  # three changed users
    (page,) = [c for c in calls.values() if any(k.startswith("user:") for keys in c for k in keys)]
    first = next(keys for keys in page if keys)
    assert {f"user:{clerk_id}" for clerk_id in made} <= first  # all in the first pass
    for keys in page:
        assert keys <= first, f"a lock taken after the page's first pass, out of the sorted order: {keys - first}"


def test_a_page_without_mapping_or_hooks_locks_its_rows_first_and_in_order(db_url: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: with no mapping or hook a user upsert takes no lock, so a page wrote its rows in listing order
    (newest first) while a PostgreSQL webhook wave writes them in clerk_id order, and a MariaDB batch holds their
    entity locks: a page and a batch touching two of the same users could deadlock. The page now takes the
    entity locks of all its rows in one sorted pass (MariaDB) or, on PostgreSQL, the rows themselves in
    clerk_id order, before its first write."""
    clock = Clock()
    store = Store(create_engine(db_url), now=clock.utc)
    statements: list[str] = []
    calls: list[set[str]] = []
    lock = Writer.lock

    def recording(self: Writer, keys: Any) -> None:
        calls.append(set(keys))
        lock(self, keys)

    with EmulatorServer(clock=clock) as emu, _client(emu) as clerk:
        made = [emu.create_user(email=f"u{i}@example.com")["id"] for i in range(5)]
        monkeypatch.setattr(Writer, "lock", recording)
        sa.event.listen(store.engine, "before_cursor_execute",
                        lambda conn, cursor, statement, *rest: statements.append(statement))
        Reconciler(store, clerk, page_size=50, now=clock.utc).run()
    dialect = store.engine.dialect.name
    store.dispose()
    users_keys = {f"user:{clerk_id}" for clerk_id in made}
    if dialect == "sqlite":  # one writer at a time: no locks to order
        return
    if dialect == "mysql":  # the entity locks a MariaDB batch takes (lock_entities), in one pass
        assert any(users_keys <= keys for keys in calls), "the page's users were not locked in one pass"
    else:  # PostgreSQL: no advisory lock for rows no hook or mapping reads (the waves take none either)
        assert not any(keys & users_keys for keys in calls)
    first_write = next(i for i, s in enumerate(statements) if s.lstrip().upper().startswith(("INSERT INTO USERS",
                                                                                            "UPDATE USERS")))
    if dialect == "postgresql":
        locked = [i for i, s in enumerate(statements) if "FOR UPDATE" in s.upper() and "users" in s]
        assert locked and locked[0] < first_write

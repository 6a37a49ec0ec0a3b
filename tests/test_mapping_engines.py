"""A mapping shared by engines one after another (a test suite's stores, an app rebuilding its engine) keeps what
it reflected per engine only while that engine lives: keyed by the engine's id, an engine collected left its
projection behind for ever, and a later engine given the same id (CPython reuses addresses) would have written
with the columns and indexes of another database's table."""

from __future__ import annotations

import gc
import pickle
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from clerk_sync import migrations
from clerk_sync.changes import Change
from clerk_sync.engine import Entity
from clerk_sync.mapping import Anonymise, MappedTable, SchemaMapping, migrate_schema
from clerk_sync.store import Store, create_engine
from tests import factories as f
from tests.test_hooks import B, deliver


def test_a_collected_engines_projection_is_not_kept(tmp_path: Path) -> None:
    mapping = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email"}))
    for n in range(3):
        url = f"sqlite:///{tmp_path / f'app{n}.db'}"
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE accounts (id INTEGER PRIMARY KEY, email TEXT)"))
            migrate_schema(conn, mapping)
        migrations.upgrade(engine)
        engine.dispose()
        store = Store.from_url(url, mapping=mapping)
        assert deliver(store, f.envelope("user.created", f.user(f"user_{n}", B, email=f"u{n}@example.com"))) == [
            "applied"]
        with store.engine.connect() as conn:  # the projection is built for this engine
            assert mapping.pipelines(conn, Entity.USER) in (True, False)
        assert len(mapping._projections) == 1
        store.dispose()
        del store, engine, conn
        gc.collect()
        assert len(mapping._projections) == 0  # the engine gone, nothing of it kept


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres),
                                    pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_two_threads_projecting_at_once_write_each_in_its_own_transaction(db_url: str) -> None:
    # The projection is shared by every thread of the engine; it kept the connection of its last caller on
    # itself, so a deletion's second statement (the anonymised row's deleted_at) went into whichever
    # transaction had called it since: here one that rolls back, losing the stamp of a deletion committed.
    mapping = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email"},
                                              on_delete=Anonymise("deleted_at")))
    engine = create_engine(db_url)
    meta = sa.MetaData()
    accounts = sa.Table("accounts", meta, sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                        sa.Column("clerk_user_id", sa.String(64), unique=True), sa.Column("email", sa.String(320)),
                        sa.Column("deleted_at", sa.DateTime))
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(accounts.insert(), [{"clerk_user_id": u, "email": f"{u}@example.com"} for u in ("a", "b")])
        mapping.pipelines(conn, Entity.USER)  # reflected once, as by the first delivery: both threads share it
    now = datetime(2026, 12, 6, 7, 0, tzinfo=UTC)

    def deleted(clerk_id: str) -> Change:
        return Change(Entity.USER, clerk_id, "deleted", 2, {"email": f"{clerk_id}@example.com"})

    first_done, other_done = threading.Event(), threading.Event()

    def hold_after_first(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if threading.current_thread().name == "a" and not first_done.is_set():
            first_done.set()  # a's first statement is on its way: let b project meanwhile
            assert other_done.wait(30)

    sa.event.listen(engine, "before_cursor_execute", hold_after_first)
    errors: list[BaseException] = []

    def project_a() -> None:
        try:
            with engine.begin() as conn:
                mapping.project(conn, now, deleted("a"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    a = threading.Thread(target=project_a, name="a")
    a.start()
    assert first_done.wait(30)
    with engine.connect() as conn, conn.begin() as tx:  # b: projected, then rolled back
        mapping.project(conn, now, deleted("b"))
        other_done.set()
        a.join(30)
        tx.rollback()
    assert not a.is_alive() and errors == []
    sa.event.remove(engine, "before_cursor_execute", hold_after_first)
    with engine.connect() as conn:
        rows = {r.clerk_user_id: r for r in conn.execute(sa.select(accounts))}
    assert rows["a"].email is None and rows["a"].deleted_at is not None  # a's deletion whole
    assert rows["b"].email == "b@example.com" and rows["b"].deleted_at is None  # b's rolled back, whole
    engine.dispose()


def test_a_mapping_pickles_and_an_option_engine_shares_its_parents_reflection(tmp_path: Path) -> None:
    mapping = SchemaMapping(users=MappedTable("accounts", "clerk_user_id", {"email": "email"}))
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE accounts (id INTEGER PRIMARY KEY, email TEXT, clerk_user_id TEXT UNIQUE, "
                             "deleted_at TIMESTAMP)"))
    with engine.connect() as conn:
        mapping.pipelines(conn, Entity.USER)  # reflected (False on SQLite: its statements are its own)
    assert list(mapping._projections[engine]) == [Entity.USER]
    copy = pickle.loads(pickle.dumps(mapping))  # noqa: S301 - our own bytes (a process pool, a task queue)
    assert copy.tables == mapping.tables and len(copy._projections) == 0
    reflected: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda *a: reflected.append(a[2]))
    for _ in range(3):  # a new OptionEngine each time, its connections' conn.engine
        with engine.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
            mapping.pipelines(conn, Entity.USER)
    assert reflected == []  # the parent's reflection served them
    for _ in range(3):  # a copy of a copy (a middle OptionEngine made per call: it keyed the cache, reflected again)
        with engine.execution_options(logging_token="a").execution_options(isolation_level="AUTOCOMMIT").connect() \
                as conn:
            mapping.pipelines(conn, Entity.USER)
    assert reflected == []
    engine.dispose()

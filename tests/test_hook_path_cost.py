"""What the hook path costs, pinned without timing it: the statements of the dispatcher's idle turn and of a batch
(per batch, not per job), no per-job look-up of the overdue runs while none is overdue, and no lock ids computed
on SQLite. ``serve``'s dispatcher thread shares the interpreter (and on SQLite the writer lock) with the webhook
path, so its work per job is taken from the deliveries' (the ``service + mapped table + hook`` ingest cells,
issue 11)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from clerk_sync import store as store_module
from clerk_sync.changes import Hook
from clerk_sync.hooks import Dispatcher
from clerk_sync.store import Store
from tests import factories as f
from tests.test_hooks import B, Recorder, deliver, hooked, jobs


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = hooked(db_url, Hook("welcome", Recorder()))
    yield s
    s.dispose()


@contextmanager
def statements(store: Store) -> Iterator[list[str]]:
    """Every statement sent to the database through ``store``'s engine, SQLAlchemy's and the driver's own
    (the claim and the finish go to psycopg or sqlite3 directly, past SQLAlchemy's events)."""
    seen: list[str] = []
    if store.engine.dialect.name == "sqlite":
        def traced(dbapi_conn: Any, record: Any, proxy: Any) -> None:
            dbapi_conn.set_trace_callback(seen.append)

        store.engine.dispose()  # (pooled connections: traced from their next checkout on)
        sa.event.listen(store.engine, "checkout", traced)
        try:
            yield seen
        finally:
            sa.event.remove(store.engine, "checkout", traced)
            store.engine.dispose()
        return
    real = psycopg.Cursor.execute

    def execute(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(str(query))
        return real(self, query, *args, **kwargs)

    psycopg.Cursor.execute = execute  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        psycopg.Cursor.execute = real  # type: ignore[method-assign]


def _queue(store: Store, users: int) -> None:
    """One job each of ``users`` new users (claimable in one batch: one job an entity)."""
    deliver(store, *[f.envelope("user.created", f.user(f"user_{users}_{n}", B + n)) for n in range(users)])
    assert len(jobs(store)) == users


def _batch_statements(store: Store, dispatcher: Dispatcher, users: int) -> list[str]:
    _queue(store, users)
    with statements(store) as seen:
        assert dispatcher.run_once() == users
    assert jobs(store) == []
    return seen


def test_an_idle_turn_and_a_batch_cost_the_same_statements_whatever_the_jobs(store: Store) -> None:
    if store.dialect == "mysql":
        pytest.skip("MariaDB claims one job a statement (no UPDATE .. RETURNING): not this loop")
    dispatcher = Dispatcher(store, poll_s=0, heartbeat_s=0)
    dispatcher.run_once()  # (the first turn: the outbox privileges, asked once)
    with statements(store) as idle:
        assert dispatcher.run_once() == 0
    # SQLite: BEGIN, the dead jobs' update, one page, COMMIT; PostgreSQL: SET LOCAL synchronous_commit, the
    # update, the page (psycopg's BEGIN and COMMIT are no statements of their own)
    sqlite = store.engine.dialect.name == "sqlite"
    assert len(idle) == (4 if sqlite else 3), idle
    three, six = _batch_statements(store, dispatcher, 3), _batch_statements(store, dispatcher, 6)
    # per batch, not per job: the claim's (the idle turn's and the take), then the finish's transaction
    assert len(three) == len(six) == (8 if sqlite else 6), (three, six)


def test_no_per_job_look_up_of_overdue_runs_while_none_is_overdue(store: Store,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _queue(store, 6)
    dispatcher = Dispatcher(store, poll_s=0, heartbeat_s=0)
    looked, turns = [0], [0]
    real_lookup, real_batch = Dispatcher.overdue_by_hook, Dispatcher._run_batch

    def lookup(self: Dispatcher) -> dict[str, int]:
        looked[0] += 1
        return real_lookup(self)

    def batch(self: Dispatcher, *, stopped_before: bool) -> int:
        turns[0] += 1
        return real_batch(self, stopped_before=stopped_before)

    monkeypatch.setattr(Dispatcher, "overdue_by_hook", lookup)
    monkeypatch.setattr(Dispatcher, "_run_batch", batch)
    assert dispatcher.drain() == 6
    assert turns[0] == 2 and looked[0] == turns[0], (turns, looked)  # once a turn (6 jobs: was 8)


def test_a_sqlite_write_through_the_outbox_computes_no_lock_ids(store: Store,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite has one writer: the entity locks PostgreSQL and MariaDB take are not even named (their ids were two
    CRC-32s a key, computed for nothing on every delivery a hook or a mapped table wants)."""
    if store.dialect != "sqlite":
        pytest.skip("PostgreSQL and MariaDB take the locks")
    computed = [0]
    real = store_module._lock_id

    def counted(key: str) -> int:
        computed[0] += 1
        return real(key)

    monkeypatch.setattr(store_module, "_lock_id", counted)
    deliver(store, f.envelope("user.created", f.user("user_a", B)),
            f.envelope("user.deleted", f.deleted("user", "user_a")))
    assert len(jobs(store)) == 2
    assert computed[0] == 0

"""An erasure whose wait for the inbox runs out names what held it when that was no delivery (PostgreSQL).

The wait takes a SHARE lock on ``webhook_events``; a VACUUM or autovacuum of the table holds SHARE UPDATE
EXCLUSIVE for its whole run, which conflicts, and the message blamed "a delivery in progress" (so "run the
erasure again in a minute" failed again for as long as the vacuum ran)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

import clerk_sync.retention as retention
from clerk_sync.errors import StoreError
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.retention import Retention
from clerk_sync.store import Store
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.test_retention import deliver

pytestmark = pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres)],
                                     indirect=True)


@pytest.fixture
def stores(db_url: str, verifier: WebhookVerifier, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Store, Store]]:
    """The store holding the inbox and the one erasing; the user ``user_v`` delivered."""
    monkeypatch.setattr(retention, "_SETTLE_WAIT_S", 1)
    store, other = Store.from_url(db_url), Store.from_url(db_url)
    assert deliver(WebhookProcessor(store, verifier), f.envelope("user.created", f.user("user_v", 100)), "v1") \
        == "applied"
    yield store, other
    store.dispose()
    other.dispose()


def test_a_session_holding_share_update_exclusive_is_named_with_vacuum_among_its_causes(
        stores: tuple[Store, Store]) -> None:
    store, other = stores
    with store.engine.connect() as holder:
        holder.exec_driver_sql("LOCK TABLE webhook_events IN SHARE UPDATE EXCLUSIVE MODE")
        pid = holder.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with pytest.raises(StoreError) as caught:
            Retention(other).erase_user("user_v")
        holder.rollback()
    message = str(caught.value)
    assert "a delivery in progress held" not in message, message
    assert f"a session holding webhook_events in ShareUpdateExclusiveLock (pid {pid}: a VACUUM or autovacuum" \
        in message, message
    assert "user user_v is erased" in message and "run the erasure again in a minute" in message, message
    assert Retention(other).erase_user("user_v").payloads_redacted == 0  # held no more: it settles


def test_a_running_vacuum_is_named_as_what_held_the_inbox(stores: tuple[Store, Store], db_url: str) -> None:
    """A real ``VACUUM (FREEZE)``, kept running: it waits for the cleanup lock of the page an open cursor has
    pinned, holding its SHARE UPDATE EXCLUSIVE lock meanwhile (pg_stat_progress_vacuum shows it)."""
    _, other = stores
    _wait_until_the_inbox_rows_are_older_than_every_transaction(other)
    plain = sa.create_engine(db_url, poolclass=NullPool)
    pinning, vacuuming = plain.raw_connection(), plain.raw_connection()
    try:
        vacuuming.driver_connection.autocommit = True
        pid = vacuuming.driver_connection.info.backend_pid
        # A sequential scan, server-side: the heap page stays pinned while the cursor is open (an index-only scan
        # of a page the visibility map calls all-visible would not pin it)
        pinning.driver_connection.execute("SET enable_indexscan = off; SET enable_indexonlyscan = off; "
                                          "SET enable_bitmapscan = off")
        cursor = pinning.driver_connection.cursor(name="pin")
        cursor.execute("SELECT id, payload FROM webhook_events")
        assert cursor.fetchone() is not None
        done = threading.Event()
        thread = threading.Thread(target=lambda: (vacuuming.driver_connection.execute("VACUUM (FREEZE) webhook_events"),
                                                  done.set()), daemon=True)
        thread.start()
        with other.engine.connect() as conn:  # until it runs (and waits on the pin)
            started = threading.Event()
            for _ in range(1200):  # (60 s at most: a busy box, or a lock the VACUUM queues behind first)
                running = conn.execute(sa.text("SELECT 1 FROM pg_stat_progress_vacuum WHERE pid = :pid"),
                                       {"pid": pid}).first() is not None
                # (the server's view of other sessions is read once a transaction and kept to its end: polled in
                # one transaction, a VACUUM that had not started at the first look "never started". Failed in CI)
                conn.rollback()
                if running:
                    started.set()
                    break
                started.wait(0.05)
            # (what it waited for instead, if it never started: the sessions blocking it and what they ran)
            assert started.is_set(), ("the VACUUM never started (or ran through the pin)", conn.execute(sa.text(
                "SELECT a.pid, a.backend_type, a.state, a.wait_event_type, a.query FROM pg_stat_activity a "
                "WHERE a.pid = :pid OR a.pid = ANY(pg_blocking_pids(:pid))"), {"pid": pid}).all())
        with pytest.raises(StoreError) as caught:
            Retention(other).erase_user("user_v")
        assert not done.is_set()
        cursor.close()
        pinning.rollback()
        thread.join(timeout=30)
        assert done.is_set()
    finally:
        pinning.close()
        vacuuming.close()
        plain.dispose()
    message = str(caught.value)
    assert f"a VACUUM of webhook_events (VACUUM, pid {pid}) held the inbox past 1 s" in message, message
    assert "run the erasure again once it ends (pg_stat_progress_vacuum" in message, message


# Another session's transaction, in any database of the server, that began before an inbox row was written
# (a test on another xdist worker holding a lock, say): the row's xid is then not older than our pinning
# cursor's snapshot, VACUUM (FREEZE) has nothing it must freeze on the pinned page, skips it and ends at once
# (failed twice in CI: "the VACUUM never started"). Such transactions are waited out first.
_OLDER_TRANSACTIONS = sa.text(
    "SELECT a.pid, a.datname, a.state, a.backend_xid, a.backend_xmin, left(a.query, 80) "
    "FROM pg_stat_activity a WHERE a.pid <> pg_backend_pid() "
    "AND (age(a.backend_xid) >= (SELECT max(age(xmin)) FROM webhook_events) "
    "OR (a.datname = current_database() AND age(a.backend_xmin) >= (SELECT max(age(xmin)) FROM webhook_events)))")


def _wait_until_the_inbox_rows_are_older_than_every_transaction(store: Store) -> None:
    older: list[sa.Row[tuple[object, ...]]] = []
    ready = threading.Event()
    for _ in range(1200):  # (120 s at most: what another worker's test holds open)
        with store.engine.connect() as conn:
            older = list(conn.execute(_OLDER_TRANSACTIONS).all())
        if not older:
            return
        ready.wait(0.1)
    pytest.fail(f"transactions older than the inbox rows stayed open for 120 s: {older}")

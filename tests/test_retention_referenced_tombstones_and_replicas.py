"""Retention: hard deletion of tombstones an app's table refers to, a count across replicas,
and an erasure racing a delivery in flight; on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Connection

from clerk_sync.config import DatabaseTimeouts
from clerk_sync.engine import DeliveryStatus, Entity, Upsert
from clerk_sync.events import user_record
from clerk_sync.ingest import WebhookProcessor
from clerk_sync.retention import Retention, RetentionPolicy
from clerk_sync.store import Store, create_engine
from clerk_sync.tables import erased, users, webhook_events
from clerk_sync.webhooks import WebhookVerifier
from tests import factories as f
from tests.test_retention import _later, _rows, deliver

HARD = RetentionPolicy(delete_tombstones_after=timedelta(days=1))


def _deleted_users(store: Store, verifier: WebhookVerifier, *clerk_ids: str) -> dict[str, int]:
    """Users created, then deleted in Clerk; their row ids."""
    processor = WebhookProcessor(store, verifier)
    for clerk_id in clerk_ids:
        assert deliver(processor, f.envelope("user.created", f.user(clerk_id, 1)), f"c_{clerk_id}") == "applied"
    with store.connect() as conn:
        ids = dict(conn.execute(sa.select(users.c.clerk_id, users.c.id)).all())
    for clerk_id in clerk_ids:
        assert deliver(processor, f.envelope("user.deleted", f.deleted("user", clerk_id)), f"d_{clerk_id}") == "applied"
    return ids


def test_a_tombstone_an_apps_table_refers_to_stays_and_the_others_are_deleted(
        store: Store, verifier: WebhookVerifier) -> None:
    """Fixed: one tombstone an app's row refers to by a foreign key (``orders.user_id REFERENCES
    users(id)``, Django's deferred keys alike) failed the whole batch's DELETE: every prune pass raised, and no
    other tombstone was ever hard-deleted. That row stays (cleared, its digest written), the others go, and
    the log says which key keeps it and what to change."""
    ids = _deleted_users(store, verifier, "user_a", "user_b", "user_c")
    deferred = "" if store.dialect == "mysql" else " DEFERRABLE INITIALLY DEFERRED"  # (MariaDB has none)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id BIGINT REFERENCES users (id))")
        conn.exec_driver_sql(f"CREATE TABLE carts (id INTEGER PRIMARY KEY, user_id BIGINT REFERENCES users (id)"
                             f"{deferred})")
        conn.execute(sa.text("INSERT INTO orders (id, user_id) VALUES (1, :a)"), {"a": ids["user_a"]})
        conn.execute(sa.text("INSERT INTO carts (id, user_id) VALUES (1, :c)"), {"c": ids["user_c"]})

    with structlog.testing.capture_logs() as logs:
        report = Retention(store, HARD, now=_later(2)).prune()
    assert report.erased == 1
    assert [_rows(store, users, u) for u in ("user_a", "user_b", "user_c")] == [1, 0, 1]
    (said,) = [line for line in logs if line["event"] == "tombstones_kept"]
    assert (said["table"], said["rows"]) == ("users", 2)
    assert "ON DELETE" in said["fix"] and "CLERK_SYNC_TOMBSTONE_DELETE_AFTER_DAYS" in said["fix"]
    with store.connect() as conn:  # the kept ones are guarded twice: tombstone and digest
        assert conn.execute(sa.select(sa.func.count()).select_from(erased)).scalar_one() == 3
    deletes: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM USERS"):
            deletes.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", seen)
    try:
        with structlog.testing.capture_logs() as logs:
            assert Retention(store, HARD, now=_later(3)).prune().erased == 0  # the next pass: no error either
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", seen)
    # Fixed: each pass tried every kept row again, in a failing transaction of its own (an app whose
    # orders refer to most deleted users: thousands an hour). Kept by an earlier pass: one try a batch.
    assert len(deletes) == 1, deletes
    assert [(line["event"], line["rows"]) for line in logs if "kept" in line["event"]] == [("tombstones_still_kept", 2)]


def test_replicas_hard_deleting_the_same_batch_count_each_row_once(db_url: str, verifier: WebhookVerifier) -> None:
    """Fixed: a batch's digests commit before its rows are deleted, so another replica may pick the
    same rows in between (they are no longer locked). Both counted the whole batch as erased: the metric and
    the summary said twice the rows deleted. Each replica now counts the rows it deleted."""
    first, second = Store.from_url(db_url), Store.from_url(db_url)
    _deleted_users(first, verifier, "user_a", "user_b")
    other: list[int] = []

    def between(*_: object) -> None:  # a connection of the first replica back in its pool: a transaction ended
        with second.connect() as conn:
            digests = conn.execute(sa.select(sa.func.count()).select_from(erased)).scalar_one()
        if digests and not other:  # the digests are committed, the rows not deleted yet: the other replica runs
            other.append(Retention(second, HARD, now=_later(2)).prune().erased)

    sa.event.listen(first.engine, "checkin", between)
    report = Retention(first, HARD, now=_later(2)).prune()
    assert other == [2]  # the other replica deleted both
    assert report.erased == 0  # this one found nothing left to delete
    assert [_rows(first, users, u) for u in ("user_a", "user_b")] == [0, 0]
    first.dispose()
    second.dispose()


OLD, NEW = "zed.old@example.com", "zed.new@example.com"


def _tombstoning(admin: Connection, holder: int, dialect: str) -> bool:
    """Whether another session is at the erasure's tombstone, the statement that waits for the user's row
    ``holder`` holds (PostgreSQL: its wait for that session's lock; MariaDB: the statement running, as its
    lock tables do not always list an ``INSERT .. ON DUPLICATE KEY`` waiting on a row another one changed)."""
    if dialect == "postgresql":
        sql = "SELECT count(*) FROM pg_stat_activity WHERE :holder = ANY(pg_blocking_pids(pid))"
    else:
        sql = ("SELECT count(*) FROM information_schema.PROCESSLIST WHERE id <> :holder AND db = DATABASE() "
               "AND info LIKE 'INSERT INTO users %'")
    waiting = bool(admin.execute(sa.text(sql), {"holder": holder}).scalar_one())
    admin.rollback()  # (a fresh snapshot for the next look)
    if not waiting:
        time.sleep(0.05)  # a pause between looks, not a bound on anything
    return waiting


@pytest.mark.parametrize("db_url", [pytest.param("postgres", marks=pytest.mark.postgres),
                                    pytest.param("mariadb", marks=pytest.mark.mariadb)], indirect=True)
def test_an_erasure_searches_the_address_a_delivery_in_flight_wrote(db_url: str, verifier: WebhookVerifier) -> None:
    """Fixed: the erasure read the user's e-mail addresses before it took the user's lock. A delivery in
    flight (the user changed their address, and Clerk mailed the new one) committed while the erasure waited for
    that lock: the row was cleared, but the mail naming only the new address was kept whole until the 30-day
    prune. The addresses are read once the erasure holds the lock. (SQLite has one writer: no such window.)"""
    store = Store(create_engine(db_url, timeouts=DatabaseTimeouts(lock_s=120, idle_in_transaction_s=0)))
    admin = sa.create_engine(db_url)
    processor = WebhookProcessor(store, verifier)
    assert deliver(processor, f.envelope("user.created", f.user("user_x", 100, email=OLD)), "m_created") == "applied"
    changed = f.user("user_x", 200, email=NEW)
    mail = f.envelope("email.created", {"object": "email", "id": "ema_new", "to_email_address": NEW, "user_id": None,
                                        "subject": "Verify your new address"})
    failures: list[BaseException] = []

    def erase() -> None:
        try:
            Retention(store).erase_user("user_x", reason="DSR")
        except BaseException as exc:
            failures.append(exc)

    eraser = threading.Thread(target=erase)
    with store.transaction() as writer:  # the delivery in flight: its row written, not committed yet
        holder = int(writer.conn.exec_driver_sql(
            "SELECT pg_backend_pid()" if store.dialect == "postgresql" else "SELECT CONNECTION_ID()").scalar_one())
        writer.record_delivery("m_changed", json.dumps(f.envelope("user.updated", changed)), event_type="user.updated",
                               instance_id=None, event_timestamp=None, status=DeliveryStatus.APPLIED)
        assert writer.apply(Upsert(Entity.USER, user_record(changed)))
        writer.record_delivery("m_mail", json.dumps(mail), event_type="email.created", instance_id=None,
                               event_timestamp=None, status=DeliveryStatus.IGNORED)
        eraser.start()
        deadline = time.monotonic() + 120  # (a bound on a broken run, not a race: the wait starts at once)
        with admin.connect() as conn:
            while not _tombstoning(conn, holder, store.dialect):
                assert eraser.is_alive() and time.monotonic() < deadline, failures
    eraser.join(120)
    assert failures == []
    with store.connect() as conn:
        kept = {r.svix_id: json.dumps(r.payload) for r in conn.execute(
            sa.select(webhook_events.c.svix_id, webhook_events.c.payload).where(webhook_events.c.redacted_at.is_(None)))}
        row = conn.execute(sa.select(users.c.email, users.c.deleted_at).where(users.c.clerk_id == "user_x")).one()
    assert (row.email, row.deleted_at is not None) == (None, True)
    assert kept == {}  # the mail to the new address included
    store.dispose()
    admin.dispose()
